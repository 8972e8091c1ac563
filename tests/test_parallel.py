"""Data parallel: shard_batch on 4 host CPU devices equals one device.

JAX fixes the device count when it starts, so the multi-device checks run in
a subprocess with JAX_NUM_CPU_DEVICES=4; this process only checks what one
device can show.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import parallel
from abc_jax.checkpoint import fingerprint

HERE = Path(__file__).parent


@pytest.mark.slow
def test_multidevice_checks_pass_on_four_cpu_devices():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "multidevice_checks.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_shard_batch_on_one_device_is_plain(key):
    params = abc_jax.init_params(key, 5, 4, 3, dtype=jnp.float64)
    X = jax.random.normal(key, (7, 5), jnp.float64)
    Xs = abc_jax.shard_batch(X)
    assert not isinstance(Xs, abc_jax.ShardedBatch)  # 7 rows divide by 1 device
    np.testing.assert_allclose(abc_jax.batch_grad(params, Xs).A, abc_jax.batch_grad(params, X).A,
                               rtol=1e-12)


def test_shard_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="X must be a batch"):
        abc_jax.shard_batch(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="X must be a batch"):
        abc_jax.shard_batch(np.zeros(3))
    with pytest.raises(TypeError, match="mesh"):
        abc_jax.shard_batch(np.zeros((2, 3)), mesh="data")


# --- several processes: what one process can check --------------------------


def simulate(layout: parallel._Layout) -> np.ndarray:
    """Global row index at each target position (-1: padding), by following the transfers."""
    R1, R = layout.source_rows, layout.target_rows
    source = np.full((layout.ndev, R1), -1)
    device, first = 0, 0
    for count, ndev in zip(layout.counts, layout.devices, strict=True):
        rows = np.arange(first, first + count)
        for j in range(ndev):
            block = rows[j * R1 : (j + 1) * R1]
            source[device, : len(block)] = block
            device += 1
        first += count
    target = np.full((layout.ndev, R), -1)
    for d, k, s_off, t_off, count in layout.transfers():
        assert count <= min(R, R1) and t_off + count <= R and s_off + count <= R1
        assert (target[k, t_off : t_off + count] == -1).all()  # nothing written twice
        target[k, t_off : t_off + count] = source[d, s_off : s_off + count]
    return target.reshape(-1)


@pytest.mark.parametrize(
    ("counts", "devices"),
    [((600, 401), (2, 2)), ((401, 600), (2, 2)), ((1000, 3), (2, 2)), ((500, 500), (2, 2)),
     ((0, 5, 7), (1, 2, 3)), ((3, 0, 1), (2, 2, 2)), ((1,), (4,)), ((7, 7, 7, 7), (1, 1, 1, 1))],
)
def test_rows_move_into_process_order_with_the_padding_at_the_end(counts, devices):
    layout = parallel._Layout(counts, devices)
    got = simulate(layout)
    n = sum(counts)
    assert layout.target_rows == -(-n // sum(devices))
    np.testing.assert_array_equal(got[:n], np.arange(n))  # process 0's rows, then 1's, ...
    assert (got[n:] == -1).all()


def test_fingerprint_sees_the_numbers_not_the_layout():
    X = np.random.default_rng(0).standard_normal((10, 4))
    a = fingerprint(X)
    assert a == fingerprint(jnp.asarray(X)) == fingerprint(np.pad(X, ((0, 2), (0, 0))), n_rows=10)
    assert a.startswith("float64(10,4):") and len(a.split(":")[1]) == 32
    swapped = X[[1, 0, *range(2, 10)]]
    changed = X.copy()
    changed[9, 3] = np.nextafter(changed[9, 3], 1)  # one bit
    others = {fingerprint(swapped), fingerprint(changed), fingerprint(X[:9]),
              fingerprint(X.astype(np.float32)), fingerprint(X.T.copy())}
    assert a not in others and len(others) == 5


def test_one_process_helpers_need_no_runtime(key):
    assert parallel.is_main_process()
    assert parallel.failed_processes(True) == [] and parallel.failed_processes(False) == [0]
    assert parallel.broadcast_bytes(b"abc") == b"abc" and parallel.broadcast_bytes(None) is None
    parallel.check_same_on_all_processes({"lr": 0.1}, "train")  # nothing to compare
    X = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(abc_jax.parallel.shard_local_batch(X), X)


@pytest.mark.parametrize(
    ("address", "message"),
    [("localhost", "HOST:PORT"), ("localhost:0", "HOST:PORT"), (":123", "HOST:PORT"),
     ("host:port", "HOST:PORT"), (1234, "HOST:PORT")],
)
def test_initialize_distributed_checks_its_arguments_first(address, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed(address, 2, 1)
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 1, heartbeat_timeout=0)
