"""Checks that need several devices; run by test_parallel.py in one subprocess with
JAX_NUM_CPU_DEVICES=4 (the device count is fixed when JAX starts).

The promise: ``shard_batch(X)`` is a ``Batch`` spread over the devices, padded at
the end with rows of weight 0, and every batch function gives on it what it
gives on the unpadded X, eagerly and under the caller's jit, vmap and grad.
"""


import _reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import abc_jax
from abc_jax.checkpoint import fingerprint

pytestmark = pytest.mark.skipif(jax.device_count() != 4, reason="needs exactly 4 devices")

D, H, O = 5, 4, 3
SIZES = [3, 8, 10, 103]  # fewer rows than devices, divisible, 2 padding rows, 1 padding row
PADDED = [10]  # every function runs at this size (each compiles every function): 3 rows
#               a device, the last with 1 real row and 2 of padding


def _problem(n, dtype=jnp.float64):
    rng = np.random.default_rng(n)
    params = abc_jax.Params(*(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype)
                              for s in ((H, D), (H, D), (O, H))))
    return params, jnp.asarray(rng.standard_normal((n, D)), dtype)


def _close(a, b, rtol=1e-12):
    """Per leaf: max |a - b| <= rtol * max |b|, and the shapes agree."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, (x.shape, y.shape)
        assert np.max(np.abs(x - y)) <= rtol * np.max(np.abs(y)), (x, y)


def _mean_of_per_sample(params, X):
    """sum_i r_i dL_i / sum_i r_i from per_sample_grads (which weighs each row by r_i)."""
    if not isinstance(X, abc_jax.Batch):
        X = abc_jax.Batch(X)
    n = X.X.shape[0] if X.weights is None else jnp.sum(X.weights)
    return jax.tree.map(lambda g: jnp.sum(g, axis=0) / n, abc_jax.per_sample_grads(params, X))


BATCH_FNS = {**_reference.BATCH_FNS, "mean_of_per_sample_grads": _mean_of_per_sample}


@pytest.mark.parametrize("n", SIZES)
def test_shard_batch_is_a_padded_batch_over_all_devices(n):
    _, X = _problem(n)
    Xs = abc_jax.shard_batch(X)
    rows = -(-n // 4) * 4
    assert isinstance(Xs, abc_jax.Batch)
    assert Xs.X.shape == (rows, D) and Xs.weights.shape == (rows,)
    assert Xs.X.dtype == Xs.weights.dtype == jnp.float64
    for a in (Xs.X, Xs.weights):
        assert len(a.sharding.device_set) == 4 and a.sharding.spec[0] == "data"
        assert {s.data.shape[0] for s in a.addressable_shards} == {rows // 4}
    np.testing.assert_array_equal(np.asarray(Xs.X[:n]), np.asarray(X))
    np.testing.assert_array_equal(np.asarray(Xs.X[n:]), 0)
    np.testing.assert_array_equal(np.asarray(Xs.weights), np.arange(rows) < n)


@pytest.mark.parametrize("name", list(BATCH_FNS))
@pytest.mark.parametrize("n", PADDED)
def test_sharded_equals_one_device_eagerly_and_under_jit(n, name):
    fn = BATCH_FNS[name]
    params, X = _problem(n)
    Xs = abc_jax.shard_batch(X)
    want = fn(params, X)
    rtol = 1e-9 if name == "fd_grad" else 1e-12  # fd: rounding of L / eps
    _close(fn(params, Xs), want, rtol)
    _close(jax.jit(fn)(params, Xs), want, rtol)


def test_jit_batch_loss_on_103_rows_over_4_devices():
    params, X = _problem(103)
    Xs = abc_jax.shard_batch(X)  # 104 rows: one of weight 0
    got = jax.jit(abc_jax.batch_loss)(params, Xs)
    want = np.mean([float(abc_jax.loss(params, x)) for x in np.asarray(X)])
    np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_per_sample_grads_of_padding_rows_are_zero():
    params, X = _problem(10)
    got = abc_jax.per_sample_grads(params, abc_jax.shard_batch(X))
    want = abc_jax.per_sample_grads(params, X)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (12, *w.shape[1:])
        np.testing.assert_allclose(np.asarray(g[:10]), np.asarray(w), rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(np.asarray(g[10:]), 0)


def test_grad_and_vmap_through_a_sharded_batch():
    params, X = _problem(103)
    Xs = abc_jax.shard_batch(X)
    _close(jax.grad(abc_jax.batch_loss)(params, Xs), abc_jax.oracle_grad(params, X))
    _close(jax.jit(jax.grad(abc_jax.batch_loss))(params, Xs), abc_jax.oracle_grad(params, X))
    # Several parameter sets over one sharded batch.
    stacked = jax.tree.map(lambda *p: jnp.stack(p), params, jax.tree.map(lambda a: 2 * a, params))
    got = jax.vmap(abc_jax.batch_grad, in_axes=(0, None))(stacked, Xs)
    for i in range(2):
        _close(jax.tree.map(lambda a, i=i: a[i], got),
               abc_jax.batch_grad(jax.tree.map(lambda a, i=i: a[i], stacked), X))


def test_importance_weights_survive_sharding():
    params, X = _problem(10)
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, 10))
    Xs = abc_jax.shard_batch(abc_jax.Batch(X, w))
    np.testing.assert_array_equal(np.asarray(Xs.weights[:10]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(Xs.weights[10:]), 0)
    _close(abc_jax.batch_grad(params, Xs), abc_jax.batch_grad(params, abc_jax.Batch(X, w)))
    _close(abc_jax.batch_loss(params, Xs), abc_jax.batch_loss(params, abc_jax.Batch(X, w)))


def test_padding_rows_would_change_the_mean():
    # The weights matter: a zero row has a non-zero loss, so plain zero padding
    # would move the mean.
    params, X = _problem(10)
    Xs = abc_jax.shard_batch(X)
    assert float(abc_jax.loss(params, jnp.zeros(D))) > 0
    unweighted = abc_jax.batch_loss(params, Xs.X)
    assert abs(float(unweighted - abc_jax.batch_loss(params, X))) > 1e-6


@pytest.mark.parametrize("kw", [
    dict(lr=0.05), dict(grad="oracle", optimizer=optax.adam(0.02)),
    dict(lr=0.05, batch_size=4, key=jax.random.key(3))], ids=["full", "oracle-adam", "minibatch"])
def test_train_on_a_sharded_batch_equals_one_device_and_resumes_on_it(kw, tmp_path):
    """10 rows on 4 devices, padded to 12 with 2 rows of weight 0 (mini-batches: 4, 4 and a
    partial 2 of the real rows); a run stopped at epoch 4 and resumed from its checkpoint on
    the sharded batch ends where one device does."""
    params, X = _problem(10)
    kw = dict(kw, epochs=8, progress=False, epochs_per_chunk=4)
    one = abc_jax.train(params, X, **kw)
    abc_jax.train(params, abc_jax.shard_batch(X), **kw | dict(epochs=4), checkpoint_dir=tmp_path)
    with np.load(tmp_path / "checkpoint.npz") as f:
        assert int(f["epoch"]) == 4
    many = abc_jax.train(params, abc_jax.shard_batch(X), **kw, checkpoint_dir=tmp_path)
    assert many.losses.shape == (8,)
    _close(many.losses, one.losses)
    _close(many.params, one.params)
    assert many.params.A.sharding.is_fully_replicated


def test_held_out_evaluation_and_predict_on_a_sharded_batch():
    params, X = _problem(103)
    T = jnp.ones((103, O))
    held = abc_jax.Batch(X[:20], T=T[:20])  # on one device; train replicates it
    kw = dict(lr=0.05, epochs=6, progress=False, epochs_per_chunk=3, eval_every=3,
              eval_data=held)
    many = abc_jax.train(params, abc_jax.shard_batch(abc_jax.Batch(X, T=T)), **kw)
    one = abc_jax.train(params, abc_jax.Batch(X, T=T), **kw)
    _close(many.eval_losses, one.eval_losses)
    for chunk in (None, 8):
        W = abc_jax.predict(params, abc_jax.shard_batch(X), chunk_size=chunk)
        assert W.shape == (103, O)  # the real rows: padding (weight 0) left out
        _close(W, abc_jax.predict(params, X))


def test_gradient_is_replicated_and_params_placed_on_one_device_work():
    params, X = _problem(12)
    params = jax.device_put(params, jax.devices()[0])  # committed to one device
    g = abc_jax.batch_grad(params, abc_jax.shard_batch(X))
    assert g.A.sharding.is_fully_replicated and len(g.A.sharding.device_set) == 4
    _close(g, abc_jax.batch_grad(params, X))


def test_float32_sharded():
    params, X = _problem(9, jnp.float32)
    Xs = abc_jax.shard_batch(X)
    assert Xs.X.dtype == Xs.weights.dtype == jnp.float32
    g = abc_jax.batch_grad(params, Xs)
    assert g.A.dtype == jnp.float32
    _close(g, abc_jax.batch_grad(params, X), rtol=1e-5)


def test_submesh_and_meshes_that_do_not_fit():
    params, X = _problem(6)
    Xs = abc_jax.shard_batch(X, abc_jax.data_mesh(jax.devices()[:2]))
    assert len(Xs.X.sharding.device_set) == 2 and Xs.X.shape == (6, D)
    _close(abc_jax.batch_grad(params, Xs), abc_jax.batch_grad(params, X))
    with pytest.raises(ValueError, match=r"AxisType\.Auto"):
        abc_jax.shard_batch(X, jax.make_mesh((4,), ("data",)))
    with pytest.raises(ValueError, match="'data' axis"):
        abc_jax.shard_batch(X, jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))
    assert abc_jax.shard_local_batch(X).X.shape == (8, D)  # one process: shard_batch


def test_nan_in_sharded_batch_is_reported():
    params, X = _problem(10)
    X = X.at[9, 2].set(jnp.nan)
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"X\[9, 2\]"):
        abc_jax.batch_grad(params, abc_jax.shard_batch(X))


def test_fingerprint_of_a_sharded_batch_is_that_of_the_rows():
    _, X = _problem(10)
    Xs = abc_jax.shard_batch(X)
    np.testing.assert_allclose(fingerprint(Xs.X, Xs.weights), fingerprint(X), rtol=1e-6)


@pytest.mark.parametrize("name", ["batch_grad", "batch_grad_chunked", "batch_value_and_grad",
                                  "oracle_grad", "mean_of_per_sample_grads"])
def test_targets_are_sharded_and_padded_with_the_rows(name):
    # 103 rows of targets over 4 devices: the padding row's target is 0 and weighs 0.
    params, X = _problem(103)
    T = jnp.asarray(np.random.default_rng(2).standard_normal((103, O)))
    Bs = abc_jax.shard_batch(abc_jax.Batch(X, T=T))
    assert Bs.T.shape == (104, O) and len(Bs.T.sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(Bs.T[103:]), 0)
    fn, want = BATCH_FNS[name], BATCH_FNS[name](params, abc_jax.Batch(X, T=T))
    _close(fn(params, Bs), want)
    _close(jax.jit(fn)(params, Bs), want)


def test_train_many_refuses_a_sharded_x():
    """train_many splits members, not rows, over devices, and says so."""
    params, X = _problem(8)
    with pytest.raises(ValueError, match="splits members, not rows"):
        abc_jax.train_many(params, abc_jax.shard_batch(X), lr=[0.1, 0.2], epochs=2,
                           progress=False)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared-X", "per-member-T"])
def test_train_many_splits_its_members_over_the_devices(tmp_path, per_member):
    params, X = _problem(16)
    M, mesh = 8, abc_jax.data_mesh()
    T = jnp.asarray(np.random.default_rng(0).standard_normal((M, 16, O))) if per_member else None
    data = abc_jax.Batch(X, T=T) if per_member else X
    kw = dict(lr=np.geomspace(0.01, 20.0, M), epochs=30, batch_size=5, key=jax.random.key(1),
              progress=False, epochs_per_chunk=10)
    one = abc_jax.train_many(params, data, **kw)
    many = abc_jax.train_many(params, data, mesh=mesh, checkpoint_dir=tmp_path, **kw)
    assert many.params.A.sharding.spec[0] == "data"  # each device holds its members
    assert len(many.params.A.sharding.device_set) == 4
    assert np.asarray(one.diverged).any() and not np.asarray(one.diverged).all()
    np.testing.assert_array_equal(many.diverged, one.diverged)
    finite = np.isfinite(np.asarray(one.losses))
    _close(np.asarray(many.losses)[finite], np.asarray(one.losses)[finite])
    _close(many.params, one.params)
    resumed = abc_jax.train_many(params, data, mesh=mesh, checkpoint_dir=tmp_path,
                                 **kw | dict(epochs=40))
    assert resumed.losses.shape == (M, 40)
    with pytest.raises(ValueError, match="must split the M = 6 members evenly"):
        abc_jax.train_many(params, X, lr=np.ones(6), epochs=2, mesh=mesh, progress=False)


@pytest.mark.parametrize("name", ["batch_jvp", "ggn_vp", "hvp"])
def test_tangent_products_on_a_sharded_batch(name):
    # tangents on one device (committed, as a user's device_put makes them) are replicated
    # over the batch's devices like the params, eagerly; under the caller's jit, as given
    fn = getattr(abc_jax, name)
    params, X = _problem(10)
    V = _problem(11)[0]
    Xs = abc_jax.shard_batch(X)
    want = fn(params, X, V)
    _close(fn(params, Xs, jax.device_put(V, jax.devices()[0])), want)
    _close(jax.jit(fn)(params, Xs, V), want)
