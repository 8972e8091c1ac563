"""draw_graph: the figure shows the numbers forward and manual_vjp compute, readably."""

import math
import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.image import BboxImage, imread
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Text

import abc_jax
from abc_jax import files as io
from abc_jax import graph
from tests._reference import make_problem, ref_loss, ref_sigmoid

NAMES = ("x", "A", "B", "C", "y", "u", "v", "z", "w", "L")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _problem(D, H, O, dtype=jnp.float64, seed=0):
    params, X = make_problem(seed, D, H, O, 1, dtype)
    return params, X[0]


def _expected(params, x, t=None):
    """{node: (value, dL/dnode)}: forward and manual_vjp where they return it, else jax.grad.

    y, v and the node cotangents gx, gy, gu, gv, gz, gw are not returned by the
    package's functions; they come from jax.grad of the independent reference
    loss written as a function of that node.
    """
    A, B, C = params
    L, res = abc_jax.forward(params, x, t)
    g = abc_jax.manual_vjp(params, res)
    t0 = 0.0 if t is None else t
    y, v = jnp.einsum("hd,d->h", A, x), jnp.einsum("hd,d->h", B, x)
    u = ref_sigmoid(y)

    def through_w(w):
        return jnp.sum((w - t0) ** 2)

    def through_z(z):
        return through_w(jnp.einsum("oh,h->o", C, z))

    vals = {
        "x": (res.x, jax.grad(ref_loss, argnums=1)(params, x, t0)),
        "A": (A, g.A), "B": (B, g.B), "C": (C, g.C),
        "y": (y, jax.grad(lambda y: through_z(ref_sigmoid(y) + v))(y)),
        "u": (res.u, jax.grad(lambda u: through_z(u + v))(u)),
        "v": (v, jax.grad(lambda v: through_z(u + v))(v)),
        "z": (res.z, jax.grad(through_z)(res.z)),
        "w": (res.w, jax.grad(through_w)(res.w)),
        "L": (L, jnp.ones(())),
    }
    return {k: (np.asarray(a, np.float64), np.asarray(b, np.float64)) for k, (a, b) in
            vals.items()}


def _texts(fig):
    return {t.get_gid(): t.get_text() for t in fig.findobj(Text) if t.get_gid()}


_POWER = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")


def _read_numbers(texts, name, part):
    """The entries printed for node ``name`` ('value' or 'grad'), times the label's ×10ⁿ."""
    label = texts[f"{name}/{part}/label"]
    power = re.search("\N{MULTIPLICATION SIGN}10([⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)", label)
    scale = 10.0 ** int(power.group(1).translate(_POWER)) if power else 1.0
    rows = [[float(s) for s in line.split()] for line in texts[f"{name}/{part}"].splitlines()]
    return np.array(rows) * scale


def _print_tolerance(expected, digits):
    """Half a unit in the last printed digit (the largest entry has ``digits`` digits)."""
    m = float(np.max(np.abs(expected)))
    e = math.floor(math.log10(m)) if m > 0 else 0
    decimals = max(0, digits - 1 - e) if -1 <= e <= 2 else digits - 1 - e
    return 0.5 * 10.0**-decimals * (1 + 1e-9) + 1e-6 * m


@pytest.mark.parametrize("dtype", [jnp.float64, pytest.param(jnp.float32,
                                                           marks=pytest.mark.integration)])
@pytest.mark.parametrize("digits", [3, 6])
def test_printed_numbers_are_forward_and_manual_vjp(dtype, digits):
    params, x = _problem(3, 2, 1, dtype)  # D, H, O distinct and <= 3: numbers are printed
    fig = abc_jax.draw_graph(params, x, digits=digits)
    texts = _texts(fig)
    for name, (value, grad) in _expected(params, x).items():
        for part, want in (("value", value), ("grad", grad)):
            got = _read_numbers(texts, name, part)
            assert got.size == want.size, (name, part, texts[f"{name}/{part}"])
            np.testing.assert_allclose(
                got.ravel(), want.ravel(), rtol=0, atol=_print_tolerance(want, digits),
                err_msg=f"{name} {part}")
        assert f"{tuple(value.shape)}" in texts[f"{name}/title"] or value.ndim == 0


