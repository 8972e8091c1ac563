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

# Fonts and heat maps (points: a matrix's side, a vector's height); gaps between nodes (inches).
_TITLE_PT, _LABEL_PT, _DATA_PT, _EDGE_PT = 8.0, 6.5, 7.5, 7.0
_MAP_PT, _STRIP_PT = 54.0, 9.5
_GAP_X, _GAP_Y = 0.3, 0.36
_HEAD, _FOOT = 0.45, 0.3  # inches for the title above the graph and the key below


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


def _node_box(name: str, value: np.ndarray, grad: np.ndarray, numbers: bool, digits: int) -> Any:
    """Node ``name`` as an AnnotationBbox: its title over its value and gradient.

    Numbers (and scalars) are stacked; heat maps stand side by side. Matplotlib's
    packers size the box around its contents.
    """
    from matplotlib.colors import Normalize
    from matplotlib.image import BboxImage
    from matplotlib.offsetbox import AnnotationBbox, DrawingArea, HPacker, TextArea, VPacker
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import Bbox, TransformedBbox

    stacked = numbers or value.ndim == 0
    parts = []
    for part, a, label in (("value", value, "value"), ("grad", grad, f"∂L/∂{name}")):
        gid = f"{name}/{part}"
        if stacked:
            scale, lines = format_array(a, digits)
            label = f"{label} {scale}".strip()
            body = TextArea("\n".join(lines), textprops={
                "family": "monospace", "size": _DATA_PT, "linespacing": 1.25, "gid": gid})
        else:
            label = f"‖{name if part == 'value' else label}‖ = {np.linalg.norm(a):.{digits}g}"
            body = DrawingArea(_MAP_PT, _MAP_PT if a.ndim == 2 else _STRIP_PT)
            m = float(np.max(np.abs(a))) or 1.0
            image = BboxImage(TransformedBbox(Bbox.from_bounds(0, 0, body.width, body.height),
                                              body.get_transform()),
                              cmap="RdBu_r", norm=Normalize(-m, m), interpolation="nearest",
                              gid=gid)
            image.set_data(np.atleast_2d(a))
            body.add_artist(image)
            body.add_artist(Rectangle((0, 0), body.width, body.height, fill=False,
                                      linewidth=0.5, edgecolor="#777777"))
        label = TextArea(label, textprops={"size": _LABEL_PT, "color": "#444444",
                                           "gid": f"{gid}/label"})
        parts.append(VPacker(children=[label, body], sep=2))
    shape = "" if value.ndim == 0 else f" = {value.shape}"
    title = TextArea(f"{NODES[name][0]}   {_SHAPES[name]}{shape}", textprops={
        "size": _TITLE_PT, "weight": "bold", "gid": f"{name}/title"})
    columns = VPacker(children=parts, sep=4) if stacked else HPacker(children=parts, sep=9)
    box = AnnotationBbox(VPacker(children=[title, columns], sep=4, pad=5), (0, 0),
                         box_alignment=(0, 1), annotation_clip=False, zorder=1, bboxprops={
                             "boxstyle": "round,pad=0,rounding_size=0.3",
                             "facecolor": _FILL[NODES[name][1]], "edgecolor": "#777777",
                             "linewidth": 0.8})
    box.patch.set_gid(f"{name}/box")
    return box


def _layout(canvas: Any, grow_only: bool, boxes: dict[str, Any], labels: list[Any]) -> dict:
    """Node rectangles (left, top, width, height), in inches from the top left of ``canvas``.

    Each column (row) of ``NODES`` is as wide (tall) as its largest box, and a gap
    between columns fits the widest arrow label crossing it. The root figure is
    sized (``grow_only``: enlarged where needed) to hold the graph, the title above
    and the key below; the canvas's data coordinates become those inches.
    """
    from matplotlib.backends.backend_agg import RendererAgg

    fig, root = canvas.get_figure(root=False), canvas.get_figure(root=True)
    renderer = RendererAgg(1, 1, root.dpi)  # sizes in inches, whatever the backend
    size = {n: b.get_window_extent(renderer).size / root.dpi for n, b in boxes.items()}
    colw, rowh, gaps = [0.0] * 5, [0.0] * 3, [_GAP_X] * 4
    for name, (_, _, (c, r)) in NODES.items():
        colw[c], rowh[r] = max(colw[c], size[name][0]), max(rowh[r], size[name][1])
    for (src, dst, _), label in zip(EDGES, labels, strict=True):
        c0, c1 = NODES[src][2][0], NODES[dst][2][0]
        if c1 == c0 + 1:
            gaps[c0] = max(gaps[c0], label.get_window_extent(renderer).width / root.dpi + 0.45)
    xs = np.cumsum([0.0] + [w + g for w, g in zip(colw, [*gaps, 0], strict=True)])
    ys = np.cumsum([0.0] + [h + _GAP_Y for h in rowh])
    need = np.array([xs[-1] + 0.3, ys[-1] - _GAP_Y + _HEAD + _FOOT])
    grow = need / (fig.bbox.size / root.dpi)
    root.set_size_inches(root.get_size_inches() * (np.maximum(grow, 1) if grow_only else grow))
    W, H = fig.bbox.size / root.dpi
    canvas.set(xlim=(0, W), ylim=(H, 0))
    ox, oy = (W - xs[-1]) / 2, _HEAD + (H - need[1]) / 2  # the graph centred
    return {name: (ox + xs[c] + (colw[c] - size[name][0]) / 2,
                   oy + ys[r] + (rowh[r] - size[name][1]) / 2, *size[name])
            for name, (_, _, (c, r)) in NODES.items()}


