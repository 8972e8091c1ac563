"""The hand-derived backward pass (``core.backward``, and the oracles of ``core.oracles``)
against independent oracles: one sample, batches, chunks, both output forms, targets.

The oracle here is ``jax.grad`` of the plain-jnp loss in ``_reference.py``, with
its own sigmoid (0.5 (1 + tanh(y / 2)), finite with a finite derivative for any
y), so a shared bug in the package's forward pass and its own ``oracle_grad``
cannot hide. Tolerances: relative error, per parameter,
max |got - ref| / max |ref|, <= 1e-12 in float64 and <= 1e-5 in float32;
finite differences <= 1e-7 in float64. Shapes have D, H, O all different so a
transposed gradient cannot pass with the right shape.
"""

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    F32_TOL,
    F64_TOL,
    FD_TOL,
    SHAPES,
    assert_rel_close,
    make_problem,
    max_rel_err,
    ref_batch_loss,
    ref_loss,
    rel_errors,
)
from hypothesis import given, settings
from jax.test_util import check_grads

import abc_jax
from abc_jax import Batch
from abc_jax.core import backward

# (D, H, O) with targets: the first takes the direct output form (2H >= O), the second the
# Gram form (2H < O).
FORM_SHAPES = [(5, 4, 3), (3, 2, 7)]


ref_grad = jax.jit(jax.grad(ref_loss))
ref_batch_grad = jax.jit(jax.grad(ref_batch_loss))
# backward.value_and_grad jitted, with chunk_size and gram static as in the library.
value_and_grad = jax.jit(backward.value_and_grad, static_argnums=(2, 3))


# ---------------------------------------------------------------- forward


# ---------------------------------------------------------------- batch gradient


@pytest.mark.parametrize("N", [1, pytest.param(17, marks=pytest.mark.smoke)])
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


@pytest.mark.parametrize("chunk_size", [4, pytest.param(5, marks=pytest.mark.smoke), 40])
def test_batch_grad_chunked(chunk_size):
    # N = 17: chunk 5 leaves a remainder of 2, chunk 4 of 1; 40 takes the single-chunk path
    # (chunk 1 and N: test_chunked_equals_unchunked).
    params, X = make_problem(0, 5, 4, 3, N=17)
    got = abc_jax.batch_grad(params, X, chunk_size=chunk_size)
    assert_rel_close(got, ref_batch_grad(params, X), F64_TOL)
    assert_rel_close(got, abc_jax.batch_grad(params, X), 1e-14)


@pytest.mark.smoke
def test_batch_grad_chunked_float32():
    params, X = make_problem(0, *SHAPES[0], N=17, dtype=jnp.float32)
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
    params, X = make_problem(3, *SHAPES[0], N=17)
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
    params, X = make_problem(0, D, H, O, N=17)
    got = abc_jax.per_sample_grads(params, X)
    assert got.A.shape == (17, H, D)
    assert got.B.shape == (17, H, D)
    assert got.C.shape == (17, O, H)
    ref = jax.vmap(jax.grad(ref_loss), in_axes=(None, 0))(params, X)
    assert_rel_close(got, ref, F64_TOL)
    for i in range(X.shape[0]):  # each row on its own scale, not just the largest
        row = jax.tree.map(lambda a, i=i: a[i], got)
        assert_rel_close(row, ref_grad(params, X[i]), F64_TOL)


@pytest.mark.smoke
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_per_sample_grads_mean_is_batch_grad(dtype, tol):
    params, X = make_problem(0, *SHAPES[0], N=17, dtype=dtype)
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
    params, X = make_problem(0, *SHAPES[0], N=17)

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
    params, X = make_problem(0, 5, 4, 3, N=17)

    def batch(p, X):
        return jnp.mean(jax.vmap(abc_jax.abc_loss, in_axes=(None, 0))(p, X))

    check_grads(batch, (params, X), order=1, modes=["rev"])


