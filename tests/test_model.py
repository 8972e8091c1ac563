"""The model (``core.model``): forward, the losses, predict's outputs and sigmoid against the
independent plain-jnp reference of ``_reference.py``, on shapes with D, H, O all different."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import SHAPES, make_problem, ref_batch_loss, ref_loss, ref_sigmoid

import abc_jax
from abc_jax import Batch


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_forward_matches_reference(D, H, O):
    params, X = make_problem(0, D, H, O, N=17)
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


def ref_outputs(params, X):
    A, B, C = params
    return (ref_sigmoid(X @ A.T) + X @ B.T) @ C.T


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-13), (jnp.float32, 1e-5)])
def test_predict_equals_the_reference_outputs_whole_and_chunked(dtype, tol):
    params, X = make_problem(0, *SHAPES[0], 17, dtype)
    T = make_problem(1, *SHAPES[0], 17, dtype)[1][:, :3]  # targets (N, O)
    want = ref_outputs(jax.tree.map(lambda a: a.astype(jnp.float64), params),
                       X.astype(jnp.float64))
    for chunk in (None, 5, 100):
        W = abc_jax.predict(params, X, chunk_size=chunk)
        assert W.shape == (len(X), 3) and W.dtype == dtype
        np.testing.assert_allclose(W, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(abc_jax.predict(params, Batch(X, T=T)),
                                  abc_jax.predict(params, X))
    L = jnp.mean(jnp.sum((abc_jax.predict(params, X) - T) ** 2, axis=1))
    np.testing.assert_allclose(L, abc_jax.batch_loss(params, Batch(X, T=T)),
                               rtol=10 * tol)


def test_predict_rejects_bad_input():
    params, X = make_problem(0, *SHAPES[0], 17)
    with pytest.raises(ValueError, match="X must have D = 5 columns"):
        abc_jax.predict(params, X[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        abc_jax.predict(params, X, chunk_size=0)
    with abc_jax.value_checks(), pytest.raises(ValueError, match="X must be finite"):
        abc_jax.predict(params, X.at[0, 0].set(jnp.inf))
