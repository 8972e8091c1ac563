"""The edge (``abc_jax.edge``): what a user passes meets it once; the tests mirror its
contracts, not every input x function (the training arguments: test_config.py).

1. One case per rule of the edge (``abc_jax.edge``) and of the training engine's
   argument checks (``engine.arguments``, ``engine.train``, the steps), each on
   one representative public function: a ``ValueError``/``TypeError`` raised by
   abc_jax's own code, its message starting with the argument's name and saying
   what was expected, before anything compiles (at most the tiny conversions of
   an input to a JAX array).
2. One routing case per public function: a bad X (or x, or residuals) raises the
   edge's named message, so the function goes through the edge.
3. Values: opt-in for the array functions (``abc_jax.value_checks()``), which then
   name a NaN/inf and its position, bad weights, an overflow; without the switch a
   NaN flows through and nothing waits for the device; training always checks.
4. Inside a caller's ``jax.jit``/``vmap`` the shape checks still raise named errors.
"""


import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import CONVERSIONS, compilations, exactly, raises_before_compiling
from hypothesis import given, settings

import abc_jax
from abc_jax import Batch, Params, Residuals, edge

D, H, O, N = 5, 4, 3, 6  # all different


def problem(dtype=np.float64, seed=0):
    """Params (JAX arrays) and X (N, D) (a NumPy array), made without compiling anything."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) / 2).astype(dtype)

    return Params(*(jnp.asarray(normal(*s)) for s in [(H, D), (H, D), (O, H)])), normal(N, D)


def with_value(a, index, value):
    a = np.array(a)
    a[index] = value
    return a


def without_x64(call):
    """``call`` with x64 disabled (the tests' conftest enables it)."""
    def run():
        with jax.enable_x64(False):
            return call()
    return run


P, X = problem()
x = X[0]
KEY = jax.random.key(0)
FLOATS = jnp.ones(3)  # an array that is not a key
X_BOOL = jnp.asarray(X) > 0  # a jax.Array of bools
TRAIN = {"lr": 0.1, "epochs": 2, "progress": False}


def case(id_, call, error, message, xfail=None):
    marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
    return pytest.param(call, error, message, id=id_, marks=marks)


# --------------------------------------------------------------- 1. one case per rule

X64 = "needs x64 enabled: call jax.config.update('jax_enable_x64', True) before creating arrays"
PRECISIONS = "('highest', 'high', 'default', 'float32', 'tensorfloat32', 'bfloat16')"
KEY_MSG = "key must be a jax.random key, e.g. jax.random.key(0), got "

DATA_RULES = [  # X, weights, T on batch_grad / batch_loss; x and t on loss
    case("X-rank", lambda: abc_jax.batch_grad(P, x), ValueError,
         f"X must be a batch of shape (N, D) = (N, {D}), got shape ({D},)"),
    case("X-width", lambda: abc_jax.batch_grad(P, X[:, 1:]), ValueError,
         f"X must have D = {D} columns (columns of A), got shape ({N}, {D - 1})"),
    case("X-empty", lambda: abc_jax.batch_grad(P, X[:0]), ValueError,
         f"X must hold at least one sample (N >= 1), got shape (0, {D})"),
    case("X-bool", lambda: abc_jax.batch_grad(P, X > 0), TypeError,
         "X must hold real numbers, got dtype bool"),
    case("X-complex", lambda: abc_jax.batch_grad(P, X + 1j), TypeError,
         "X must hold real numbers, got dtype complex128"),
    case("X-jax-bool", lambda: abc_jax.batch_grad(P, X_BOOL), TypeError,
         "X must hold real numbers, got dtype bool"),
    case("X-str", lambda: abc_jax.batch_grad(P, "1 2 3"), TypeError, "X must be an array, got str"),
    case("X-ragged-list", lambda: abc_jax.batch_grad(P, [[1.0] * D, [1.0] * (D - 1)]), TypeError,
         "X must be an array; its nested lists are ragged"),
    case("weights-shape", lambda: abc_jax.batch_loss(P, Batch(X, np.ones(N + 1))), ValueError,
         f"weights must have shape (N,) = ({N},), one per row of X, got ({N + 1},)"),
    case("T-shape", lambda: abc_jax.batch_loss(P, Batch(X, None, np.ones((N, O - 1)))),
         ValueError, f"T must have shape (N, O) = ({N}, {O}), one target of C's O = {O} rows "
                     f"per row of X, got ({N}, {O - 1})"),
    case("x-rank", lambda: abc_jax.loss(P, X[:2]), ValueError,
         f"x must be one sample of shape (D,) = ({D},), got shape (2, {D})"),
    case("x-width", lambda: abc_jax.loss(P, x[1:]), ValueError,
         f"x must have D = {D} entries (columns of A), got shape ({D - 1},)"),
    case("t-float", lambda: abc_jax.loss(P, x, 0.5), TypeError,
         "t must be one target array of shape (O,) or None, got float 0.5"),
    case("t-width", lambda: abc_jax.loss(P, x, np.ones(O + 1)), ValueError,
         f"t must have O = {O} entries (rows of C), got shape ({O + 1},)"),
]

PARAMS_RULES = [  # on batch_loss (train_many for a list of Params)
    case("dict", lambda: abc_jax.batch_loss(P._asdict(), X), TypeError,
         "params must be Params(A, B, C), got a dict: use abc_jax.Params(**d)"),
    case("2-tuple", lambda: abc_jax.batch_loss(P[:2], X), TypeError,
         "params must be Params(A, B, C) (a 3-tuple of arrays), got tuple"),
    case("C-not-chaining", lambda: abc_jax.batch_loss(P._replace(C=np.ones((O, H + 1))), X),
         ValueError, f"params.C must be (O, H) with H = {H} (rows of A), got shape "
                     f"({O}, {H + 1}): the shapes of A, B, C do not chain"),
    case("B-not-A", lambda: abc_jax.batch_loss(P._replace(B=np.ones((H, D + 1))), X),
         ValueError, f"params.B must have the shape of A, (H, D) = ({H}, {D}), got ({H}, {D + 1})"),
    case("rank-1", lambda: abc_jax.batch_loss(P._replace(A=np.ones(H * D)), X), ValueError,
         f"params.A must be a matrix (rank 2), got shape ({H * D},)"),
    case("int", lambda: abc_jax.batch_loss(Params(*(np.ones(a.shape, np.int32) for a in P)), X),
         TypeError, "params.A must have a floating dtype, got int32"),
    case("mixed-dtypes", lambda: abc_jax.batch_loss(P._replace(C=np.ones((O, H), np.float32)), X),
         TypeError, "params.A, .B, .C must share one dtype, got "),
    case("empty", lambda: abc_jax.batch_loss(Params(np.ones((0, D)), np.ones((0, D)),
                                                    np.ones((O, 0))), X),
         ValueError, f"params dimensions must be >= 1, got D={D}, H=0, O={O}"),
    case("float64-without-x64", without_x64(lambda: abc_jax.batch_loss(P, X)), ValueError,
         "params dtype float64 " + X64),
]

NUMBER_RULES = [  # precision, chunk_size and eps of the array functions; init_params
    case("precision-name", lambda: abc_jax.batch_grad(P, X, precision="fast"), ValueError,
         f"precision must be None or one of {PRECISIONS}, got 'fast'"),
    case("precision-type", lambda: abc_jax.batch_grad(P, X, precision=1), TypeError,
         f"precision must be None or one of {PRECISIONS}, got int"),
    *[case(f"chunk_size-{i}", lambda v=v: abc_jax.batch_grad(P, X, chunk_size=v), err, msg)
      for i, v, err, msg in [("0", 0, ValueError, "chunk_size must be >= 1, got 0"),
                             ("-2", -2, ValueError, "chunk_size must be >= 1, got -2"),
                             ("float", 2.5, TypeError, "chunk_size must be an int, got float"),
                             ("bool", True, TypeError, "chunk_size must be an int, got bool"),
                             ("str", "4", TypeError, ("chunk_size", "'auto'", "got str '4'"))]],
    *[case(f"eps-{i}", lambda v=v: abc_jax.fd_grad(P, X, v), err, msg)
      for i, v, err, msg in [
          ("0", 0.0, ValueError, "eps must be a finite number > 0, got 0.0"),
          ("nan", np.nan, ValueError, "eps must be a finite number > 0, got nan"),
          ("str", "1e-3", TypeError, "eps must be a real number, got str '1e-3'"),
          ("bool", True, TypeError, "eps must be a real number, got bool True")]],
    *[case(f"init_params-{i}", lambda kw=kw: abc_jax.init_params(**({"key": KEY, "in_dim": 3}
                                                                     | kw)), err, msg)
      for i, kw, err, msg in [
          ("in_dim-0", {"in_dim": 0}, ValueError, "in_dim must be >= 1, got 0"),
          ("in_dim-str", {"in_dim": "3"}, TypeError, "in_dim must be an int, got str"),
          ("hidden_dim-bool", {"hidden_dim": True}, TypeError,
           "hidden_dim must be an int, got bool"),
          ("out_dim--1", {"out_dim": -1}, ValueError, "out_dim must be >= 1, got -1"),
          ("key-int", {"key": 0}, TypeError, KEY_MSG + "int"),
          ("key-None", {"key": None}, TypeError, KEY_MSG + "NoneType"),
          ("dtype-int32", {"dtype": jnp.int32}, TypeError,
           "dtype must be a floating dtype, got int32"),
          ("dtype-name", {"dtype": "fast"}, TypeError,
           "dtype must be a floating dtype, got 'fast'")]],
    case("init_params-float64-without-x64",
         without_x64(lambda: abc_jax.init_params(KEY, 3, dtype=jnp.float64)), ValueError,
         "dtype float64 " + X64),
]


OTHER_RULES = [  # manual_vjp's residuals and g; shard_batch's own checks
    case("residuals-u-shape", lambda: abc_jax.manual_vjp(P, Residuals(
        x, np.ones(H + 1), np.ones(H), np.ones(O), None)), ValueError,
         f"residuals.u must have H = {H} entries (params), got shape ({H + 1},)"),
    case("residuals-a-tuple", lambda: abc_jax.manual_vjp(P, (x, np.ones(H), np.ones(H),
                                                              np.ones(O), None)), TypeError,
         "residuals must be the Residuals that forward returns, got tuple"),
    case("g-not-scalar", lambda: abc_jax.manual_vjp(P, Residuals(
        x, np.ones(H), np.ones(H), np.ones(O), None), np.ones(2)), ValueError,
         "g must be a scalar, the cotangent of the scalar loss L, got shape (2,)"),
    case("g-str", lambda: abc_jax.manual_vjp(P, Residuals(
        x, np.ones(H), np.ones(H), np.ones(O), None), "1.0"), TypeError, "g must be"),
    case("shard_batch-rank", lambda: abc_jax.shard_batch(x), ValueError,
         f"X must be a batch of shape (N, D), got shape ({D},)"),
    case("shard_batch-mesh", lambda: abc_jax.shard_batch(X, mesh="data"), TypeError,
         "mesh must be a jax.sharding.Mesh, got str"),
    case("shard_batch-str", lambda: abc_jax.shard_batch("1 2 3"), TypeError,
         "X must be an array, got str"),
    case("shard_batch-ragged-list", lambda: abc_jax.shard_batch([[1.0, 2.0], [3.0]]), TypeError,
         "X must be an array; its nested lists are ragged"),
]


@pytest.mark.parametrize("call,error,message",
                         DATA_RULES + PARAMS_RULES + NUMBER_RULES + OTHER_RULES)
def test_bad_input_is_named(call, error, message):
    raises_before_compiling(call, error, message)


def test_one_dimensional_targets_are_one_output():
    params = P._replace(C=P.C[:1])  # O = 1
    T = np.linspace(-1.0, 1.0, N)
    got = abc_jax.batch_loss(params, Batch(X, None, T))
    assert got == abc_jax.batch_loss(params, Batch(X, None, T[:, None]))


@settings(deadline=None, max_examples=20, database=None)
@given(dims=st.tuples(*[st.integers(1, 6)] * 4), off=st.integers(1, 3))
def test_shape_messages_name_the_dimensions(dims, off):
    # Any D, H, O: a width D + off and a C of H + off columns are named with their
    # numbers; tracing stops at the check, so no shape here compiles anything.
    d, h, o, n = dims
    params = Params(np.ones((h, d)), np.ones((h, d)), np.ones((o, h)))
    raises_before_compiling(lambda: abc_jax.batch_grad(params, np.ones((n, d + off))),
                            ValueError, f"X must have D = {d} columns (columns of A), "
                                        f"got shape ({n}, {d + off})")
    raises_before_compiling(lambda: abc_jax.loss(params._replace(C=np.ones((o, h + off))),
                                                 np.ones(d)),
                            ValueError, f"params.C must be (O, H) with H = {h} (rows of A), got "
                                        f"shape ({o}, {h + off})")


def test_the_compile_monitor_sees_a_valid_call_compile():
    # The control for "nothing compiled" above: shapes no other call uses.
    rng = np.random.default_rng(1)
    params = Params(*(rng.normal(size=s) for s in [(2, 11), (2, 11), (7, 2)]))
    with compilations() as compiled:
        out = abc_jax.batch_grad(params, rng.normal(size=(3, 11)))
    assert set(compiled) - CONVERSIONS, f"a first call at new shapes compiled only {compiled}"
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in out)


