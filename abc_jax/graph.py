"""The ABC graph for one sample, drawn: every node with its value and its gradient.

::

    A ──► y = A x ──► u = sigmoid(y)      C
        ↗                 │                 │
    x                     z = u + v ──────► w = C z ──► L = ||w||^2
        ↘                 ↑
    B ──► v = B x ────────┘

``draw_graph(params, x)`` returns a matplotlib figure of the ten nodes x, A, B, C,
y, u, v, z, w, L with their shapes. Each node shows its forward value and its
gradient dL/d(node); each arrow points the forward way and carries the local rule
that sends the gradient back along it (gy = gu * u * (1 - u), gC = gw z^T, ...).

Every number comes from the package's own functions (``node_values``):

- L and the residuals x, u, z, w: ``forward``. y = A x is not a residual (the
  backward pass keeps u = sigmoid(y) instead), so it is the one product taken
  here; v = z - u.
- dL/dA, dL/dB, dL/dC: ``manual_vjp``.
- gw, gz and gy: ``manual_vjp`` builds its outer products from them,
  gA = gy x^T, gB = gv x^T, gC = gw z^T. Given residuals whose x and z are the
  unit vector e_0, it returns them as the first columns of its result (a product
  with 1 or 0 is exact): the numbers the derivation computes, no rule restated
  here. gu = gv = gz, since z = u + v passes gz to both.
- gx: ``jax.grad`` of ``abc_loss`` in x, whose custom VJP is the manual rule
  gx = A^T gy + B^T gv.
- dL/dL = g = 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import validation
from abc_jax.backward import abc_loss, manual_vjp
from abc_jax.model import as_params, as_sample, forward

# name: (title, kind, (column, row)); the layout reads left to right, rows top down.
NODES: dict[str, tuple[str, str, tuple[int, int]]] = {
    "A": ("A", "param", (0, 0)),
    "x": ("x", "input", (0, 1)),
    "B": ("B", "param", (0, 2)),
    "y": ("y = A x", "op", (1, 0)),
    "v": ("v = B x", "op", (1, 2)),
    "u": ("u = σ(y)", "op", (2, 0)),  # noqa: RUF001 (sigma)
    "z": ("z = u + v", "op", (2, 1)),
    "C": ("C", "param", (3, 0)),
    "w": ("w = C z", "op", (3, 1)),
    "L": ("L = ‖w‖²", "loss", (4, 1)),
}

# (from, to, the backward rule along the edge), g• = dL/d•, g = dL/dL = 1.
EDGES: tuple[tuple[str, str, str], ...] = (
    ("A", "y", "gA = gy xᵀ"),
    ("x", "y", "gx += Aᵀ gy"),
    ("x", "v", "gx += Bᵀ gv"),
    ("B", "v", "gB = gv xᵀ"),
    ("y", "u", "gy = gu ⊙ u ⊙ (1 − u)"),  # noqa: RUF001 (a minus sign)
    ("u", "z", "gu = gz"),
    ("v", "z", "gv = gz"),
    ("z", "w", "gz = Cᵀ gw"),
    ("C", "w", "gC = gw zᵀ"),
    ("w", "L", "gw = 2 g w"),
)

_SHAPES = {"A": "(H, D)", "B": "(H, D)", "C": "(O, H)", "x": "(D,)", "y": "(H,)",
           "u": "(H,)", "v": "(H,)", "z": "(H,)", "w": "(O,)", "L": "scalar"}
_FILL = {"param": "#fdebd3", "input": "#e8e8e8", "op": "#ddeaf7", "loss": "#dcefdc"}
_EDGE_COLOR = "#24529b"

# Fonts (points) and spacing (inches).
_TITLE_PT, _LABEL_PT, _DATA_PT, _EDGE_PT = 8.0, 6.5, 7.5, 7.0
_PAD, _GAP_X, _GAP_Y, _LINE = 0.07, 0.3, 0.36, 1.25
_MAP_IN, _STRIP_IN = 0.75, 0.13  # heat maps: matrix side, vector strip height


def node_values(params: Any, x: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Value and gradient dL/d(node) of every node of the graph for one sample.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      x: one sample, shape (D,).

    Returns:
      ``{name: (value, gradient)}`` for the names in ``NODES``, NumPy arrays of
      the node's shape (L: shape ()); where each comes from is in the module
      docstring.
    """
    params, D, H, _, dtype = as_params(params)
    x = as_sample(x, D, dtype)
    L, res = forward(params, x)
    g = manual_vjp(params, res)
    unit_x = jnp.zeros(D, dtype).at[0].set(1)
    unit_z = jnp.zeros(H, dtype).at[0].set(1)
    probe = manual_vjp(params, res._replace(x=unit_x, z=unit_z))
    gy, gz, gw = probe.A[:, 0], probe.B[:, 0], probe.C[:, 0]
    gx = jax.grad(abc_loss, argnums=1)(params, x)
    y = jnp.matmul(params.A, x, precision="highest")
    pairs = {
        "x": (res.x, gx), "A": (params.A, g.A), "B": (params.B, g.B), "C": (params.C, g.C),
        "y": (y, gy), "u": (res.u, gz), "v": (res.z - res.u, gz), "z": (res.z, gz),
        "w": (res.w, gw), "L": (L, jnp.ones((), dtype)),
    }
    return {k: (np.asarray(v), np.asarray(d)) for k, (v, d) in pairs.items()}


