"""The batch gradient's two exact forms, chunking, and the validated fast path."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import make_problem, max_rel_err, ref_batch_loss

import abc_jax
from abc_jax import backward


def _problem(D, H, O, N, dtype=jnp.float64, seed=0):
    return make_problem(seed, D, H, O, N, dtype)


def _reference_grad(params, X):
    return jax.grad(ref_batch_loss)(params, X)


def _assert_rel(got, want, rtol):
    assert max_rel_err(got, want) <= rtol


@pytest.mark.parametrize(
    "D,H,O,form",
    [(5, 4, 3, "gram"), (5, 2, 7, "gram"), (5, 6, 3, "direct"), (7, 9, 1, "direct")],
)
def test_both_output_forms_equal_autodiff(D, H, O, form):
    assert backward._gram_is_cheaper(H, O) == (form == "gram")  # batch_grad's choice
    params, X = _problem(D, H, O, 23)
    want = _reference_grad(params, X)
    _assert_rel(abc_jax.batch_grad(params, X), want, 1e-12)
    for gram in (False, True):  # both forms at every shape
        total, gsum = backward._value_and_grad_sum(params, X, gram=gram)
        _assert_rel(jax.tree.map(lambda g: g / 23, gsum), want, 1e-12)
        np.testing.assert_allclose(total / 23, abc_jax.batch_loss(params, X), rtol=1e-12)


def test_reported_loss_stays_accurate_near_a_null_space_minimum():
    # Every z_i lies in a 2-D subspace that C maps to ~1e-4 of its norm, so the
    # loss is ~1e-8 of ||C||^2 ||z||^2: there the Gram form's loss has lost its
    # float32 accuracy, and the direct form, which train reports, keeps it.
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
    X32 = jnp.asarray(X, jnp.float32)
    rel = {gram: abs(float(backward._value_and_grad(params, X32, gram=gram)[0]) / exact - 1)
           for gram in (False, True)}
    assert rel[False] <= 1e-4, rel
    assert rel[True] > 10 * rel[False], rel  # why train does not use the Gram form


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


def test_a_repeated_call_skips_validation_but_not_the_finite_check(monkeypatch):
    params, X = _problem(4, 3, 5, 19)  # N = 19: a shape no other test compiles
    entry = backward._batch_grad_entry
    before = entry.executables()
    first = abc_jax.batch_grad(params, X)
    assert entry.executables() == before + 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("a repeated signature was validated again")

    monkeypatch.setattr(backward, "prepare_batch", must_not_run)
    _assert_rel(abc_jax.batch_grad(params, X + 0), first, 0)  # same signature: fast path
    with pytest.raises(ValueError, match=r"X\[4, 1\]"):  # ... whose values are still checked
        abc_jax.batch_grad(params, X.at[4, 1].set(jnp.inf))
    with pytest.raises(ValueError, match=r"params\.C\[2, 0\] is nan"):
        abc_jax.batch_grad(params._replace(C=params.C.at[2, 0].set(jnp.nan)), X)
    assert entry.executables() == before + 1  # one executable for all of these calls


def test_inputs_seen_finite_are_not_kept_alive():
    params, _ = _problem(4, 3, 5, 1)
    X = jnp.ones((8, 4))
    abc_jax.batch_loss(params, X)
    abc_jax.batch_loss(params, X)  # the second call skips the flag: nothing changed
    alive = weakref.ref(X)
    del X
    gc.collect()
    assert alive() is None


def test_non_finite_array_raises_every_time():
    params, X = _problem(4, 3, 5, 9)
    X = X.at[4, 1].set(jnp.inf)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"X\[4, 1\]"):
            abc_jax.batch_grad(params, X)