# ---------------------------------------------------------------- finite differences


@pytest.mark.smoke
@pytest.mark.parametrize("D,H,O", SHAPES)
def test_fd_grad(D, H, O):
    params, X = make_problem(0, D, H, O, N=17)
    got = abc_jax.fd_grad(params, X)
    assert_rel_close(got, ref_batch_grad(params, X), FD_TOL)
    # fd_grad is an independent check of the manual gradient too.
    assert_rel_close(abc_jax.batch_grad(params, X), got, FD_TOL)


def test_fd_grad_explicit_eps():
    params, X = make_problem(0, 5, 4, 3, N=17)
    ref = ref_batch_grad(params, X)
    assert_rel_close(abc_jax.fd_grad(params, X, eps=1e-5), ref, FD_TOL)
    # A step far too large gives a visibly wrong answer: the check can fail.
    assert max(rel_errors(abc_jax.fd_grad(params, X, eps=1.0), ref)) > FD_TOL


# ---------------------------------------------------------------- transposition


def test_transposed_gA_is_caught():
    # Rectangular: gA must have the shape of A, (H, D), not (D, H).
    params, X = make_problem(0, 5, 4, 3, N=17)
    g = abc_jax.batch_grad(params, X)
    assert g.A.shape == params.A.shape == (4, 5)
    assert g.B.shape == params.B.shape == (4, 5)
    assert g.C.shape == params.C.shape == (3, 4)
    # Square D = H: a transposed gA would have the right shape, so compare
    # values, after checking that the transpose really is different.
    params, X = make_problem(1, 4, 4, 3, N=17)
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


def check_batch_grad(shape, chunk_size, seed, scale):
    D, H, O, N = shape
    params, X = make_problem(seed, D, H, O, N)
    X = X * scale
    got = abc_jax.batch_grad(params, X, chunk_size=chunk_size)
    assert_rel_close(got, abc_jax.oracle_grad(params, X), F64_TOL)


