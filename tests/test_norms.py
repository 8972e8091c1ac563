"""Per-sample gradient norms and clipping (abc_jax.core.norms) against vmap(grad) of the
independent reference loss: norms of the explicit per-sample gradients, and those gradients
clipped and averaged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, make_problem, ref_loss

from abc_jax import Batch, Params, batch_grad, clipped_batch_grad, per_sample_grad_norms
from abc_jax.core.norms import clip_factors

SHAPES = [(5, 4, 3), (3, 2, 7)]  # (D, H, O), all different
TOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}
N = 9


def problem(shape, dtype, weighted):
    """Params, a Batch of N rows and the float64 copies the reference uses; weighted: weights
    (row 2 weighs 0) and targets, else plain X."""
    D, H, O = shape
    params, X = make_problem(sum(shape), D, H, O, N, dtype)
    if not weighted:
        return params, Batch(X), Batch(X.astype(jnp.float64))
    rng = np.random.default_rng(1)
    r = rng.uniform(0.5, 2.0, N)
    r[2] = 0.0
    batch = Batch(X, jnp.asarray(r, dtype), jnp.asarray(rng.standard_normal((N, O)), dtype))
    return params, batch, jax.tree.map(lambda a: a.astype(jnp.float64), batch)


def ref_grads(params, batch):
    """g_i = r_i dL_i/dparams by vmap(grad) of the reference loss, float64: leaves (N, ...)."""
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    T = jnp.zeros((N, params.C.shape[0])) if batch.T is None else batch.T
    g = jax.vmap(jax.grad(ref_loss), in_axes=(None, 0, 0))(params, batch.X, T)
    r = jnp.ones(N) if batch.weights is None else batch.weights
    return Params(*(leaf * r[:, None, None] for leaf in g)), r


def ref_norms(grads):
    """(N, 3) Frobenius norms of each row's gradient w.r.t. A, B, C."""
    return jnp.stack([jnp.sqrt(jnp.sum(g**2, axis=(1, 2))) for g in grads], axis=1)


def ref_clipped(params, batch, c):
    """vmap(grad) + clip + weighted mean: (1 / sum r) sum_i min(1, c / ||g_i||) g_i."""
    grads, r = ref_grads(params, batch)
    total = jnp.sqrt(jnp.sum(ref_norms(grads) ** 2, axis=1))
    f = jnp.where(total > c, c / jnp.where(total > 0, total, 1.0), 1.0)
    return Params(*(jnp.sum(g * f[:, None, None], axis=0) / jnp.sum(r) for g in grads)), total


# Every value of each factor against every value of the others, pairwise: each case compiles
# the norms, the clipped gradient and the reference anew.
@pytest.mark.parametrize(("shape", "dtype", "weighted"), [
    pytest.param(SHAPES[0], jnp.float64, False, id="f64-plain-0"),
    pytest.param(SHAPES[0], jnp.float32, True, id="f32-weights+targets-0"),
    pytest.param(SHAPES[1], jnp.float64, True, id="f64-weights+targets-1"),
    pytest.param(SHAPES[1], jnp.float32, False, id="f32-plain-1"),
])
def test_norms_and_clipping_match_vmap_grad(shape, dtype, weighted):
    params, batch, batch64 = problem(shape, dtype, weighted)
    want = ref_norms(ref_grads(params, batch64)[0])
    got = per_sample_grad_norms(params, batch)
    assert got.shape == (N, 3) and got.dtype == dtype
    assert_rel_close(got, want, TOL[dtype])
    c = float(np.median(np.linalg.norm(np.asarray(want), axis=1)))  # some rows clipped, some not
    want_grad, total = ref_clipped(params, batch64, c)
    assert 0 < int(jnp.sum(total > c)) < N
    got_grad = clipped_batch_grad(params, batch, c)
    assert all(g.dtype == dtype for g in got_grad)
    assert_rel_close(got_grad, want_grad, TOL[dtype])


def test_chunked_equals_unchunked():
    chunk_size = 4  # 9 rows: two chunks in the loop, then a remainder of 1
    params, batch, _ = problem(SHAPES[0], jnp.float64, weighted=True)
    assert_rel_close(per_sample_grad_norms(params, batch, chunk_size=chunk_size),
                     per_sample_grad_norms(params, batch), 1e-14)
    whole = clipped_batch_grad(params, batch, 0.5)
    assert_rel_close(clipped_batch_grad(params, batch, 0.5, chunk_size=chunk_size), whole, 1e-13)


def test_jit_equals_eager():
    params, batch, _ = problem(SHAPES[1], jnp.float64, weighted=True)
    assert_rel_close(jax.jit(per_sample_grad_norms)(params, batch),
                     per_sample_grad_norms(params, batch), 1e-14)
    assert_rel_close(jax.jit(clipped_batch_grad)(params, batch, 0.5),
                     clipped_batch_grad(params, batch, 0.5), 1e-14)


def test_zero_weight_row_contributes_nothing():
    """Row 2 weighs 0: its norms are 0 and whatever it holds, the clipped gradient is the same
    (its factor is 1, no 0/0)."""
    params, batch, _ = problem(SHAPES[0], jnp.float64, weighted=True)
    assert float(batch.weights[2]) == 0.0
    wild = batch._replace(X=batch.X.at[2].set(1e3), T=batch.T.at[2].set(-1e3))
    assert np.all(np.asarray(per_sample_grad_norms(params, wild)[2]) == 0.0)
    for c in (0.1, 1e30):
        got = clipped_batch_grad(params, wild, c)
        assert all(np.all(np.isfinite(g)) for g in got)
        assert_rel_close(got, clipped_batch_grad(params, batch, c), 1e-14)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights+targets"])
def test_huge_clip_norm_is_batch_grad(weighted):
    params, batch, _ = problem(SHAPES[1], jnp.float64, weighted)
    for c in (1e30, jnp.inf):
        assert_rel_close(clipped_batch_grad(params, batch, c), batch_grad(params, batch), 1e-12)


def test_clip_factors():
    norms = jnp.array([0.0, 1.0, 2.0, 8.0])
    np.testing.assert_array_equal(clip_factors(norms, 2.0), [1.0, 1.0, 1.0, 0.25])
    np.testing.assert_array_equal(clip_factors(norms, jnp.inf), [1.0, 1.0, 1.0, 1.0])
    assert np.all(np.isfinite(jax.grad(lambda n: clip_factors(n, 2.0).sum())(norms)))
