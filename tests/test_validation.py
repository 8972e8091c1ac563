"""Bad input raises a ValueError or TypeError that names the argument.

Shape, rank and dtype checks run in Python before anything is traced, so they
also fire inside a caller's ``jax.jit``. The NaN/inf check on the data needs
values: it runs on concrete arrays only and is skipped under a caller's
transformation, where non-finite data give a non-finite result instead.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import Params

D, H, O, N = 5, 4, 3, 6  # all different


def make_problem(seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)

    def normal(shape):
        return jnp.asarray(rng.standard_normal(shape) / 2, dtype)

    return Params(normal((H, D)), normal((H, D)), normal((O, H))), normal((N, D))


BATCH_FNS = {
    "batch_loss": abc_jax.batch_loss,
    "batch_grad": abc_jax.batch_grad,
    "batch_grad_chunked": functools.partial(abc_jax.batch_grad, chunk_size=4),
    "per_sample_grads": abc_jax.per_sample_grads,
    "oracle_grad": abc_jax.oracle_grad,
    "fd_grad": abc_jax.fd_grad,
}
# Functions of one sample that check the values of x too.
SAMPLE_FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "manual_grad": abc_jax.manual_grad,
}
# abc_loss is meant to be transformed: it checks shapes always, values never.
SAMPLE_SHAPE_FNS = {**SAMPLE_FNS, "abc_loss": abc_jax.abc_loss}
ALL_FNS = {k: (f, "batch") for k, f in BATCH_FNS.items()}
ALL_FNS.update({k: (f, "sample") for k, f in SAMPLE_SHAPE_FNS.items()})

batch_fns = pytest.mark.parametrize("fn", list(BATCH_FNS.values()), ids=list(BATCH_FNS))
sample_fns = pytest.mark.parametrize("fn", list(SAMPLE_FNS.values()), ids=list(SAMPLE_FNS))
sample_shape_fns = pytest.mark.parametrize(
    "fn", list(SAMPLE_SHAPE_FNS.values()), ids=list(SAMPLE_SHAPE_FNS)
)
all_fns = pytest.mark.parametrize("fn,kind", list(ALL_FNS.values()), ids=list(ALL_FNS))


def good_data(kind, X):
    return X if kind == "batch" else X[0]


# ---------------------------------------------------------------- data: shapes


@batch_fns
@pytest.mark.parametrize("shape", [(D,), (), (2, N, D)], ids=["1-D", "0-D", "3-D"])
def test_batch_wrong_rank(fn, shape):
    params, _ = make_problem()
    with pytest.raises(ValueError, match=r"\bX\b.*\(N, D\).*got shape " + re.escape(str(shape))):
        fn(params, jnp.ones(shape))


@sample_shape_fns
@pytest.mark.parametrize("shape", [(N, D), (), (1, 1, D)], ids=["2-D", "0-D", "3-D"])
def test_sample_wrong_rank(fn, shape):
    params, _ = make_problem()
    with pytest.raises(ValueError, match=r"\bx\b.*\(D,\).*got shape " + re.escape(str(shape))):
        fn(params, jnp.ones(shape))


@batch_fns
@pytest.mark.parametrize("d", [D - 1, D + 1])
def test_batch_mismatched_D(fn, d):
    params, _ = make_problem()
    with pytest.raises(ValueError, match=rf"\bX\b.*D = {D}.*got shape \({N}, {d}\)"):
        fn(params, jnp.ones((N, d)))


@sample_shape_fns
def test_sample_mismatched_D(fn):
    params, _ = make_problem()
    with pytest.raises(ValueError, match=rf"\bx\b.*D = {D}.*got shape \({D + 2},\)"):
        fn(params, jnp.ones(D + 2))


@batch_fns
def test_empty_batch(fn):
    params, _ = make_problem()
    with pytest.raises(ValueError, match=rf"\bX\b.*N >= 1.*\(0, {D}\)"):
        fn(params, jnp.ones((0, D)))


@batch_fns
@pytest.mark.parametrize(
    "bad,dtype_name",
    [(np.ones((N, D), bool), "bool"), (np.ones((N, D), np.complex64), "complex64")],
    ids=["bool", "complex"],
)
def test_batch_non_real_dtype(fn, bad, dtype_name):
    params, _ = make_problem()
    with pytest.raises(TypeError, match=rf"\bX\b.*{dtype_name}"):
        fn(params, bad)


@all_fns
def test_data_not_an_array(fn, kind):
    params, _ = make_problem()
    name = "X" if kind == "batch" else "x"
    with pytest.raises(TypeError, match=rf"\b{name}\b.*array"):
        fn(params, "not an array")


# ---------------------------------------------------------------- data: values


def _with(X, index, value):
    X = np.array(X)
    X[index] = value
    return X


@batch_fns
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", [(2, 3), (N - 1, 0)], ids=str)
def test_batch_nonfinite(fn, value, index):
    params, X = make_problem()
    bad = _with(X, index, value)
    i, j = index
    with pytest.raises(ValueError, match=rf"\bX\b.*finite.*X\[{i}, {j}\] is -?(nan|inf)"):
        fn(params, bad)


def test_nonfinite_reports_first_entry_and_count():
    params, X = make_problem()
    bad = _with(_with(X, (4, 1), np.inf), (1, 2), np.nan)
    with pytest.raises(ValueError, match=r"2 NaN/inf.*X\[1, 2\] is nan"):
        abc_jax.batch_grad(params, bad)


def test_nonfinite_in_float64_data_for_float32_params():
    params, X = make_problem(dtype=jnp.float32)
    bad = _with(np.asarray(X, np.float64), (3, 4), np.nan)
    with pytest.raises(ValueError, match=r"X\[3, 4\]"):
        abc_jax.batch_grad(params, bad)


@sample_fns
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_sample_nonfinite(fn, value):
    params, X = make_problem()
    bad = _with(X[0], (2,), value)
    with pytest.raises(ValueError, match=r"\bx\b.*finite.*x\[2\] is (nan|inf)"):
        fn(params, bad)


@all_fns
def test_finite_data_with_finite_result_does_not_raise(fn, kind):
    params, X = make_problem()
    out = fn(params, good_data(kind, X))
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("where", ["params", "X"])
def test_finite_inputs_overflowing_the_dtype_raise_floating_point_error(where):
    # Finite float32 inputs whose loss and gradients overflow: nothing blames
    # X or the params; the error names the overflow and the scales involved.
    params, X = make_problem(dtype=jnp.float32)
    if where == "params":
        params = jax.tree.map(lambda p: p * jnp.float32(1e15), params)
    else:
        X = X * jnp.float32(1e30)
    calls = {
        "batch_loss": lambda: abc_jax.batch_loss(params, X),
        "batch_grad": lambda: abc_jax.batch_grad(params, X),
        "oracle_grad": lambda: abc_jax.oracle_grad(params, X),
        "per_sample_grads": lambda: abc_jax.per_sample_grads(params, X),
        "loss": lambda: abc_jax.loss(params, X[0]),
        "forward": lambda: abc_jax.forward(params, X[0]),
        "manual_grad": lambda: abc_jax.manual_grad(params, X[0]),
    }
    for name, call in calls.items():
        with pytest.raises(FloatingPointError, match=r"overflows float32.*max \|w\|.*float64"):
            call()
            pytest.fail(f"{name} returned a non-finite result without an error")


def test_abc_loss_checks_values_when_called_eagerly_not_when_transformed():
    params, X = make_problem()
    bad = _with(X[0], (1,), np.nan)
    with pytest.raises(ValueError, match=r"x\[1\] is nan"):
        abc_jax.abc_loss(params, bad)
    assert np.isnan(float(jax.jit(abc_jax.abc_loss)(params, bad)))


# ---------------------------------------------------------------- params


def _params_with(field, value):
    params, _ = make_problem()
    return params._replace(**{field: value})


@all_fns
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda p: (p.A, p.B), id="2-tuple"),
        pytest.param(lambda p: (*p, p.C), id="4-tuple"),
        pytest.param(lambda p: p.A, id="array"),
        pytest.param(lambda p: {"A": p.A, "B": p.B, "C": p.C}, id="dict"),
        pytest.param(lambda p: None, id="None"),
    ],
)
def test_params_not_a_3_tuple(fn, kind, bad):
    params, X = make_problem()
    with pytest.raises(TypeError, match=r"\bparams\b.*3-tuple"):
        fn(bad(params), good_data(kind, X))


@all_fns
@pytest.mark.parametrize(
    "field,shape,pattern",
    [
        ("C", (O, H + 1), rf"params\.C.*H = {H}"),  # C does not chain with A
        ("B", (H, D + 1), rf"params\.B.*shape of A.*\({H}, {D + 1}\)"),
        ("B", (H + 1, D), rf"params\.B.*shape of A.*\({H + 1}, {D}\)"),
        ("A", (H * D,), r"params\.A.*rank 2"),
        ("C", (1, O, H), r"params\.C.*rank 2"),
    ],
    ids=["C-wrong-H", "B-wrong-D", "B-wrong-H", "A-rank-1", "C-rank-3"],
)
def test_params_shapes_do_not_chain(fn, kind, field, shape, pattern):
    _, X = make_problem()
    params = _params_with(field, jnp.ones(shape))
    with pytest.raises(ValueError, match=pattern):
        fn(params, good_data(kind, X))


@all_fns
def test_params_empty_dimension(fn, kind):
    _, X = make_problem()
    params = Params(jnp.ones((0, D)), jnp.ones((0, D)), jnp.ones((O, 0)))
    with pytest.raises(ValueError, match=r"params.*>= 1"):
        fn(params, good_data(kind, X))


@all_fns
@pytest.mark.parametrize("field", ["A", "B", "C"])
def test_params_mixed_dtypes(fn, kind, field):
    params, X = make_problem()
    params = params._replace(**{field: getattr(params, field).astype(jnp.float32)})
    with pytest.raises(TypeError, match=r"params.*one dtype"):
        fn(params, good_data(kind, X))


@all_fns
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_params_non_float_dtype(fn, kind, dtype):
    params, X = make_problem()
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    with pytest.raises(TypeError, match=r"params\.A.*floating"):
        fn(params, good_data(kind, X))


def test_params_plain_tuple_is_accepted():
    params, X = make_problem()
    g = abc_jax.batch_grad(tuple(params), X)
    assert isinstance(g, Params)
    np.testing.assert_array_equal(g.A, abc_jax.batch_grad(params, X).A)


# ---------------------------------------------------------------- scalar arguments


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"in_dim": 0}, ValueError, r"in_dim.*>= 1"),
        ({"in_dim": -3}, ValueError, r"in_dim.*>= 1"),
        ({"in_dim": 2.0}, TypeError, r"in_dim.*int"),
        ({"in_dim": True}, TypeError, r"in_dim.*int"),
        ({"in_dim": "3"}, TypeError, r"in_dim.*int"),
        ({"in_dim": 3, "hidden_dim": 0}, ValueError, r"hidden_dim.*>= 1"),
        ({"in_dim": 3, "hidden_dim": 2.5}, TypeError, r"hidden_dim.*int"),
        ({"in_dim": 3, "out_dim": -1}, ValueError, r"out_dim.*>= 1"),
        ({"in_dim": 3, "dtype": jnp.int32}, TypeError, r"dtype.*floating"),
    ],
)
def test_init_params_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        abc_jax.init_params(jax.random.key(0), **kwargs)


def test_init_params_good_arguments():
    params = abc_jax.init_params(jax.random.key(0), D, H, O)
    assert [p.shape for p in params] == [(H, D), (H, D), (O, H)]
    assert [p.shape for p in abc_jax.init_params(jax.random.key(0), np.int64(3))] == [(3, 3)] * 3


@pytest.mark.parametrize(
    "eps,exc",
    [
        (0.0, ValueError),
        (-1e-3, ValueError),
        (np.nan, ValueError),
        (np.inf, ValueError),
        ("small", TypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "str"],
)
def test_fd_grad_bad_eps(eps, exc):
    params, X = make_problem()
    with pytest.raises(exc, match=r"\beps\b"):
        abc_jax.fd_grad(params, X, eps=eps)


@pytest.mark.parametrize(
    "chunk_size,exc",
    [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)],
    ids=["zero", "negative", "float", "bool"],
)
def test_batch_grad_bad_chunk_size(chunk_size, exc):
    params, X = make_problem()
    with pytest.raises(exc, match=r"chunk_size"):
        abc_jax.batch_grad(params, X, chunk_size=chunk_size)


# ---------------------------------------------------------------- before tracing


def test_shape_errors_raise_before_compiling():
    # A shape no other test uses: a check that ran after tracing would have
    # added an executable to the entry point's compiled functions.
    entry = abc_jax.backward._batch_grad_entry
    params = Params(jnp.ones((2, 11)), jnp.ones((2, 11)), jnp.ones((7, 2)))
    before = entry.executables()
    with pytest.raises(ValueError, match=r"\bX\b"):
        abc_jax.batch_grad(params, jnp.ones((3, 12)))
    with pytest.raises(ValueError, match=r"params\.C"):
        abc_jax.batch_grad(params._replace(C=jnp.ones((7, 3))), jnp.ones((3, 11)))
    assert entry.executables() == before
    abc_jax.batch_grad(params, jnp.ones((3, 11)))  # a real call does compile
    assert entry.executables() == before + 1


# ---------------------------------------------------------------- inside a caller's jit


@all_fns
def test_shape_checks_raise_under_jit(fn, kind):
    params, X = make_problem()
    bad, name = (X[:, 1:], "X") if kind == "batch" else (X[0, 1:], "x")
    with pytest.raises(ValueError, match=rf"\b{name}\b.*D = {D}"):
        jax.jit(fn)(params, bad)
    bad_params = params._replace(C=jnp.ones((O, H + 2)))
    with pytest.raises(ValueError, match=r"params\.C"):
        jax.jit(fn)(bad_params, good_data(kind, X))


@sample_shape_fns
def test_shape_checks_raise_under_vmap(fn):
    params, X = make_problem()
    with pytest.raises(ValueError, match=rf"\bx\b.*D = {D}"):
        jax.vmap(fn, in_axes=(None, 0))(params, X[:, 1:])


def test_shape_checks_raise_under_grad():
    params, X = make_problem()
    with pytest.raises(ValueError, match=rf"\bx\b.*D = {D}"):
        jax.grad(abc_jax.abc_loss)(params, X[0, 1:])
    with pytest.raises(ValueError, match=r"params\.B"):
        jax.grad(abc_jax.abc_loss)(params._replace(B=params.B.T), X[0])


@all_fns
def test_value_checks_skipped_under_jit(fn, kind):
    params, X = make_problem()
    bad = _with(good_data(kind, X), (0,) * (2 if kind == "batch" else 1), np.nan)
    out = jax.jit(fn)(params, bad)  # no raise: the values are not known while tracing
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(out)]
    assert any(np.isnan(leaf).any() for leaf in leaves)
    # The same call outside jit does raise (abc_loss never checks values).
    if fn is not abc_jax.abc_loss:
        with pytest.raises(ValueError, match=r"finite"):
            fn(params, bad)
