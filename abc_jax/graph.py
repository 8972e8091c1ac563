"""The ABC graph for one sample, drawn: every node with its value and its gradient.

``draw_graph(params, x)`` draws the ten nodes x, A, B, C, y, u, v, z, w, L, each with
its shape, forward value and gradient dL/d(node); each arrow points the forward way and
carries the local rule that sends the gradient back along it (gC = gw z^T, ...).

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

from abc_jax import edge
from abc_jax.api import abc_loss, forward, manual_vjp

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
TARGET_NODE = {"t": ("t", "input", (4, 0))}  # drawn when a target is given
_ALL_NODES = NODES | TARGET_NODE

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
TARGET_EDGE = ("t", "L", "gt = −2 g (w − t)")  # noqa: RUF001 (minus signs)


def _with_target(text: str, target: bool) -> str:
    """The loss's label and its rule with a target: ||w - t||^2 and gw = 2 g (w - t)."""
    if not target:
        return text
    return text.replace("‖w‖²", "‖w − t‖²").replace("2 g w", "2 g (w − t)")  # noqa: RUF001


_SHAPES = {"A": "(H, D)", "B": "(H, D)", "C": "(O, H)", "x": "(D,)", "y": "(H,)",
           "u": "(H,)", "v": "(H,)", "z": "(H,)", "w": "(O,)", "t": "(O,)", "L": "scalar"}
_FILL = {"param": "#fdebd3", "input": "#e8e8e8", "op": "#ddeaf7", "loss": "#dcefdc"}

# Points: fonts, and heat maps (a matrix's side, a vector's height).
_TITLE_PT, _LABEL_PT, _DATA_PT, _EDGE_PT, _MAP_PT, _STRIP_PT = 8.0, 6.5, 7.5, 7.0, 54.0, 9.5
_GAP_X, _GAP_Y, _HEAD, _FOOT = 0.3, 0.36, 0.45, 0.3  # inches; head: title, foot: key


