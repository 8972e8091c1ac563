"""The hand-derived gradients against independent oracles.

The oracle here is ``jax.grad`` of the plain-jnp loss in ``_reference.py``, with
its own sigmoid (0.5 (1 + tanh(y / 2)), finite with a finite derivative for any
y), so a shared bug in the package's forward pass and its own ``oracle_grad``
cannot hide. Tolerances: relative error, per parameter,
max |got - ref| / max |ref|, <= 1e-12 in float64 and <= 1e-5 in float32;
finite differences <= 1e-7 in float64. Shapes have D, H, O all different so a
transposed gradient cannot pass with the right shape.
"""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    assert_rel_close,
    make_problem,
    ref_batch_loss,
    ref_loss,
    ref_sigmoid,
    rel_errors,
)
from hypothesis import given, settings
from jax.test_util import check_grads

import abc_jax

F64_TOL = 1e-12
F32_TOL = 1e-5
FD_TOL = 1e-7

# (D, H, O), all different; H > D in the second so both orientations of gA differ.
SHAPES = [(5, 4, 3), (3, 7, 2)]


ref_grad = jax.jit(jax.grad(ref_loss))
ref_batch_grad = jax.jit(jax.grad(ref_batch_loss))


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_forward_matches_reference(D, H, O):
    params, X = make_problem(0, D, H, O, N=6)
    x = X[0]
    L, res = abc_jax.forward(params, x)
    A, B, C = params
    u = ref_sigmoid(A @ x)
    z = u + B @ x
    chex.assert_trees_all_close(res.x, x, rtol=0, atol=0)
    chex.assert_trees_all_close(res.u, u, rtol=1e-14, atol=1e-15)
    chex.assert_trees_all_close(res.z, z, rtol=1e-14, atol=1e-15)
    chex.assert_trees_all_close(res.w, C @ z, rtol=1e-14, atol=1e-15)
    chex.assert_trees_all_close(L, ref_loss(params, x), rtol=1e-14)
    chex.assert_trees_all_close(abc_jax.loss(params, x), L, rtol=1e-15)
    chex.assert_trees_all_close(abc_jax.abc_loss(params, x), L, rtol=1e-15)
    chex.assert_trees_all_close(
        abc_jax.batch_loss(params, X), ref_batch_loss(params, X), rtol=1e-14
    )


# ---------------------------------------------------------------- batch gradient


@pytest.mark.parametrize("N", [1, 2, pytest.param(17, marks=pytest.mark.smoke)])
@pytest.mark.parametrize("D,H,O", SHAPES)
def test_batch_grad_float64(D, H, O, N):
    params, X = make_problem(0, D, H, O, N)
    got = abc_jax.batch_grad(params, X)
    assert_rel_close(got, ref_batch_grad(params, X), F64_TOL)
    assert_rel_close(got, abc_jax.oracle_grad(params, X), F64_TOL)


@pytest.mark.smoke
@pytest.mark.parametrize("D,H,O", SHAPES)
def test_batch_grad_float32(D, H, O):
    params, X = make_problem(0, D, H, O, N=17, dtype=jnp.float32)
    got = abc_jax.batch_grad(params, X)
    for leaf in jax.tree.leaves(got):
        assert leaf.dtype == jnp.float32
    # Against float32 autodiff of the same numbers, and against the exact
    # (float64) gradient at the same float32 inputs.
    assert_rel_close(got, ref_batch_grad(params, X), F32_TOL)
    assert_rel_close(got, abc_jax.oracle_grad(params, X), F32_TOL)
    params64, X64 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, X))
    assert_rel_close(got, ref_batch_grad(params64, X64), F32_TOL)


@pytest.mark.parametrize(
    "chunk_size", [1, 4, pytest.param(5, marks=pytest.mark.smoke), 16, 17, 40]
)
def test_batch_grad_chunked(chunk_size):
    # N = 17: chunk 5 leaves a remainder of 2, chunk 4 of 1, chunk 16 of 1;
    # 17 and 40 take the single-chunk path.
    params, X = make_problem(0, 5, 4, 3, N=17)
    got = abc_jax.batch_grad(params, X, chunk_size=chunk_size)
    assert_rel_close(got, ref_batch_grad(params, X), F64_TOL)
    assert_rel_close(got, abc_jax.batch_grad(params, X), 1e-14)


