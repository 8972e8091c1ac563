"""Checks that need several devices; run by test_parallel.py in a subprocess
with JAX_NUM_CPU_DEVICES=4 (the device count is fixed when JAX starts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")

D, H, O = 5, 4, 3


def _problem(n, dtype=jnp.float64):
    kp, kx = jax.random.split(jax.random.key(n))
    return abc_jax.init_params(kp, D, H, O, dtype=dtype), jax.random.normal(kx, (n, D), dtype)


def _close(a, b, rtol=1e-12):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("n", [8, 10, 13, 3])
def test_sharded_equals_one_device(n):
    params, X = _problem(n)
    Xs = abc_jax.shard_batch(X)
    padded = n % 4 != 0
    assert isinstance(Xs, abc_jax.ShardedBatch) == padded
    arr = Xs.X if padded else Xs
    assert len(arr.sharding.device_set) == 4
    assert arr.shape[0] % 4 == 0
    _close(abc_jax.batch_grad(params, Xs), abc_jax.batch_grad(params, X))
    _close(abc_jax.oracle_grad(params, Xs), abc_jax.oracle_grad(params, X))
    _close(abc_jax.batch_grad(params, Xs, chunk_size=3), abc_jax.batch_grad(params, X))
    np.testing.assert_allclose(abc_jax.batch_loss(params, Xs), abc_jax.batch_loss(params, X),
                               rtol=1e-12)


def test_padding_rows_would_change_the_mean():
    # The mask matters: a zero row has a non-zero loss, so plain zero padding
    # would move the mean.
    params, X = _problem(10)
    Xpad = jnp.pad(X, ((0, 2), (0, 0)))
    assert float(abc_jax.loss(params, jnp.zeros(D))) > 0
    assert abs(float(abc_jax.batch_loss(params, Xpad) - abc_jax.batch_loss(params, X))) > 1e-6


def test_gradient_is_replicated_and_params_placed_on_one_device_work():
    params, X = _problem(12)
    params = jax.device_put(params, jax.devices()[0])  # committed to one device
    g = abc_jax.batch_grad(params, abc_jax.shard_batch(X))
    assert g.A.sharding.is_fully_replicated
    _close(g, abc_jax.batch_grad(params, X))


def test_float32_sharded():
    params, X = _problem(9, jnp.float32)
    g = abc_jax.batch_grad(params, abc_jax.shard_batch(X))
    assert g.A.dtype == jnp.float32
    _close(g, abc_jax.batch_grad(params, X), rtol=1e-5)


def test_submesh_and_explicit_mesh():
    params, X = _problem(6)
    Xs = abc_jax.shard_batch(X, abc_jax.data_mesh(jax.devices()[:2]))
    assert len(Xs.sharding.device_set) == 2
    _close(abc_jax.batch_grad(params, Xs), abc_jax.batch_grad(params, X))
    with pytest.raises(ValueError, match=r"AxisType\.Auto"):
        abc_jax.shard_batch(X, jax.make_mesh((4,), ("data",)))
    with pytest.raises(ValueError, match="'data' axis"):
        abc_jax.shard_batch(X, jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))


def test_nan_in_sharded_batch_is_reported():
    params, X = _problem(10)
    X = X.at[9, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"X\[9, 2\]"):
        abc_jax.batch_grad(params, abc_jax.shard_batch(X))


@pytest.mark.parametrize(("counts", "devices"), [((6, 3), (2, 2)), ((3, 6), (2, 2)),
                                                  ((1, 0, 8), (1, 1, 2)), ((4, 4), (2, 2)),
                                                  ((2, 5, 0, 3), (1, 1, 1, 1))])
def test_rows_of_several_processes_move_into_order_on_the_devices(counts, devices):
    # The move shard_local_batch makes, with the 4 devices of this process standing in for
    # the devices of several processes: only neighbour-to-neighbour copies, no all-gather.
    from abc_jax.parallel import _Layout, _redistribute, data_mesh

    layout = _Layout(counts, devices)
    R1, n = layout.source_rows, layout.n
    X = np.arange(1, n * 2 + 1, dtype=np.float64).reshape(n, 2)  # no row is zero
    source, first = [], 0
    for count, ndev in zip(counts, devices, strict=True):
        rows = np.zeros((ndev * R1, 2))
        rows[:count] = X[first : first + count]
        source.append(rows)
        first += count
    mesh = data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    moved = _redistribute(jax.device_put(np.concatenate(source), sharding), layout, mesh)
    expected = np.zeros((4 * layout.target_rows, 2))
    expected[:n] = X
    np.testing.assert_array_equal(np.asarray(moved), expected)
    assert moved.sharding.is_equivalent_to(sharding, 2)


def test_the_move_sends_blocks_not_the_whole_batch():
    from abc_jax.parallel import _Layout, _mover, data_mesh

    mesh = data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    source = jax.device_put(np.zeros((1200, 8)), sharding)
    hlo = _mover(_Layout((600, 401), (2, 2)), mesh).lower(source).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_fingerprint_of_a_sharded_batch_is_that_of_the_rows():
    from abc_jax.checkpoint import fingerprint

    _, X = _problem(10)
    Xs = abc_jax.shard_batch(X)
    assert fingerprint(Xs.X, n_rows=Xs.n) == fingerprint(X)


def test_a_key_replicates_over_the_mesh():
    from abc_jax.parallel import replicate_like

    _, X = _problem(8)
    k = replicate_like(jax.random.key(3), abc_jax.shard_batch(X))
    assert k.sharding.is_fully_replicated and len(k.sharding.device_set) == 4
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(jax.random.key(3)))
