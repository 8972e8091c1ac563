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