def _clip(rect: tuple, other: tuple, margin: float = 0.03) -> tuple[float, float]:
    """Where the line between the centres of ``rect`` and ``other`` leaves ``rect`` (+ margin)."""
    left, top, w, h = rect
    cx, cy = left + w / 2, top + h / 2
    dx, dy = other[0] + other[2] / 2 - cx, other[1] + other[3] / 2 - cy
    t = min(w / 2 / abs(dx) if dx else math.inf, h / 2 / abs(dy) if dy else math.inf)
    t += margin / math.hypot(dx, dy)
    return cx + t * dx, cy + t * dy


def draw_graph(params: Any, x: Any, *, title: str | None = None, digits: int = 3,
               numbers: bool | None = None, fig: Any = None) -> Any:
    """The graph of one sample as a matplotlib figure, each node with its value and gradient.

    Nodes: x (D,), A (H, D), B (H, D), y = A x (H,), u = sigmoid(y) (H,),
    v = B x (H,), z = u + v (H,), C (O, H), w = C z (O,), L = ||w||^2 (scalar),
    each with its forward value and dL/d(node) (see ``node_values``). Arrows point
    the forward way; each carries the local rule that sends the gradient back
    along it, g• = dL/d•.

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
      The figure drawn into. Its texts carry gids: "x/title", "x/value", "x/grad",
      "x/value/label" ... (a heat map: its BboxImage), "edge/x/y" ..., "title",
      "key"; the node boxes "x/box" ...
    """
    params, D, H, O, _ = as_params(params)
    digits = validation.check_positive_int(digits, "digits")
    if digits > 15:
        raise ValueError(f"digits must be between 1 and 15, got {digits}")
    for arg, value, kind in (("numbers", numbers, bool), ("title", title, str)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{arg} must be None or a {kind.__name__}, got {type(value).__name__}")
    import matplotlib.pyplot as plt
    from matplotlib.figure import FigureBase
    from matplotlib.patches import FancyArrowPatch

    if fig is not None and not isinstance(fig, FigureBase):
        raise TypeError(f"fig must be None, a matplotlib Figure or SubFigure, got "
                        f"{type(fig).__name__}")
    numbers = max(D, H, O) <= 3 if numbers is None else numbers
    vals = node_values(params, x)
    grow_only, fig = fig is not None, plt.figure() if fig is None else fig
    canvas = fig.add_axes((0, 0, 1, 1), zorder=0)  # all of ``fig``: boxes, arrows, texts
    canvas.set_axis_off()
    boxes = {n: canvas.add_artist(_node_box(n, *vals[n], numbers, digits)) for n in NODES}
    labels = [canvas.text(0, 0, rule, fontsize=_EDGE_PT, color="#24529b", va="center", zorder=4,
                          gid=f"edge/{a}/{b}", bbox={"boxstyle": "round,pad=0.15", "alpha": 0.9,
                                                     "facecolor": "white", "edgecolor": "none"})
              for a, b, rule in EDGES]
    rects = _layout(canvas, grow_only, boxes, labels)
    for name, (left, top, _, _) in rects.items():
        boxes[name].xybox = (left, top)
    for (src, dst, _), label in zip(EDGES, labels, strict=True):
        a, b = _clip(rects[src], rects[dst]), _clip(rects[dst], rects[src])
        canvas.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=9, zorder=2,
                                         color="#555555", linewidth=0.9, shrinkA=0, shrinkB=0))
        vertical = abs(a[0] - b[0]) < 1e-9  # its label beside it, else on it
        label.set(position=((a[0] + b[0]) / 2 + 0.06 * vertical, (a[1] + b[1]) / 2),
                  ha="left" if vertical else "center")
    W, Hf = canvas.get_xlim()[1], canvas.get_ylim()[0]
    default = f"The ABC graph for one sample: L = {float(vals['L'][0]):.{digits + 1}g}"
    canvas.text(W / 2, 0.12, default if title is None else title, ha="center", va="top",
                fontsize=10, gid="title")
    key = ("Arrows: the forward pass. On each arrow, in blue: the rule that carries the "
           "gradient back along it (g• = ∂L/∂•, g = ∂L/∂L = 1).")
    if not numbers:
        key += " Heat maps: red > 0, blue < 0, each scaled to its own largest |entry|."
    canvas.text(W / 2, Hf - _FOOT + 0.1, key, ha="center", va="top", fontsize=_LABEL_PT + 0.5,
                color="#444444", gid="key")
    return fig
