"""Data parallel: shard_batch on 4 host CPU devices equals one device (training and resuming
included).

JAX fixes the device count when it starts, so the multi-device checks
(tests/multidevice_checks.py) run in one subprocess with JAX_NUM_CPU_DEVICES=4;
this process checks what one device can show.
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

HERE = Path(__file__).parent


@pytest.mark.integration
def test_multidevice_checks_pass_on_four_cpu_devices():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
         str(HERE / "multidevice_checks.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_shard_batch_on_one_device_is_a_batch_of_unit_weights(key):
    params = abc_jax.init_params(key, 5, 4, 3, dtype=jnp.float64)
    X = jax.random.normal(key, (7, 5), jnp.float64)
    Xs = abc_jax.shard_batch(X)
    assert isinstance(Xs, abc_jax.Batch) and Xs.X.shape == (7, 5)  # 7 rows divide by 1 device
    np.testing.assert_array_equal(np.asarray(Xs.X), np.asarray(X))
    np.testing.assert_array_equal(np.asarray(Xs.weights), np.ones(7))
    np.testing.assert_allclose(abc_jax.batch_grad(params, Xs).A, abc_jax.batch_grad(params, X).A,
                               rtol=1e-12)
    np.testing.assert_allclose(jax.jit(abc_jax.batch_loss)(params, Xs),
                               abc_jax.batch_loss(params, X), rtol=1e-12)


def test_shard_batch_keeps_weights_and_casts_them_like_X():
    w = np.array([1.0, 0.0, 2.5])
    Xs = abc_jax.shard_batch(abc_jax.Batch(np.ones((3, 2), np.float32), w))
    assert Xs.weights.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(Xs.weights), w)
    assert abc_jax.shard_batch(np.ones((2, 2), np.int32)).weights.dtype == np.float32
    assert abc_jax.shard_batch([[1.0, 2.0]]).X.shape == (1, 2)  # a nested list is an array too


def test_shard_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one sample"):
        abc_jax.shard_batch(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="X must be a batch"):
        abc_jax.shard_batch(np.zeros(3))
    with pytest.raises(TypeError, match="real numbers"):
        abc_jax.shard_batch(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\)"):
        abc_jax.shard_batch(abc_jax.Batch(np.zeros((2, 3)), np.ones(3)))
    with pytest.raises(TypeError, match="mesh"):
        abc_jax.shard_batch(np.zeros((2, 3)), mesh="data")


def test_one_process_helpers_need_no_runtime(key):
    assert parallel.is_main_process()
    assert parallel.failed_processes(True) == [] and parallel.failed_processes(False) == [0]
    assert parallel.broadcast_bytes(b"abc") == b"abc" and parallel.broadcast_bytes(None) is None
    parallel.check_same_on_all_processes({"lr": 0.1}, "train")  # nothing to compare
    X = np.arange(12.0).reshape(4, 3)
    local = parallel.shard_local_batch(X)
    assert isinstance(local, abc_jax.Batch)
    np.testing.assert_array_equal(np.asarray(local.X), X)
    np.testing.assert_array_equal(np.asarray(local.weights), np.ones(4))


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
    with pytest.raises(ValueError, match="num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 1, heartbeat_timeout=0)