# -- numbers as text ------------------------------------------------------------------------

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def format_array(a: np.ndarray, digits: int = 3) -> tuple[str, list[str]]:
    """``(scale, lines)``: ``a`` as right-aligned text, with a common power of ten.

    The largest |entry| gets ``digits`` significant digits. Entries are written
    plainly when it lies in [0.1, 1000); otherwise they are shown divided by
    10^e (e its exponent) and ``scale`` is "×10ᵉ" (else ""). A scalar or a
    vector is one line, a matrix one line per row.
    """
    a = np.asarray(a, np.float64)
    m = float(np.max(np.abs(a))) if a.size else 0.0
    e = math.floor(math.log10(m)) if m > 0 else 0
    if -1 <= e <= 2:
        scale, shown, decimals = "", a, max(0, digits - 1 - e)
    else:
        scale = "\N{MULTIPLICATION SIGN}10" + str(e).translate(_SUPERSCRIPT)
        shown, decimals = a / 10.0**e, digits - 1
    cells = [f"{v:.{decimals}f}" for v in np.atleast_1d(shown).ravel()]
    cells = [c[1:] if c[0] == "-" and c.strip("-0.") == "" else c for c in cells]  # no -0.00
    width = max(len(c) for c in cells)
    rows = np.array(cells, dtype=object).reshape(np.atleast_2d(shown).shape)
    return scale, ["  ".join(c.rjust(width) for c in row) for row in rows]


@functools.cache
def _renderer() -> Any:
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(8, 8, 72)  # 72 dpi: sizes come out in points


def _text_size(text: str, size: float, family: str = "sans-serif", bold: bool = False) -> tuple:
    """(width, height) in inches of ``text`` (one line per newline)."""
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(family=family, size=size, weight="bold" if bold else "normal")
    lines = text.split("\n")
    width = max(_renderer().get_text_width_height_descent(s or " ", prop, ismath=False)[0]
                for s in lines)
    return width / 72, len(lines) * size * _LINE / 72


# -- one node: its blocks, sizes and drawing --------------------------------------------------


def _title(name: str, value: np.ndarray) -> str:
    shape = "" if value.ndim == 0 else f" = {tuple(int(n) for n in value.shape)}"
    return f"{NODES[name][0]}   {_SHAPES[name]}{shape}"