# The default run: values drawn at two of the shapes (HYPOTHESIS_PROFILE sets the count);
# the integration run: many examples over every shape and chunk size.
@given(shape=st.sampled_from(PROPERTY_SHAPES[::3]), chunk_size=st.sampled_from([None, 5]),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_batch_grad_property(shape, chunk_size, seed, scale):
    check_batch_grad(shape, chunk_size, seed, scale)


@pytest.mark.integration
@settings(max_examples=100)
@given(shape=st.sampled_from(PROPERTY_SHAPES), chunk_size=st.sampled_from([None, 1, 5]),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_batch_grad_property_thorough(shape, chunk_size, seed, scale):
    check_batch_grad(shape, chunk_size, seed, scale)


# ---------------------------------------------------------------- extremes


def saturating_batch(dtype, N=17):
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


# ---------------------------------------------------------------- the two output forms, chunking
#
# backward.value_and_grad(params, batch, chunk_size, gram) computes the batch loss and its
# gradient as contractions over N; its output side has a direct form (W = C Z) and a Gram
# form (C^T C, W never formed). Both must equal autodiff at every shape and with row
# weights; chunking the rows must not change the result beyond rounding.


def _problem(D, H, O, N, dtype=jnp.float64, seed=0):
    return make_problem(seed, D, H, O, N, dtype)


def _weighted_reference(params, X, weights):
    """(sum_i w_i L_i / sum_i w_i, its gradient) by autodiff of the plain reference loss."""
    def loss(p):
        per_row = jax.vmap(lambda x: ref_batch_loss(p, x[None]))(X)  # (N,)
        return jnp.sum(weights * per_row) / jnp.sum(weights)

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("weighted", [False, True], ids=["unit", "weighted"])
@pytest.mark.parametrize(
    "D,H,O", [(5, 2, 7), (5, 6, 3)], ids=["gram-cheaper-2-7", "direct-cheaper-6-3"],
)
def test_both_output_forms_equal_autodiff(D, H, O, weighted):
    N = 23
    params, X = _problem(D, H, O, N)
    # Weighted: rows of weight 0 (padding) and of non-integer weights.
    weights = np.where(np.arange(N) % 5 == 0, 0.0, 1 + np.arange(N) % 3 / 2) if weighted else None
    want_loss, want_grad = _weighted_reference(params, X, np.ones(N) if weights is None
                                               else weights)
    batch = Batch(X, None if weights is None else jnp.asarray(weights))
    for gram in (False, True):  # both forms at every shape, whichever batch_grad picks
        loss, grad = value_and_grad(params, batch, None, gram)
        assert max_rel_err(grad, want_grad) <= 1e-12, gram
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    assert max_rel_err(abc_jax.batch_grad(params, batch), want_grad) <= 1e-12
    loss, grad = abc_jax.batch_value_and_grad(params, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    assert max_rel_err(grad, want_grad) <= 1e-12


def test_reported_loss_stays_accurate_near_a_null_space_minimum():
    # Every z_i lies in a 2-D subspace that C maps to ~1e-4 of its norm, so the
    # loss is ~1e-8 of ||C||^2 ||z||^2: there the Gram form's loss has lost its
    # float32 accuracy, and the direct form, which batch_value_and_grad and
    # train report, keeps it.
    rng = np.random.default_rng(0)
    H, D, O, N = 4, 6, 3, 200
    null = np.array([1.0, -1.0, 0.0, 0.0]) / np.sqrt(2)
    Q, _ = np.linalg.qr(np.stack([np.ones(H), null], axis=1))  # span{1, null}
    C = rng.normal(size=(O, H)) @ (np.eye(H) - Q @ Q.T) + 1e-4 * rng.normal(size=(O, H))
    B = np.outer(null, rng.normal(size=D))  # B x is along null; u = sigmoid(0) = 1/2
    params = abc_jax.Params(*(jnp.asarray(m, jnp.float32) for m in (np.zeros((H, D)), B, C)))
    X = rng.normal(size=(N, D))
    Z = 0.5 + X @ np.asarray(params.B, np.float64).T
    exact = np.mean(np.sum((Z @ np.asarray(params.C, np.float64).T) ** 2, axis=1))
    batch = Batch(jnp.asarray(X, jnp.float32))
    rel = {gram: abs(float(value_and_grad(params, batch, None, gram)[0]) / exact - 1)
           for gram in (False, True)}
    assert rel[False] <= 1e-4, rel
    assert rel[True] > 10 * rel[False], rel  # why the reported loss is not the Gram form's
    public = float(abc_jax.batch_value_and_grad(params, batch.X)[0])
    assert abs(public / exact - 1) <= 1e-4, public


# chunk > N (one chunk): test_batch_grad_chunked
@pytest.mark.parametrize("N,chunk", [(17, 5), *(pytest.param(n, c, marks=pytest.mark.integration)
                                                for n, c in ((17, 1), (3, 2)))])
def test_chunked_equals_unchunked(N, chunk):
    # D, H, O = 6, 5, 4: batch_grad takes the Gram form (2H < 3O), and
    # batch_value_and_grad the direct one, so both forms are chunked here.
    params, X = _problem(6, 5, 4, N, seed=N)
    weights = jnp.asarray(np.arange(N) % 4, X.dtype)  # a zero weight in every chunk of 4+
    for data in (X, Batch(X, weights)):
        chunked = abc_jax.batch_grad(params, data, chunk_size=chunk)
        unchunked = abc_jax.batch_grad(params, data)
        loss, grad = abc_jax.batch_value_and_grad(params, data, chunk_size=chunk)
        want_loss, want_grad = abc_jax.batch_value_and_grad(params, data)
        assert max_rel_err(chunked, unchunked) <= 1e-12
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        assert max_rel_err(grad, want_grad) <= 1e-12


def test_chunked_float32_stays_float32():
    params, X = _problem(6, 5, 4, 50, jnp.float32)
    g = abc_jax.batch_grad(params, X, chunk_size=7)
    assert all(leaf.dtype == jnp.float32 for leaf in g)
    want = jax.grad(functools.partial(ref_batch_loss, X=X))(params)
    assert max_rel_err(g, want) <= 1e-5


# ---------------------------------------------------------------- targets: L = ||C z - t||^2


def targets(N, O, dtype=jnp.float64, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((N, O)), dtype)


@pytest.mark.parametrize("D,H,O", FORM_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_manual_grad_and_vjp_with_a_target(D, H, O, dtype, tol):
    params, X = make_problem(0, D, H, O, N=1, dtype=dtype)
    x, t = X[0], targets(1, O, dtype)[0]
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    want = ref_grad(p64, x.astype(jnp.float64), t.astype(jnp.float64))
    assert_rel_close(abc_jax.manual_grad(params, x, t), want, tol)
    L, res = abc_jax.forward(params, x, t)
    assert_rel_close(abc_jax.manual_vjp(params, res, 2.0), jax.tree.map(lambda g: 2 * g, want),
                     tol)
    np.testing.assert_allclose(L, ref_loss(p64, x, t), rtol=tol)
    np.testing.assert_allclose(abc_jax.loss(params, x, t), L, rtol=0)


@pytest.mark.parametrize("D,H,O", FORM_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
def test_batch_grad_with_targets(D, H, O, dtype, tol):
    # chunked with targets (and weights): test_weighted_targets_and_the_gram_form_loss
    chunk_size = None
    params, X = make_problem(0, D, H, O, N=17, dtype=dtype)
    T = targets(17, O, dtype)
    p64, X64, T64 = (jax.tree.map(lambda a: a.astype(jnp.float64), v) for v in (params, X, T))
    want = ref_batch_grad(p64, X64, T64)
    batch = Batch(X, T=T)
    assert_rel_close(abc_jax.batch_grad(params, batch, chunk_size=chunk_size), want, tol)
    value, grads = abc_jax.batch_value_and_grad(params, batch, chunk_size=chunk_size)
    assert_rel_close(grads, want, tol)
    np.testing.assert_allclose(value, ref_batch_loss(p64, X64, T64), rtol=tol)
    np.testing.assert_allclose(abc_jax.batch_loss(params, batch), value, rtol=tol)
    assert_rel_close(abc_jax.oracle_grad(params, batch), want, tol)


@pytest.mark.parametrize("D,H,O", FORM_SHAPES)
def test_weighted_targets_and_the_gram_form_loss(D, H, O):
    # Weights and targets together, in both forms; the Gram form's own loss too.
    params, X = make_problem(2, D, H, O, N=17)
    T, r = targets(17, O), jnp.linspace(0.0, 2.0, 17)
    want = ref_batch_grad(params, X, T, r)
    batch = Batch(X, r, T)
    assert_rel_close(abc_jax.batch_grad(params, batch, chunk_size=4), want, F64_TOL)
    for gram in (False, True):
        value, grads = value_and_grad(params, batch, 4, gram)
        assert_rel_close(grads, want, F64_TOL)
        np.testing.assert_allclose(value, ref_batch_loss(params, X, T, r), rtol=1e-12)


@pytest.mark.parametrize("D,H,O", FORM_SHAPES)
def test_fd_grad_and_jvp_grad_with_targets(D, H, O):
    params, X = make_problem(3, D, H, O, N=17)
    batch = Batch(X, T=targets(17, O))
    want = ref_batch_grad(params, X, batch.T)
    assert_rel_close(abc_jax.fd_grad(params, batch), want, FD_TOL)
    assert_rel_close(abc_jax.jvp_grad(params, batch), want, F64_TOL)
    assert_rel_close(abc_jax.batch_grad(params, batch), abc_jax.fd_grad(params, batch), FD_TOL)


def test_per_sample_grads_with_targets():
    params, X = make_problem(4, 5, 4, 3, N=17)
    T = targets(17, 3)
    got = abc_jax.per_sample_grads(params, Batch(X, T=T))
    want = jax.vmap(ref_grad, in_axes=(None, 0, 0))(params, X, T)
    assert_rel_close(got, want, F64_TOL)


def test_abc_loss_differentiates_params_x_and_t():
    params, X = make_problem(5, 5, 4, 3, N=1)
    x, t = X[0], targets(1, 3)[0]
    got = jax.grad(abc_jax.abc_loss, argnums=(0, 1, 2))(params, x, t)
    want = jax.grad(ref_loss, argnums=(0, 1, 2))(params, x, t)
    assert_rel_close(got, want, F64_TOL)
    np.testing.assert_allclose(got[2], -2 * (params.C @ (jax.nn.sigmoid(params.A @ x)
                                                         + params.B @ x) - t), rtol=1e-12)
    check_grads(abc_jax.abc_loss, (params, x, t), order=2, modes=["rev"])


def test_zero_targets_are_the_homework_loss():
    # t = 0 takes the same arithmetic as no targets, in both forms.
    for D, H, O in FORM_SHAPES:
        params, X = make_problem(6, D, H, O, N=17)
        zero = Batch(X, T=jnp.zeros((17, O)))
        for f in (abc_jax.batch_grad, abc_jax.batch_value_and_grad, abc_jax.batch_loss):
            assert_rel_close(f(params, zero), f(params, X), 1e-15)




def test_auto_chunks_are_cache_sized_on_a_cpu_and_the_whole_batch_elsewhere(monkeypatch):
    """chunk_size="auto": rows = 12 MiB / (itemsize (D + 3H + 2O)) on a CPU; the whole batch
    where N holds fewer than four such chunks, where they hold fewer than 1024 rows, or on
    another backend; an int or None as given."""
    rows_per_chunk = backward.rows_per_chunk

    def shapes(K, N, dtype=jnp.float32):
        p = abc_jax.Params(*(jax.ShapeDtypeStruct(s, dtype) for s in [(K, K)] * 3))
        return p, Batch(jax.ShapeDtypeStruct((N, K), dtype))

    assert rows_per_chunk("auto", *shapes(256, 65536)) == 12 * 2**20 // (6 * 256 * 4)  # 2048
    assert rows_per_chunk("auto", *shapes(64, 65536)) == 8192
    assert rows_per_chunk("auto", *shapes(256, 8000)) is None  # 4 x 2048 > 8000
    assert rows_per_chunk("auto", *shapes(1024, 65536)) is None  # 512 rows: too few
    assert rows_per_chunk("auto", *shapes(3, 2**20, jnp.float64)) == 12 * 2**20 // (18 * 8)
    assert rows_per_chunk(7, *shapes(3, 10)) == 7 and rows_per_chunk(None, *shapes(3, 10)) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert rows_per_chunk("auto", *shapes(256, 65536)) is None


def test_auto_chunking_is_the_chunked_sum(monkeypatch):
    """Where "auto" chunks (here made to, with a tiny cache), batch_grad is bit for bit the
    explicit chunk size and the whole batch's to rounding."""
    monkeypatch.setattr(backward, "CACHE_BYTES", 1024 * 22 * 8)  # D + 3H + 2O = 22: 1024 rows
    params, X = make_problem(3, 3, 5, 2, N=4200)
    grad = jax.jit(backward.batch_grad, static_argnames="chunk_size")
    auto, chunked = (grad(params, Batch(X), chunk_size=c) for c in ("auto", 1024))
    chex.assert_trees_all_equal(auto, chunked)
    assert_rel_close(auto, backward.batch_grad(params, Batch(X), None), 1e-12)