@pytest.mark.smoke
def test_batch_grad_chunked_float32():
    params, X = make_problem(0, 7, 6, 3, N=17, dtype=jnp.float32)
    got = abc_jax.batch_grad(params, X, chunk_size=5)
    assert_rel_close(got, ref_batch_grad(params, X), F32_TOL)


def test_batch_grad_weights_every_row():
    # Each row counts with weight 1/N: the gradient of a batch of two rows is
    # the mean of the two one-row gradients, and a chunked remainder row is not
    # dropped (changing only the last row changes the chunked gradient).
    params, X = make_problem(0, 5, 4, 3, N=17)
    g_last_only = abc_jax.batch_grad(params, X[-1:])
    g_first_only = abc_jax.batch_grad(params, X[:1])
    g_two = abc_jax.batch_grad(params, jnp.stack([X[0], X[-1]]))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g_first_only, g_last_only)
    assert_rel_close(g_two, mean, F64_TOL)
    X2 = X.at[-1].multiply(3.0)
    g1 = abc_jax.batch_grad(params, X, chunk_size=5)
    g2 = abc_jax.batch_grad(params, X2, chunk_size=5)
    assert min(rel_errors(g2, g1)) > 1e-3
    assert_rel_close(g2, ref_batch_grad(params, X2), F64_TOL)


def test_autodiff_through_public_losses():
    # batch_loss and loss are plain differentiable functions too (values are
    # not checked under jax.grad, shapes are).
    params, X = make_problem(3, 7, 6, 3, N=5)
    assert_rel_close(jax.grad(abc_jax.batch_loss)(params, X), ref_batch_grad(params, X), F64_TOL)
    assert_rel_close(jax.grad(abc_jax.loss)(params, X[0]), ref_grad(params, X[0]), F64_TOL)


# ---------------------------------------------------------------- one sample


@pytest.mark.parametrize("D,H,O", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_manual_grad(D, H, O, dtype, tol):
    params, X = make_problem(0, D, H, O, N=3, dtype=dtype)
    for x in X:
        assert_rel_close(abc_jax.manual_grad(params, x), ref_grad(params, x), tol)


@pytest.mark.parametrize("g", [0.0, 1.0, 2.5, -3.0, 1e-3])
def test_manual_vjp_is_linear_in_g(g):
    params, X = make_problem(0, 5, 4, 3, N=1)
    x = X[0]
    _, res = abc_jax.forward(params, x)
    unit = abc_jax.manual_vjp(params, res)
    scaled = abc_jax.manual_vjp(params, res, g)
    chex.assert_trees_all_close(scaled, jax.tree.map(lambda a: g * a, unit), rtol=1e-14, atol=0)
    _, vjp = jax.vjp(ref_loss, params, x)
    ref_params_ct, _ = vjp(jnp.asarray(g, jnp.float64))
    if g == 0.0:
        for leaf in jax.tree.leaves(scaled):
            assert not np.any(np.asarray(leaf))
    else:
        assert_rel_close(scaled, ref_params_ct, F64_TOL)
    # A jnp scalar cotangent gives the same as a Python float.
    chex.assert_trees_all_close(
        abc_jax.manual_vjp(params, res, jnp.asarray(g)), scaled, rtol=0, atol=0
    )


def test_manual_vjp_takes_only_a_scalar_cotangent():
    params, X = make_problem(0, 5, 4, 3, N=1)
    _, res = abc_jax.forward(params, X[0])
    for g in (jnp.ones(3), jnp.ones((1,))):  # (O,) once returned a wrong-shaped gradient
        with pytest.raises(ValueError, match=r"g must be a scalar.*shape \(\d+,\)"):
            abc_jax.manual_vjp(params, res, g)


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_per_sample_grads(D, H, O):
    params, X = make_problem(0, D, H, O, N=6)
    got = abc_jax.per_sample_grads(params, X)
    assert got.A.shape == (6, H, D)
    assert got.B.shape == (6, H, D)
    assert got.C.shape == (6, O, H)
    ref = jax.vmap(jax.grad(ref_loss), in_axes=(None, 0))(params, X)
    assert_rel_close(got, ref, F64_TOL)
    for i in range(X.shape[0]):  # each row on its own scale, not just the largest
        row = jax.tree.map(lambda a, i=i: a[i], got)
        assert_rel_close(row, ref_grad(params, X[i]), F64_TOL)


@pytest.mark.smoke
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_per_sample_grads_mean_is_batch_grad(dtype, tol):
    params, X = make_problem(0, 7, 6, 3, N=17, dtype=dtype)
    per = abc_jax.per_sample_grads(params, X)
    mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), per)
    assert_rel_close(mean, abc_jax.batch_grad(params, X), tol)
    assert_rel_close(mean, abc_jax.batch_grad(params, X, chunk_size=5), tol)


