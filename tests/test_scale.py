"""The batch gradient's two exact forms, chunking, and the validated fast path."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import backward, checks


def _problem(D, H, O, N, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    params = abc_jax.Params(
        jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), dtype),
        jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), dtype),
        jnp.asarray(rng.normal(size=(O, H)) / np.sqrt(H), dtype),
    )
    return params, jnp.asarray(rng.normal(size=(N, D)), dtype)


def _reference_grad(params, X):
    def loss(p):
        A, B, C = p
        W = (jax.nn.sigmoid(X @ A.T) + X @ B.T) @ C.T
        return jnp.mean(jnp.sum(W**2, axis=1))

    return jax.grad(loss)(params)


def _assert_rel(got, want, rtol):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err <= rtol, err


@pytest.mark.parametrize(
    "D,H,O,form",
    [(5, 4, 3, "gram"), (5, 2, 7, "gram"), (5, 6, 3, "direct"), (7, 9, 1, "direct")],
)
def test_both_output_forms_equal_autodiff(D, H, O, form):
    assert (2 * H < 3 * O) == (form == "gram")  # the shape picks the form
    params, X = _problem(D, H, O, 23)
    _assert_rel(abc_jax.batch_grad(params, X), _reference_grad(params, X), 1e-12)
    total, _ = backward._value_and_grad_sum(params, X)
    np.testing.assert_allclose(total / 23, abc_jax.batch_loss(params, X), rtol=1e-13)


@pytest.mark.parametrize("N,chunk", [(17, 5), (17, 1), (17, 17), (17, 100), (64, 16), (3, 2)])
def test_chunked_equals_unchunked(N, chunk):
    params, X = _problem(6, 5, 4, N, seed=N)
    _assert_rel(
        abc_jax.batch_grad(params, X, chunk_size=chunk), abc_jax.batch_grad(params, X), 1e-12
    )


def test_chunked_float32_stays_float32():
    params, X = _problem(6, 5, 4, 50, jnp.float32)
    g = abc_jax.batch_grad(params, X, chunk_size=7)
    assert all(leaf.dtype == jnp.float32 for leaf in g)
    _assert_rel(g, _reference_grad(params, X), 1e-5)


def test_chunk_size_is_validated():
    params, X = _problem(3, 2, 4, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        abc_jax.batch_grad(params, X, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        abc_jax.batch_grad(params, X, chunk_size=2.5)


def test_finite_array_is_checked_once(monkeypatch):
    params, X = _problem(4, 3, 5, 9)
    first = abc_jax.batch_grad(params, X)  # flagged: X seen to be finite
    calls = []
    flagged = backward._batch_grad_checked.flagged

    def counting(*args, **kwargs):
        calls.append(1)
        return flagged(*args, **kwargs)

    monkeypatch.setattr(
        backward, "_batch_grad_checked", backward._batch_grad_checked._replace(flagged=counting)
    )
    again = abc_jax.batch_grad(params, X)  # same array: the plain jit, no flag
    assert calls == []
    _assert_rel(again, first, 0)
    abc_jax.batch_grad(params, X + 0)  # a new array is checked again
    assert calls == [1]


def test_non_finite_array_raises_every_time():
    params, X = _problem(4, 3, 5, 9)
    X = X.at[4, 1].set(jnp.inf)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"X\[4, 1\]"):
            abc_jax.batch_grad(params, X)


def test_known_finite_registry_forgets_dead_arrays():
    params, _ = _problem(4, 3, 5, 1)
    X = jnp.ones((8, 4))
    abc_jax.batch_loss(params, X)
    assert checks._is_known_finite(X)
    key = id(X)
    del X
    gc.collect()
    assert key not in checks._known_finite