def _blocks(name: str, value: np.ndarray, grad: np.ndarray, numbers: bool,
            digits: int) -> list[dict[str, Any]]:
    """The two columns of a node (numbers: stacked rows; heat maps: side by side)."""
    out = []
    for part, a, label in (("value", value, "value"), ("grad", grad, f"∂L/∂{name}")):
        if numbers or a.ndim == 0:
            scale, lines = format_array(a, digits)
            out.append({"part": part, "label": f"{label} {scale}".strip(), "lines": lines})
        else:
            norm = float(np.linalg.norm(a))
            symbol = name if part == "value" else label
            out.append({"part": part, "label": f"‖{symbol}‖ = {norm:.{digits}g}", "map": a})
    return out


def _block_size(b: dict[str, Any]) -> tuple[float, float]:
    lw, lh = _text_size(b["label"], _LABEL_PT)
    if "lines" in b:
        dw, dh = _text_size("\n".join(b["lines"]), _DATA_PT, "monospace")
    else:
        dw, dh = _MAP_IN, _MAP_IN if b["map"].ndim == 2 else _STRIP_IN
    return max(lw, dw), lh + dh


def _node_size(title: str, blocks: list[dict[str, Any]], stacked: bool) -> tuple[float, float]:
    tw, th = _text_size(title, _TITLE_PT, bold=True)
    sizes = [_block_size(b) for b in blocks]
    if stacked:
        w, h = max(s[0] for s in sizes), sum(s[1] for s in sizes) + 0.05
    else:
        w, h = sum(s[0] for s in sizes) + 0.12, max(s[1] for s in sizes)
    return max(tw, w) + 2 * _PAD, th + h + 2 * _PAD + 0.03


# -- the layout, in inches from the top left ----------------------------------------------


def _layout(sizes: dict[str, tuple[float, float]]) -> tuple[dict, float, float]:
    """Node rectangles (left, top, width, height) and the total (width, height)."""
    ncol = 1 + max(c for _, _, (c, _) in NODES.values())
    nrow = 1 + max(r for _, _, (_, r) in NODES.values())
    colw, rowh = [0.0] * ncol, [0.0] * nrow
    for name, (_, _, (c, r)) in NODES.items():
        colw[c], rowh[r] = max(colw[c], sizes[name][0]), max(rowh[r], sizes[name][1])
    gaps = [_GAP_X] * (ncol - 1)  # wide enough for the labels of the arrows crossing them
    for src, dst, rule in EDGES:
        c0, c1 = NODES[src][2][0], NODES[dst][2][0]
        if c1 == c0 + 1:
            gaps[c0] = max(gaps[c0], _text_size(rule, _EDGE_PT)[0] + 0.45)
    xs = np.concatenate([[0.0], np.cumsum([w + g for w, g in zip(colw, [*gaps, 0], strict=True)])])
    ys = np.concatenate([[0.0], np.cumsum([h + _GAP_Y for h in rowh])])
    rects = {}
    for name, (_, _, (c, r)) in NODES.items():
        w, h = sizes[name]
        rects[name] = (xs[c] + (colw[c] - w) / 2, ys[r] + (rowh[r] - h) / 2, w, h)
    return rects, float(xs[-1]), float(ys[-1] - _GAP_Y)


def _clip(rect: tuple, toward: tuple, margin: float = 0.03) -> tuple[float, float]:
    """Where the segment from the centre of ``rect`` to ``toward`` leaves it (plus a margin)."""
    left, top, w, h = rect
    cx, cy = left + w / 2, top + h / 2
    dx, dy = toward[0] - cx, toward[1] - cy
    t = min(w / 2 / abs(dx) if dx else math.inf, h / 2 / abs(dy) if dy else math.inf)
    t += margin / math.hypot(dx, dy)
    return cx + t * dx, cy + t * dy


# -- drawing ------------------------------------------------------------------------------


