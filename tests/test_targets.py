"""Targets: L = ||C z - t||^2, every gradient path against the independent reference.

The same three checks as the homework's loss (test_gradients.py): the manual
gradient against ``jax.grad`` of the plain-jnp reference (float64 to 1e-12,
float32 to 1e-5), against finite differences, on shapes with D, H, O all
different. Both output-side forms of ``batch_grad`` are reached: with targets
the Gram form is chosen when 2H < O, the direct form otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, make_problem, ref_batch_loss, ref_loss
from jax.test_util import check_grads

import abc_jax
from abc_jax import Batch

F64_TOL, F32_TOL, FD_TOL = 1e-12, 1e-5, 1e-7
# (D, H, O): the first takes the direct form (2H >= O), the second the Gram form (2H < O).
SHAPES = [(5, 4, 3), (3, 2, 7)]

ref_grad = jax.jit(jax.grad(ref_loss))
ref_batch_grad = jax.jit(jax.grad(ref_batch_loss))


def targets(N, O, dtype=jnp.float64, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((N, O)), dtype)


@pytest.mark.parametrize("D,H,O", SHAPES)
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


@pytest.mark.parametrize("D,H,O", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, F64_TOL), (jnp.float32, F32_TOL)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_batch_grad_with_targets(D, H, O, dtype, tol, chunk_size):
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


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_weighted_targets_and_the_gram_form_loss(D, H, O):
    # Weights and targets together, in both forms; the Gram form's own loss too.
    from abc_jax.core.backward import value_and_grad

    params, X = make_problem(2, D, H, O, N=9)
    T, r = targets(9, O), jnp.linspace(0.0, 2.0, 9)
    want = ref_batch_grad(params, X, T, r)
    batch = Batch(X, r, T)
    assert_rel_close(abc_jax.batch_grad(params, batch, chunk_size=4), want, F64_TOL)
    for gram in (False, True):
        value, grads = value_and_grad(params, batch, 4, gram)
        assert_rel_close(grads, want, F64_TOL)
        np.testing.assert_allclose(value, ref_batch_loss(params, X, T, r), rtol=1e-12)


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_fd_grad_and_jvp_grad_with_targets(D, H, O):
    params, X = make_problem(3, D, H, O, N=6)
    batch = Batch(X, T=targets(6, O))
    want = ref_batch_grad(params, X, batch.T)
    assert_rel_close(abc_jax.fd_grad(params, batch), want, FD_TOL)
    assert_rel_close(abc_jax.jvp_grad(params, batch), want, F64_TOL)
    assert_rel_close(abc_jax.batch_grad(params, batch), abc_jax.fd_grad(params, batch), FD_TOL)


def test_per_sample_grads_with_targets():
    params, X = make_problem(4, 5, 4, 3, N=7)
    T = targets(7, 3)
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
    for D, H, O in SHAPES:
        params, X = make_problem(6, D, H, O, N=8)
        zero = Batch(X, T=jnp.zeros((8, O)))
        for f in (abc_jax.batch_grad, abc_jax.batch_value_and_grad, abc_jax.batch_loss):
            assert_rel_close(f(params, zero), f(params, X), 1e-15)


def test_train_learns_a_target():
    # A linear teacher t = M x is in the model's reach (B, C); the loss falls by 100x, and
    # the manual and jax.grad trajectories agree.
    params, X = make_problem(7, 4, 6, 2, N=64)
    T = X @ jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)))
    kw = dict(lr=0.05, epochs=400, progress=False)
    manual = abc_jax.train(params, Batch(X, T=T), **kw)
    oracle = abc_jax.train(params, Batch(X, T=T), grad="oracle", **kw)
    assert manual.losses[-1] < manual.losses[0] / 100
    assert_rel_close(manual.params, oracle.params, 1e-10)


@pytest.mark.parametrize("bad,err,match", [
    (lambda T: T[:, :2], ValueError, r"T must have shape \(N, O\) = \(4, 3\)"),
    (lambda T: T[:3], ValueError, r"T must have shape \(N, O\) = \(4, 3\)"),
    (lambda T: T.at[2, 1].set(jnp.nan), ValueError, r"T must be finite.*T\[2, 1\]"),
    (lambda T: T.astype(jnp.complex64), TypeError, "T"),
])
def test_bad_targets_are_named(bad, err, match):
    params, X = make_problem(8, 5, 4, 3, N=4)
    with abc_jax.value_checks(), pytest.raises(err, match=match):
        abc_jax.batch_grad(params, Batch(X, T=bad(targets(4, 3))))


def test_bad_one_sample_target_is_named():
    params, X = make_problem(8, 5, 4, 3, N=1)
    with pytest.raises(ValueError, match=r"t must have O = 3 entries \(rows of C\)"):
        abc_jax.loss(params, X[0], jnp.zeros(4))
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"t must be finite"):
        abc_jax.manual_grad(params, X[0], jnp.array([0.0, jnp.inf, 0.0]))