# ---------------------------------------------------------------- custom_vjp


@pytest.mark.parametrize("D,H,O", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_abc_loss_grad_params_and_x(D, H, O, dtype, tol):
    params, X = make_problem(0, D, H, O, N=3, dtype=dtype)
    for x in X:
        value, grads = jax.value_and_grad(abc_jax.abc_loss, argnums=(0, 1))(params, x)
        ref_value, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1))(params, x)
        assert grads[1].shape == (D,)
        chex.assert_trees_all_close(value, ref_value, rtol=10 * tol)
        assert_rel_close(grads, ref_grads, tol)


def test_abc_loss_grad_over_batch_with_x_cotangent():
    params, X = make_problem(0, 7, 6, 3, N=9)

    def batch(p, X):
        return jnp.mean(jax.vmap(abc_jax.abc_loss, in_axes=(None, 0))(p, X))

    got = jax.grad(batch, argnums=(0, 1))(params, X)
    ref = jax.grad(ref_batch_loss, argnums=(0, 1))(params, X)
    assert got[1].shape == X.shape
    assert_rel_close(got, ref, F64_TOL)
    assert_rel_close(got[0], abc_jax.batch_grad(params, X), F64_TOL)


@pytest.mark.smoke
def test_check_grads_abc_loss_second_order():
    params, X = make_problem(0, 5, 4, 3, N=1)
    check_grads(abc_jax.abc_loss, (params, X[0]), order=2, modes=["rev"])


def test_check_grads_batch_of_abc_loss():
    params, X = make_problem(0, 5, 4, 3, N=4)

    def batch(p, X):
        return jnp.mean(jax.vmap(abc_jax.abc_loss, in_axes=(None, 0))(p, X))

    check_grads(batch, (params, X), order=1, modes=["rev"])


# ---------------------------------------------------------------- finite differences


@pytest.mark.smoke
@pytest.mark.parametrize("D,H,O", SHAPES)
def test_fd_grad(D, H, O):
    params, X = make_problem(0, D, H, O, N=5)
    got = abc_jax.fd_grad(params, X)
    assert_rel_close(got, ref_batch_grad(params, X), FD_TOL)
    # fd_grad is an independent check of the manual gradient too.
    assert_rel_close(abc_jax.batch_grad(params, X), got, FD_TOL)


def test_fd_grad_explicit_eps():
    params, X = make_problem(0, 5, 4, 3, N=5)
    ref = ref_batch_grad(params, X)
    assert_rel_close(abc_jax.fd_grad(params, X, eps=1e-5), ref, FD_TOL)
    # A step far too large gives a visibly wrong answer: the check can fail.
    assert max(rel_errors(abc_jax.fd_grad(params, X, eps=1.0), ref)) > FD_TOL


# ---------------------------------------------------------------- transposition


def test_transposed_gA_is_caught():
    # Rectangular: gA must have the shape of A, (H, D), not (D, H).
    params, X = make_problem(0, 5, 4, 3, N=6)
    g = abc_jax.batch_grad(params, X)
    assert g.A.shape == params.A.shape == (4, 5)
    assert g.B.shape == params.B.shape == (4, 5)
    assert g.C.shape == params.C.shape == (3, 4)
    # Square D = H: a transposed gA would have the right shape, so compare
    # values, after checking that the transpose really is different.
    params, X = make_problem(1, 4, 4, 3, N=6)
    ref = ref_batch_grad(params, X)
    asym = np.max(np.abs(ref.A - ref.A.T)) / np.max(np.abs(ref.A))
    assert asym > 0.1
    for got in (
        abc_jax.batch_grad(params, X),
        abc_jax.batch_grad(params, X, chunk_size=4),
        abc_jax.oracle_grad(params, X),
        jax.tree.map(lambda a: jnp.mean(a, 0), abc_jax.per_sample_grads(params, X)),
    ):
        assert_rel_close(got, ref, F64_TOL)
    # The same for one sample through manual_grad and the custom_vjp.
    x = X[0]
    ref1 = ref_grad(params, x)
    assert np.max(np.abs(ref1.A - ref1.A.T)) > 0.1 * np.max(np.abs(ref1.A))
    assert_rel_close(abc_jax.manual_grad(params, x), ref1, F64_TOL)
    assert_rel_close(jax.grad(abc_jax.abc_loss)(params, x), ref1, F64_TOL)


