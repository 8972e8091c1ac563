"""The batch gradient's two exact output forms (direct and Gram), and chunking.

``backward.value_and_grad(params, batch, chunk_size, gram)`` computes the
batch loss and its gradient as contractions over N; its output side has a
direct form (W = C Z) and a Gram form (C^T C, W never formed). Both must equal
autodiff at every shape and with row weights; chunking the rows must not
change the result beyond rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import make_problem, max_rel_err, ref_batch_loss

import abc_jax
from abc_jax import Batch
from abc_jax.core import backward

# backward.value_and_grad jitted, with chunk_size and gram static as in the library.
value_and_grad = jax.jit(backward.value_and_grad, static_argnums=(2, 3))


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
    "D,H,O", [(5, 4, 3), (5, 2, 7), (5, 6, 3), (7, 9, 1)],
    ids=["gram-cheaper-4-3", "gram-cheaper-2-7", "direct-cheaper-6-3", "direct-cheaper-9-1"],
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


@pytest.mark.parametrize("N,chunk", [(17, 5), (17, 1), (17, 17), (17, 100), (64, 16), (3, 2)])
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