# --------------------------------------------------------------- 2. routing

X_WIDTH = f"X must have D = {D} columns (columns of A), got shape ({N}, {D - 1})"
x_WIDTH = f"x must have D = {D} entries (columns of A), got shape ({D - 1},)"
BAD_X, BAD_x = X[:, 1:], x[1:]
SAMPLE_ROUTES = {
    "forward": lambda: abc_jax.forward(P, BAD_x),
    "loss": lambda: abc_jax.loss(P, BAD_x),
    "abc_loss": lambda: abc_jax.abc_loss(P, BAD_x),
    "abc_loss_jvp": lambda: abc_jax.abc_loss_jvp(P, BAD_x),
    "manual_grad": lambda: abc_jax.manual_grad(P, BAD_x),
    "manual_jvp": lambda: abc_jax.manual_jvp(P, BAD_x, P),
    "draw_graph": lambda: abc_jax.draw_graph(P, BAD_x),
}
BATCH_ROUTES = {
    "batch_loss": lambda: abc_jax.batch_loss(P, BAD_X),
    "batch_grad": lambda: abc_jax.batch_grad(P, BAD_X),
    "batch_value_and_grad": lambda: abc_jax.batch_value_and_grad(P, BAD_X),
    "per_sample_grads": lambda: abc_jax.per_sample_grads(P, BAD_X),
    "predict": lambda: abc_jax.predict(P, BAD_X),
    "oracle_grad": lambda: abc_jax.oracle_grad(P, BAD_X),
    "fd_grad": lambda: abc_jax.fd_grad(P, BAD_X),
    "batch_jvp": lambda: abc_jax.batch_jvp(P, BAD_X, P),
    "jvp_grad": lambda: abc_jax.jvp_grad(P, BAD_X),
    "ggn_vp": lambda: abc_jax.ggn_vp(P, BAD_X, P),
    "hvp": lambda: abc_jax.hvp(P, BAD_X, P),
    "train": lambda: abc_jax.train(P, BAD_X, **TRAIN),
    "train_many": lambda: abc_jax.train_many(P, BAD_X, members=2, **TRAIN),
    "train_per_sample": lambda: abc_jax.train_per_sample(P, BAD_X, **TRAIN),
    "cross_validate": lambda: abc_jax.cross_validate(P, BAD_X, **TRAIN),
}
ROUTES = [
    *[pytest.param(call, x_WIDTH, id=f) for f, call in SAMPLE_ROUTES.items()],
    *[pytest.param(call, X_WIDTH, id=f) for f, call in BATCH_ROUTES.items()],
    pytest.param(lambda: abc_jax.manual_vjp(P, Residuals(BAD_x, np.ones(H), np.ones(H),
                                                         np.ones(O), None)),
                 f"residuals.x must have D = {D} entries (params), got shape ({D - 1},)",
                 id="manual_vjp"),
]