# ---------------------------------------------------------------- property test


# A few fixed shapes (each a compilation) with hypothesis drawing the values: (D, H, O, N)
# all different, H < D and H > D, a chunk size that divides N and one that does not, 1x1x1.
PROPERTY_SHAPES = [(7, 3, 5, 17), (9, 2, 6, 13), (3, 8, 2, 10), (1, 1, 1, 1)]


@settings(deadline=None, max_examples=25, database=None)
@given(
    shape=st.sampled_from(PROPERTY_SHAPES),
    chunk_size=st.sampled_from([None, 1, 5]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
)
def test_batch_grad_property(shape, chunk_size, seed, scale):
    D, H, O, N = shape
    params, X = make_problem(seed, D, H, O, N)
    X = X * scale
    got = abc_jax.batch_grad(params, X, chunk_size=chunk_size)
    assert_rel_close(got, abc_jax.oracle_grad(params, X), F64_TOL)


# ---------------------------------------------------------------- extremes


def saturating_batch(dtype, N=8):
    """Params and X (N, 5) whose row i has max |A x_i| = 10^(4 i / (N - 1)).

    The first row is in sigmoid's active range, the last reaches |y| = 1e4.
    """
    params, X = make_problem(0, 5, 4, 3, N, dtype)
    row_max = jnp.max(jnp.abs(X @ params.A.T), axis=1)
    target = jnp.logspace(0, 4, N, dtype=dtype)
    X = X * (target / row_max)[:, None]
    y = np.abs(np.asarray(X @ params.A.T, np.float64))
    np.testing.assert_allclose(y.max(), 1e4, rtol=1e-5)
    np.testing.assert_allclose(y.max(axis=1)[0], 1.0, rtol=1e-5)
    return params, X


@pytest.mark.smoke
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_extreme_inputs(dtype, tol):
    params, X = saturating_batch(dtype)
    chex.assert_tree_all_finite(abc_jax.batch_loss(params, X))
    oracle = abc_jax.oracle_grad(params, X)
    chex.assert_tree_all_finite(oracle)
    for got in (
        abc_jax.batch_grad(params, X),
        abc_jax.batch_grad(params, X, chunk_size=3),
        jax.tree.map(lambda a: jnp.mean(a, 0), abc_jax.per_sample_grads(params, X)),
    ):
        chex.assert_tree_all_finite(got)
        assert_rel_close(got, oracle, tol)
    x = X[-1]  # the row with |y| = 1e4
    chex.assert_tree_all_finite(abc_jax.loss(params, x))
    chex.assert_tree_all_finite(abc_jax.manual_grad(params, x))
    chex.assert_tree_all_finite(jax.grad(abc_jax.abc_loss, argnums=(0, 1))(params, x))
    assert_rel_close(abc_jax.manual_grad(params, x), ref_grad(params, x), tol)


def test_extreme_inputs_match_independent_reference():
    # The reference sigmoid (tanh form) has a finite derivative everywhere too,
    # and sigmoid'(y) on the saturated rows is ~0 in both, far below the
    # contribution of the unsaturated first row.
    params, X = saturating_batch(jnp.float64)
    ref = ref_batch_grad(params, X)
    chex.assert_tree_all_finite(ref)
    assert_rel_close(abc_jax.batch_grad(params, X), ref, F64_TOL)
    assert_rel_close(abc_jax.batch_grad(params, X, chunk_size=3), ref, F64_TOL)
    assert_rel_close(jax.grad(abc_jax.abc_loss)(params, X[-1]), ref_grad(params, X[-1]), F64_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sigmoid_and_derivative_stable(dtype):
    y = jnp.array([-1e4, -800.0, -50.0, -1.0, 0.0, 1.0, 50.0, 800.0, 1e4], dtype)
    s = abc_jax.sigmoid(y)
    ds = jax.vmap(jax.grad(abc_jax.sigmoid))(y)
    chex.assert_tree_all_finite((s, ds))
    assert s.dtype == ds.dtype == dtype
    assert np.all((np.asarray(s) >= 0) & (np.asarray(s) <= 1))
    tol = 1e-15 if dtype == jnp.float64 else 1e-7
    chex.assert_trees_all_close(s, ref_sigmoid(y), atol=tol, rtol=0)
    chex.assert_trees_all_close(ds, jax.vmap(jax.grad(ref_sigmoid))(y), atol=tol, rtol=0)