def _fit(fig: Any, width: float, height: float) -> tuple[Any, float, float]:
    """A new figure of width x height inches, or ``fig`` (a Figure or SubFigure) made to hold it.

    Returns (figure, its width, its height): the root figure is enlarged where needed.
    """
    import matplotlib.pyplot as plt

    if fig is None:
        return plt.figure(figsize=(width, height)), width, height
    root = fig.get_figure(root=True)
    fw, fh = fig.bbox.width / root.dpi, fig.bbox.height / root.dpi  # inches
    gx, gy = max(1.0, width / fw), max(1.0, height / fh)
    if gx > 1.0 or gy > 1.0:
        rw, rh = root.get_size_inches()
        root.set_size_inches(rw * gx, rh * gy)
    return fig, fw * gx, fh * gy


def _draw_node(canvas: Any, to_frac: Any, name: str, rect: tuple, title: str,
               blocks: list[dict[str, Any]], stacked: bool) -> None:
    from matplotlib.patches import FancyBboxPatch

    left, top, w, h = rect
    x0, y0 = to_frac(left, top + h)
    x1, y1 = to_frac(left + w, top)
    canvas.add_patch(FancyBboxPatch(
        (x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.008",
        clip_on=False, facecolor=_FILL[NODES[name][1]], edgecolor="#777777",
        linewidth=0.8, zorder=1, gid=f"{name}/box"))
    th = _text_size(title, _TITLE_PT, bold=True)[1]
    canvas.text(*to_frac(left + _PAD, top + _PAD), title, fontsize=_TITLE_PT, weight="bold",
             va="top", ha="left", gid=f"{name}/title", zorder=3)
    bx, by = left + _PAD, top + _PAD + th + 0.03
    for b in blocks:
        bw, bh = _block_size(b)
        lh = _text_size(b["label"], _LABEL_PT)[1]
        canvas.text(*to_frac(bx, by), b["label"], fontsize=_LABEL_PT, color="#444444", va="top",
                 ha="left", gid=f"{name}/{b['part']}/label", zorder=3)
        if "lines" in b:
            canvas.text(*to_frac(bx, by + lh), "\n".join(b["lines"]), fontsize=_DATA_PT,
                     family="monospace", va="top", ha="left", linespacing=_LINE,
                     gid=f"{name}/{b['part']}", zorder=3)
        else:
            _draw_map(canvas, to_frac, name, b, (bx, by + lh, bw, bh - lh))
        if stacked:
            by += bh + 0.05
        else:
            bx += bw + 0.12


def _draw_map(canvas: Any, to_frac: Any, name: str, b: dict[str, Any], rect: tuple) -> None:
    left, top, w, h = rect
    x0, y0 = to_frac(left, top + h)
    x1, y1 = to_frac(left + w, top)
    ax = canvas.get_figure(root=False).add_axes((x0, y0, x1 - x0, y1 - y0), zorder=3)
    a = np.atleast_2d(b["map"])
    m = float(np.max(np.abs(a))) or 1.0
    ax.imshow(a, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto", interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    ax.set_gid(f"{name}/{b['part']}")
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
        spine.set_color("#777777")


def _draw_edges(canvas: Any, to_frac: Any, rects: dict[str, tuple]) -> None:
    from matplotlib.patches import FancyArrowPatch

    def centre(n: str) -> tuple[float, float]:
        left, top, w, h = rects[n]
        return left + w / 2, top + h / 2

    for src, dst, rule in EDGES:
        a, b = _clip(rects[src], centre(dst)), _clip(rects[dst], centre(src))
        canvas.add_patch(FancyArrowPatch(
            to_frac(*a), to_frac(*b), clip_on=False, arrowstyle="-|>",
            mutation_scale=9, color="#555555", linewidth=0.9, shrinkA=0, shrinkB=0, zorder=2))
        mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        vertical = abs(a[0] - b[0]) < 1e-9
        canvas.text(*to_frac(mx + (0.06 if vertical else 0), my), rule, fontsize=_EDGE_PT,
                 color=_EDGE_COLOR, ha="left" if vertical else "center", va="center",
                 gid=f"edge/{src}/{dst}", zorder=4,
                 bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                       "edgecolor": "none", "alpha": 0.9})


def draw_graph(params: Any, x: Any, *, title: str | None = None, digits: int = 3,
               numbers: bool | None = None, fig: Any = None) -> Any:
    """The graph of one sample as a matplotlib figure, each node with its value and gradient.

    Nodes: x (D,), A (H, D), B (H, D), y = A x (H,), u = sigmoid(y) (H,),
    v = B x (H,), z = u + v (H,), C (O, H), w = C z (O,), L = ||w||^2 (scalar),
    each with its forward value and dL/d(node) from ``manual_vjp`` (see
    ``node_values``). Arrows point the forward way; each carries the local rule
    that sends the gradient back along it, g• = dL/d•.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      x: one sample, shape (D,).
      title: the figure's title; default: the loss.
      digits: significant digits of the largest entry of each array.
      numbers: print every entry (default when D, H, O <= 3); False draws norms and
        a heat map of each array (red > 0, blue < 0, each scaled to its own largest
        |entry|) instead.
      fig: a matplotlib ``Figure`` or ``SubFigure`` (e.g. one of
        ``fig.subfigures(2, 1)``, to show two states) to draw into; the root figure
        is enlarged if the graph does not fit. Default: a new figure of the graph's size.

    Returns:
      The figure drawn into. Node texts carry the gids "x/value", "x/grad",
      "x/value/label" ... (heat maps: their Axes), arrow labels "edge/x/y" ...
    """
    params, D, H, O, _ = as_params(params)
    digits = validation.check_positive_int(digits, "digits")
    if digits > 15:
        raise ValueError(f"digits must be between 1 and 15, got {digits}")
    if numbers is not None and not isinstance(numbers, bool):
        raise TypeError(f"numbers must be None or a bool, got {type(numbers).__name__}")
    numbers = max(D, H, O) <= 3 if numbers is None else numbers
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be None or a str, got {type(title).__name__}")
    from matplotlib.figure import FigureBase

    if fig is not None and not isinstance(fig, FigureBase):
        raise TypeError(f"fig must be None, a matplotlib Figure or SubFigure, got "
                        f"{type(fig).__name__}")
    vals = node_values(params, x)

    content, sizes = {}, {}
    for name, (value, grad) in vals.items():
        stacked = numbers or value.ndim == 0
        content[name] = (_title(name, value), _blocks(name, value, grad, numbers, digits), stacked)
        sizes[name] = _node_size(*content[name])
    rects, width, height = _layout(sizes)
    head, foot = 0.45, 0.3  # inches for the title above and the key below
    fig, W, Hf = _fit(fig, width + 0.3, height + head + foot)
    ox, oy = (W - width) / 2, head + (Hf - height - head - foot) / 2

    def to_frac(xi: float, yi: float) -> tuple[float, float]:
        return (ox + xi) / W, 1 - (oy + yi) / Hf

    # One Axes over the whole (sub)figure, data coordinates = its fractions, holds the
    # boxes, arrows and texts; each heat map is an Axes of its own above it.
    canvas = fig.add_axes((0, 0, 1, 1), zorder=0)
    canvas.set(xlim=(0, 1), ylim=(0, 1))
    canvas.set_axis_off()
    for name, (t, blocks, stacked) in content.items():
        _draw_node(canvas, to_frac, name, rects[name], t, blocks, stacked)
    _draw_edges(canvas, to_frac, rects)
    L = float(vals["L"][0])
    canvas.text(0.5, 1 - 0.12 / Hf, title if title is not None else
             f"The ABC graph for one sample: L = {L:.{digits + 1}g}", ha="center", va="top",
             fontsize=10, gid="title")
    key = ("Arrows: the forward pass. On each arrow, in blue: the rule that carries the "
           "gradient back along it (g• = ∂L/∂•, g = ∂L/∂L = 1).")
    if not numbers:
        key += " Heat maps: red > 0, blue < 0, each scaled to its own largest |entry|."
    canvas.text(0.5, (foot - 0.1) / Hf, key, ha="center", va="top", fontsize=_LABEL_PT + 0.5,
             color="#444444", gid="key")
    return fig