@pytest.mark.parametrize("call,message", ROUTES)
def test_every_public_function_goes_through_the_edge(call, message):
    raises_before_compiling(call, ValueError, message)


# --------------------------------------------------------------- 3. values

# (function, where the NaN is, its index): X and x hold a second bad entry (an inf) after it.
NAN_AT = [("batch_grad", "params.A", (1, 2)), ("batch_grad", "X", (2, 3)),
          ("batch_grad", "T", (0, 1)), ("batch_grad", "weights", (4,)),
          ("loss", "params.C", (1, 2)), ("loss", "x", (2,)), ("loss", "t", (1,))]


@pytest.mark.parametrize("fn,where,index", NAN_AT, ids=[f"{f}-{w}" for f, w, _ in NAN_AT])
def test_with_value_checks_a_nan_is_named_with_its_position(fn, where, index):
    arrays = {"params.A": P.A, "params.C": P.C, "X": X, "T": np.zeros((N, O)),
              "weights": np.ones(N), "x": x, "t": np.zeros(O)}
    bad = with_value(arrays[where], index, np.nan)
    count = 1
    if where in ("X", "x"):
        bad, count = with_value(bad, (-1,) * bad.ndim, np.inf), 2
    arrays[where] = bad
    params = Params(arrays["params.A"], P.B, arrays["params.C"])
    first = f"{where}[{', '.join(map(str, index))}]"
    message = f"{where} must be finite: it holds {count} NaN/inf value(s), first {first} is nan"
    with abc_jax.value_checks(), pytest.raises(ValueError, match=exactly(message) + "$"):
        if fn == "batch_grad":
            abc_jax.batch_grad(params, Batch(arrays["X"], arrays["weights"], arrays["T"]))
        else:
            abc_jax.loss(params, arrays["x"], arrays["t"])