def node_values(params: Any, x: Any,
                t: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Value and gradient dL/d(node) of every node of the graph for one sample.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      x: one sample, shape (D,).
      t: its target, shape (O,); None for 0 (the homework's L = ||w||^2).

    Returns:
      ``{name: (value, gradient)}`` for the names in ``NODES`` (and, given ``t``, "t" with
      gt = -gw from ``jax.grad`` of ``abc_loss`` in t), NumPy arrays of the node's shape
      (L: shape ()); where each comes from: the module docstring.
    """
    params, x, t = edge.params_and_sample(
        edge.params_input(params), edge.data_input(x, "x"),
        edge.optional_input(t, "t", "one target array of shape (O,)"))
    edge.check_values(None, params, {"x": x, "t": t})  # a picture reads its values anyway
    D, H, dtype = params.A.shape[1], params.A.shape[0], params.A.dtype
    L, res = forward(params, x, t)
    g = manual_vjp(params, res)
    unit_x, unit_z = (jnp.zeros(n, dtype).at[0].set(1) for n in (D, H))  # e_0 in R^D, R^H
    probe = manual_vjp(params, res._replace(x=unit_x, z=unit_z))
    gy, gz, gw = probe.A[:, 0], probe.B[:, 0], probe.C[:, 0]
    gx = jax.grad(abc_loss, argnums=1)(params, x, t)
    y = jnp.matmul(params.A, x, precision="highest")
    pairs = {
        "x": (res.x, gx), "A": (params.A, g.A), "B": (params.B, g.B), "C": (params.C, g.C),
        "y": (y, gy), "u": (res.u, gz), "v": (res.z - res.u, gz), "z": (res.z, gz),
        "w": (res.w, gw), "L": (L, jnp.ones((), dtype)),
    }
    if t is not None:
        pairs["t"] = (t, jax.grad(abc_loss, argnums=2)(params, x, t))
    return {k: (np.asarray(v), np.asarray(d)) for k, (v, d) in pairs.items()}


def format_array(a: np.ndarray, digits: int = 3, fixed: bool = False) -> tuple[str, list[str]]:
    """``(scale, lines)``: ``a`` as right-aligned text, with a common power of ten.

    The largest |entry| gets ``digits`` significant digits. Entries are written
    plainly when it lies in [0.1, 1000); otherwise they are shown divided by
    10^e (e its exponent) and ``scale`` is "×10ᵉ" (else ""). A scalar or a
    vector is one line, a matrix one line per row. ``fixed`` (``draw_graph``'s
    rule): every entry gets ``digits`` decimals, written plainly when the largest
    |entry| lies in [0.1, 10), else divided by 10^e as above.
    """
    a = np.asarray(a, np.float64)
    m = float(np.max(np.abs(a))) if a.size else 0.0
    e = math.floor(math.log10(m)) if m > 0 else 0
    if -1 <= e <= (0 if fixed else 2):
        scale, shown, decimals = "", a, digits if fixed else max(0, digits - 1 - e)
    else:
        superscript = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
        scale = "\N{MULTIPLICATION SIGN}10" + str(e).translate(superscript)
        shown, decimals = a / 10.0**e, digits if fixed else digits - 1
    cells = [f"{v:.{decimals}f}" for v in np.atleast_1d(shown).ravel()]
    cells = [c[1:] if c[0] == "-" and c.strip("-0.") == "" else c for c in cells]  # no -0.00
    width = max(len(c) for c in cells)
    rows = np.array(cells, dtype=object).reshape(np.atleast_2d(shown).shape)
    return scale, ["  ".join(c.rjust(width) for c in row) for row in rows]


def _number(v: Any, digits: int) -> str:
    """One number as ``format_array(v, digits, fixed=True)`` writes it, its ×10ᵉ after it."""
    scale, (line,) = format_array(v, digits, fixed=True)
    return line.strip() + scale


def _node_box(name: str, value: np.ndarray, grad: np.ndarray, numbers: bool, digits: int,
              target: bool = False) -> Any:
    """Node ``name`` as a box that matplotlib sizes around its title, value and gradient."""
    from matplotlib.colors import CenteredNorm
    from matplotlib.image import BboxImage
    from matplotlib.offsetbox import AnnotationBbox, DrawingArea, HPacker, TextArea, VPacker
    from matplotlib.patches import Rectangle

    stacked = numbers or value.ndim == 0
    parts = []
    for part, a, label in (("value", value, "value"), ("grad", grad, f"∂L/∂{name}")):
        gid = f"{name}/{part}"
        if stacked:
            scale, lines = format_array(a, digits, fixed=True)
            label = f"{label} {scale}".strip()
            body = TextArea("\n".join(lines), textprops={
                "family": "monospace", "size": _DATA_PT, "linespacing": 1.25, "gid": gid})
        else:
            label = f"‖{name if part == 'value' else label}‖ = {_number(np.linalg.norm(a), digits)}"
            body = DrawingArea(_MAP_PT, _MAP_PT if a.ndim == 2 else _STRIP_PT)
            image = BboxImage(body.get_window_extent, cmap="RdBu_r", interpolation="nearest",
                              norm=CenteredNorm(0, float(np.max(np.abs(a))) or 1.0), gid=gid)
            image.set_data(np.atleast_2d(a))
            body.add_artist(image)
            body.add_artist(Rectangle((0, 0), body.width, body.height, fill=False,
                                      linewidth=0.5, edgecolor="#777777"))
        label = TextArea(label, textprops={"size": _LABEL_PT, "color": "#444444",
                                           "gid": f"{gid}/label"})
        parts.append(VPacker(children=[label, body], sep=2))
    shape = "" if value.ndim == 0 else f" = {value.shape}"
    heading = f"{_with_target(_ALL_NODES[name][0], target)}   {_SHAPES[name]}{shape}"
    title = TextArea(heading, textprops={"size": _TITLE_PT, "weight": "bold",
                                         "gid": f"{name}/title"})
    # Numbers (and scalars) stacked, heat maps side by side.
    columns = VPacker(children=parts, sep=4) if stacked else HPacker(children=parts, sep=9)
    return AnnotationBbox(VPacker(children=[title, columns], sep=4, pad=5), (0, 0),
                          box_alignment=(0.5, 0.5), annotation_clip=False, zorder=1, bboxprops={
                              "boxstyle": "round,pad=0,rounding_size=0.3", "gid": f"{name}/box",
                              "facecolor": _FILL[_ALL_NODES[name][1]], "edgecolor": "#777777",
                              "linewidth": 0.8})


def _layout(canvas: Any, grow_only: bool, boxes: dict[str, Any], labels: list[Any],
            edges: tuple[tuple[str, str, str], ...]) -> dict:
    """Places the boxes; returns each one's room (left, top, width, height), inches from top left.

    Each column (row) of ``NODES`` (and ``TARGET_NODE`` if boxed) is as wide (tall) as its
    largest box, with 15% to spare in width (hinting draws text up to that much wider at
    another dpi), and a column holds a vertical arrow's label beside its centre; each box is
    centred in its cell; a gap between columns fits the widest arrow label crossing it. The root
    figure is sized (or only enlarged) to hold it all; ``canvas`` speaks those inches.
    """
    from matplotlib.backends.backend_agg import RendererAgg

    fig, root = canvas.get_figure(root=False), canvas.get_figure(root=True)
    renderer = RendererAgg(1, 1, root.dpi)
    size = {n: b.get_window_extent(renderer).size / root.dpi * (1.15, 1) for n, b in boxes.items()}
    colw, rowh, gaps = [0.0] * 5, [0.0] * 3, [_GAP_X] * 4
    cells = {name: _ALL_NODES[name][2] for name in boxes}  # name: (column, row)
    for name, (c, r) in cells.items():
        colw[c], rowh[r] = max(colw[c], size[name][0]), max(rowh[r], size[name][1])
    for (src, dst, _), label in zip(edges, labels, strict=True):
        (c0, _), (c1, _), width = cells[src], cells[dst], label.get_window_extent(renderer).width
        if c1 == c0 + 1:
            gaps[c0] = max(gaps[c0], width / root.dpi + 0.45)
        elif c1 == c0:  # its label right of the arrow, inside the column
            colw[c0] = max(colw[c0], 2 * (width / root.dpi + 0.1))
    xs = np.cumsum([0.0] + [w + g for w, g in zip(colw, [*gaps, 0], strict=True)])
    ys = np.cumsum([0.0] + [h + _GAP_Y for h in rowh])
    need = np.array([xs[-1] + 0.3, ys[-1] - _GAP_Y + _HEAD + _FOOT])
    grow = need / (fig.bbox.size / root.dpi)
    root.set_size_inches(root.get_size_inches() * (np.maximum(grow, 1) if grow_only else grow))
    W, H = fig.bbox.size / root.dpi
    canvas.set(xlim=(0, W), ylim=(H, 0))
    ox, oy = (W - xs[-1]) / 2, _HEAD + (H - need[1]) / 2  # the graph centred
    rects = {name: (ox + xs[c] + (colw[c] - size[name][0]) / 2,
                    oy + ys[r] + (rowh[r] - size[name][1]) / 2, *size[name])
             for name, (c, r) in cells.items()}
    for name, (left, top, w, h) in rects.items():
        boxes[name].xybox = (left + w / 2, top + h / 2)
    return rects


def _midway(r0: tuple, r1: tuple) -> np.ndarray:
    """Midway between where the line joining the centres of two rectangles leaves each."""
    c0, c1 = (np.add(r[:2], np.divide(r[2:], 2)) for r in (r0, r1))
    d = np.abs(c1 - c0)
    s0, s1 = (np.divide(r[2:], 2 * d, out=np.full(2, np.inf), where=d > 0).min() for r in (r0, r1))
    return c0 + (s0 + 1 - s1) / 2 * (c1 - c0)


def _checked(params: Any, digits: Any, **optional: Any) -> tuple[Any, int]:
    """``draw_graph``'s params and digits, checked; TypeError for a wrong ``optional`` type."""
    from matplotlib.figure import FigureBase

    params = edge.params(edge.params_input(params))
    digits = edge.check_positive_int(digits, "digits")
    if digits > 15:
        raise ValueError(f"digits must be between 1 and 15, got {digits}")
    kinds = {"numbers": (bool, "a bool"), "title": (str, "a str"),
             "fig": (FigureBase, "a Figure or SubFigure")}
    for arg, value in optional.items():
        if value is not None and not isinstance(value, kinds[arg][0]):
            raise TypeError(f"{arg} must be None or {kinds[arg][1]}, got {type(value).__name__}")
    return params, digits


def _arrows(canvas: Any, boxes: dict[str, Any], labels: list[Any], rects: dict[str, tuple],
            edges: tuple[tuple[str, str, str], ...]) -> None:
    """Each edge's arrow between the placed boxes, its label on it (beside it if vertical)."""
    from matplotlib.patches import FancyArrowPatch

    for (src, dst, _), label in zip(edges, labels, strict=True):
        canvas.add_patch(FancyArrowPatch(  # centre to centre, clipped to the boxes as drawn
            boxes[src].xybox, boxes[dst].xybox, patchA=boxes[src].patch, patchB=boxes[dst].patch,
            arrowstyle="-|>", mutation_scale=9, color="#555555", linewidth=0.9, zorder=2))
        mx, my = _midway(rects[src], rects[dst])
        vertical = _ALL_NODES[src][2][0] == _ALL_NODES[dst][2][0]  # label beside it, else on it
        label.set(position=(mx + 0.06 * vertical, my), ha="left" if vertical else "center")


def draw_graph(params: Any, x: Any, t: Any = None, *, title: str | None = None, digits: int = 3,
               numbers: bool | None = None, fig: Any = None) -> Any:
    """The graph of one sample as a matplotlib figure, each node with its value and gradient.

    Each node of ``NODES`` shows its shape, its value and dL/d(node) (``node_values``); the
    arrows (``EDGES``) point forward, each labelled with its backward rule (g• = dL/d•).

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      x: one sample, shape (D,).
      t: its target (O,), None for 0; with one, L = ||w - t||^2, gw = 2 g (w - t), and the
        node t (``TARGET_NODE``, its value and gt = -gw) joins L by ``TARGET_EDGE``.
      title: the figure's title; default: the loss.
      digits: decimals of every number drawn (entries, norms, the default title's L), each
        array written plainly when its largest |entry| lies in [0.1, 10), else with a
        common ×10ᵉ (``format_array(..., fixed=True)``).
      numbers: print every entry (default when D, H, O <= 3); False: norms and heat maps
        instead (red > 0, blue < 0, each array scaled to its own largest |entry|).
      fig: a ``Figure`` or ``SubFigure`` (e.g. of ``fig.subfigures(2, 1)``, to show two
        states) to draw into, enlarged to fit; default: a new one of the graph's size.

    Returns:
      The figure drawn into; gids: "x/box", "x/title", "x/value", "x/grad" (a text, or
      a heat map's BboxImage), "x/value/label" ..., "edge/x/y" ..., "title", "key" (with a
      target also "t/box" ..., "edge/t/L").
    """
    params, digits = _checked(params, digits, numbers=numbers, title=title, fig=fig)
    import matplotlib.pyplot as plt

    (H, D), O = params.A.shape, params.C.shape[0]
    numbers = max(D, H, O) <= 3 if numbers is None else numbers
    vals = node_values(params, x, t)
    grow_only, fig = fig is not None, plt.figure() if fig is None else fig
    canvas = fig.add_axes((0, 0, 1, 1), frame_on=False, xticks=[], yticks=[])  # unseen, all fig
    target = t is not None
    edges = (*EDGES, TARGET_EDGE) if target else EDGES
    boxes = {n: canvas.add_artist(_node_box(n, *vals[n], numbers, digits, target))
             for n in (_ALL_NODES if target else NODES)}
    labels = [canvas.text(0, 0, _with_target(rule, target), fontsize=_EDGE_PT,
                          color="#24529b", va="center", zorder=4, gid=f"edge/{a}/{b}",
                          bbox={"boxstyle": "round,pad=0.15", "color": "w"})
              for a, b, rule in edges]
    _arrows(canvas, boxes, labels, _layout(canvas, grow_only, boxes, labels, edges), edges)
    default = f"The ABC graph for one sample: L = {_number(vals['L'][0], digits)}"
    fig.suptitle(default if title is None else title, fontsize=10, gid="title")
    key = ("Arrows: the forward pass. On each arrow, in blue: the rule that carries the gradient "
           "back along it (g• = ∂L/∂•, g = ∂L/∂L = 1)." + ("" if numbers else " Heat maps: red "
           "> 0, blue < 0, each scaled to its own largest |entry|."))
    fig.text(0.5, 0.02, key, ha="center", va="bottom", fontsize=_LABEL_PT + 0.5, color="#444444",
             gid="key")
    return fig