def test_node_values_match_the_oracles_to_rounding():
    params, x = _problem(4, 3, 2)
    got = graph.node_values(params, x)
    for name, (value, grad) in _expected(params, x).items():
        np.testing.assert_allclose(got[name][0], value, rtol=1e-13, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(got[name][1], grad, rtol=1e-12, atol=1e-15, err_msg=name)


def test_with_a_target_the_values_gradients_and_rules_follow_it():
    params, x = _problem(4, 3, 2)
    t = jnp.asarray([0.7, -1.3])
    got = graph.node_values(params, x, t)
    for name, (value, grad) in _expected(params, x, t).items():
        np.testing.assert_allclose(got[name][0], value, rtol=1e-13, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(got[name][1], grad, rtol=1e-12, atol=1e-15, err_msg=name)
    assert not np.allclose(got["w"][1], graph.node_values(params, x)["w"][1])
    texts = _texts(abc_jax.draw_graph(params, x, t))
    assert texts["edge/w/L"] == "gw = 2 g (w − t)"  # noqa: RUF001
    assert texts["L/title"].startswith("L = ‖w − t‖²")  # noqa: RUF001
    with pytest.raises(ValueError, match=r"t must have O = 2 entries"):
        graph.node_values(params, x, jnp.ones(3))


@pytest.mark.integration  # a whole figure drawn and laid out
def test_heat_maps_carry_the_arrays_and_their_norms():
    params, x = _problem(5, 4, 2)  # D > 3: norms and heat maps
    fig = abc_jax.draw_graph(params, x)
    texts = _texts(fig)
    images = {im.get_gid(): im for im in fig.findobj(BboxImage)}
    for name, (value, grad) in _expected(params, x).items():
        for part, want in (("value", value), ("grad", grad)):
            if name == "L":  # a scalar stays a number
                np.testing.assert_allclose(_read_numbers(texts, name, part).ravel(),
                                           want.ravel(), atol=_print_tolerance(want, 3))
                continue
            shown = np.asarray(images[f"{name}/{part}"].get_array())
            np.testing.assert_allclose(shown, np.atleast_2d(want), rtol=1e-12, atol=1e-15)
            norm = float(texts[f"{name}/{part}/label"].split("=")[-1])
            assert norm == pytest.approx(np.linalg.norm(want), rel=5e-3)
    assert "Heat maps" in texts["key"]


def test_every_edge_carries_its_backward_rule():
    texts = _texts(abc_jax.draw_graph(*_problem(3, 3, 3)))
    rules = {k: v for k, v in texts.items() if k.startswith("edge/")}
    assert rules == {f"edge/{a}/{b}": r for a, b, r in graph.EDGES}
    assert rules["edge/y/u"] == "gy = gu ⊙ u ⊙ (1 − u)"  # noqa: RUF001
    assert rules["edge/C/w"] == "gC = gw zᵀ"
    assert "L = " in texts["title"]


@pytest.mark.integration  # a whole figure drawn and laid out
@pytest.mark.parametrize("shape, numbers", [((3, 3, 3), None), ((5, 4, 2), True),
                                            ((8, 6, 4), None), ((64, 64, 64), None)])
def test_nothing_overlaps(shape, numbers):
    """No two texts or heat maps overlap, each sits in its node's box, arrow labels miss boxes."""
    fig = abc_jax.draw_graph(*_problem(*shape), numbers=numbers)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    items = {t.get_gid(): t.get_window_extent(renderer)
             for t in fig.findobj(Text) if t.get_gid() and t.get_text()}
    items.update({im.get_gid(): im.get_window_extent(renderer)
                  for im in fig.findobj(BboxImage)})  # the heat maps
    boxes = {p.get_gid().split("/")[0]: p.get_window_extent(renderer)
             for p in fig.findobj(FancyBboxPatch) if (p.get_gid() or "").endswith("/box")}
    assert set(boxes) == set(NAMES)
    items = sorted((g, e.padded(-0.5)) for g, e in items.items())
    for i, (g1, e1) in enumerate(items):
        for g2, e2 in items[i + 1:]:
            assert not e1.overlaps(e2), (g1, g2)
        name = g1.split("/")[0]
        if name in boxes:
            box = boxes[name]
            assert box.x0 <= e1.x0 and e1.x1 <= box.x1 and box.y0 <= e1.y0 and e1.y1 <= box.y1, g1
        elif g1.startswith("edge/"):
            assert not any(e1.overlaps(b) for b in boxes.values()), g1
    width, height = fig.get_size_inches()
    assert width < 20 and height < 8


@pytest.mark.integration  # a whole figure drawn and laid out
def test_written_whole_and_loads(tmp_path):
    path = io.save_figure(tmp_path / "graph.png", abc_jax.draw_graph(*_problem(3, 2, 1)))
    assert [p.name for p in tmp_path.iterdir()] == ["graph.png"]  # no temporary file left
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


@pytest.mark.integration  # a whole figure drawn and laid out
def test_two_states_in_subfigures(tmp_path):
    p0, x = _problem(3, 3, 3)
    p1 = jax.tree.map(lambda a: 0.5 * a, p0)
    fig = plt.figure(figsize=(4, 3))
    top, bottom = fig.subfigures(2, 1)
    assert abc_jax.draw_graph(p0, x, fig=top, title="start") is top
    abc_jax.draw_graph(p1, x, fig=bottom, title="end")
    width, height = fig.get_size_inches()
    alone = abc_jax.draw_graph(p0, x).get_size_inches()
    assert width >= alone[0] - 1e-9 and height >= 2 * alone[1] - 1e-9  # enlarged to fit both
    titles = [t.get_text() for t in fig.findobj(Text) if t.get_gid() == "title"]
    assert sorted(titles) == ["end", "start"]
    L = [float(t.get_text()) for t in fig.findobj(Text) if t.get_gid() == "L/value"]
    assert L == pytest.approx([float(abc_jax.loss(p, x)) for p in (p0, p1)], rel=5e-3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"params": "abc"}, TypeError, "params"),
    ({"x": jnp.ones(4)}, ValueError, "x must have D = 3"),
    ({"x": jnp.ones((1, 3))}, ValueError, "x must be one sample"),
    ({"x": jnp.array([1.0, jnp.nan, 0.0])}, ValueError, "x"),
    ({"x": "123"}, TypeError, "x"),
    ({"digits": "3"}, TypeError, "digits"),
    ({"digits": 0}, ValueError, "digits"),
    ({"digits": 16}, ValueError, "digits"),
    ({"numbers": "yes"}, TypeError, "numbers"),
    ({"title": 3}, TypeError, "title"),
    ({"fig": 42}, TypeError, "fig"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    params, x = _problem(3, 2, 1)
    args = {"params": params, "x": x, **kwargs}
    with pytest.raises(error, match=match):
        abc_jax.draw_graph(args.pop("params"), args.pop("x"), **args)


def test_params_whose_shapes_do_not_chain():
    params, x = _problem(3, 2, 1)
    with pytest.raises(ValueError, match=r"params\.C"):
        abc_jax.draw_graph(abc_jax.Params(params.A, params.B, params.C.T), x)


TIMES = "\N{MULTIPLICATION SIGN}"


@pytest.mark.parametrize("a, scale, lines", [
    (np.array([[-6.713e-4, 1.3e-3], [0.0, -1.0e-5]]), TIMES + "10⁻³",
     ["-0.67   1.30", " 0.00  -0.01"]),
    (np.array([0.893, 0.5624, -0.55]), "", [" 0.893   0.562  -0.550"]),
    (np.array(1.0554), "", ["1.06"]),
    (np.array([1234.0, -5.0]), TIMES + "10³", [" 1.23  -0.01"]),
    (np.zeros(2), "", ["0.00  0.00"]),
])
def test_format_array(a, scale, lines):
    assert graph.format_array(a, 3) == (scale, lines)


@pytest.mark.parametrize("shape, scale", [((3, 3, 3), 1.0), ((3, 3, 3), 50.0), ((5, 4, 2), 1.0)])
@pytest.mark.parametrize("digits", [2, 4])
def test_every_number_drawn_has_digits_decimals(shape, scale, digits):
    """Entries, norms (heat maps) and the default title's L: ``digits`` decimals each."""
    params, x = _problem(*shape)
    params = jax.tree.map(lambda a: scale * a, params)  # scale 50: arrays written with ×10ᵉ
    texts = _texts(abc_jax.draw_graph(params, x, digits=digits))
    drawn = {g: s for g, s in texts.items()
             if g == "title" or g.endswith(("/value", "/grad", "/value/label", "/grad/label"))}
    drawn = {g: re.sub(TIMES + "10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+", "", s) for g, s in drawn.items()}  # ×10ᵉ
    numbers = [(g, n) for g, s in drawn.items() for n in re.findall(r"\d+(?:\.\d+)?", s)]
    assert len(numbers) > 10 and any(g == "title" for g, _ in numbers)
    for gid, n in numbers:
        assert len(n.partition(".")[2]) == digits, (gid, n, texts[gid])


@pytest.mark.integration  # two whole figures drawn
@pytest.mark.parametrize("numbers", [False, True])
def test_the_target_is_a_node_in_both_modes(numbers):
    """With t, node t shows t and gt = -gw (a heat map, or numbers), its edge to L its rule."""
    params, x = _problem(5, 4, 2)
    t = jnp.asarray([0.7, -1.3])
    fig = abc_jax.draw_graph(params, x, t, numbers=numbers)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    boxes = {p.get_gid().split("/")[0]: p.get_window_extent(renderer)
             for p in fig.findobj(FancyBboxPatch) if (p.get_gid() or "").endswith("/box")}
    assert set(boxes) == {*NAMES, "t"}
    gw = _expected(params, x, t)["w"][1]
    images = {im.get_gid(): im for im in fig.findobj(BboxImage)}
    texts = _texts(fig)
    for part, want in (("value", np.asarray(t)), ("grad", -gw)):
        if numbers:
            got = _read_numbers(texts, "t", part).ravel()
            np.testing.assert_allclose(got, want, atol=_print_tolerance(want, 3))
        else:
            shown = np.asarray(images[f"t/{part}"].get_array())
            np.testing.assert_allclose(shown, np.atleast_2d(want), rtol=1e-12, atol=1e-15)
    assert texts["t/title"].startswith("t") and texts["edge/t/L"] == graph.TARGET_EDGE[2]
    label = next(t for t in fig.findobj(Text) if t.get_gid() == "edge/t/L")
    extent, whole = label.get_window_extent(renderer), fig.bbox
    assert not any(extent.overlaps(b) for b in boxes.values())
    assert whole.x0 <= extent.x0 and extent.x1 <= whole.x1