def test_with_value_checks_negative_or_all_zero_weights_are_named():
    with abc_jax.value_checks():
        with pytest.raises(ValueError, match=exactly("weights must be >= 0, got min -1.0")):
            abc_jax.batch_loss(P, Batch(X, with_value(np.ones(N), 2, -1.0)))
        with pytest.raises(ValueError, match=exactly(
                "weights must not all be 0: the weighted mean needs sum(w) > 0")):
            abc_jax.batch_loss(P, Batch(X, np.zeros(N)))


def overflowing():
    """Finite float32 params and X whose loss overflows float32 (|w| ~ 1e20, L ~ 1e40)."""
    params, X32 = problem(np.float32)
    return params, X32 * np.float32(1e20)


def test_with_value_checks_an_overflow_suggests_float64():
    params, X32 = overflowing()
    with abc_jax.value_checks(), pytest.raises(FloatingPointError) as info:
        abc_jax.batch_loss(params, X32)
    message = str(info.value)
    assert message.startswith("the result is not finite although params and X are: it "
                              "overflows float32"), message
    assert message.endswith("Rescale X (or the params), or use float64 (jax.config.update("
                            "'jax_enable_x64', True) and float64 params)"), message


def test_without_the_switch_nothing_waits_and_a_nan_flows_through(monkeypatch):
    def waited(*args, **kwargs):
        raise AssertionError("an eager call without value_checks() checked values")

    monkeypatch.setattr(edge, "check_values", waited)
    assert not edge.values_checked()
    grads = abc_jax.batch_grad(P, with_value(X, (2, 3), np.nan))
    assert all(np.isnan(np.asarray(g)).any() for g in grads)
    assert np.isnan(abc_jax.loss(P, with_value(x, 2, np.nan)))
    assert np.isnan(abc_jax.batch_loss(P, Batch(X, np.zeros(N))))  # 0 / 0
    assert not np.isfinite(abc_jax.batch_loss(*overflowing()))


# --------------------------------------------------------------- 4. inside jit and vmap


def test_inside_a_callers_jit_or_vmap_shapes_are_still_checked():
    with pytest.raises(ValueError, match=exactly(X_WIDTH)):
        jax.jit(abc_jax.batch_grad)(P, BAD_X)
    with pytest.raises(ValueError, match=exactly(x_WIDTH)):
        jax.vmap(abc_jax.loss, in_axes=(None, 0))(P, X[:, 1:])
    with pytest.raises(ValueError, match=exactly(f"params.C must be (O, H) with H = {H}")):
        jax.jit(abc_jax.manual_grad)(P._replace(C=jnp.ones((O, H + 1))), x)
    with pytest.raises(TypeError, match=exactly("train runs its own compiled loop: call it "
                                                "outside jax.jit/vmap/grad")):
        jax.jit(lambda X: abc_jax.train(P, X, **TRAIN))(X)
    with abc_jax.value_checks():  # values are unknown while tracing: a NaN flows through
        assert np.isnan(jax.jit(abc_jax.batch_loss)(P, with_value(X, (0, 0), np.nan)))
