"""One compilation cache for the suite, and strict JAX for every test: x64 on, rank promotion
raises, exact matmuls, a key fixture.

abc_jax's own functions compute at "highest" matmul precision by default; the
global setting pins the same for the tests' independent references (plain
jnp), which would otherwise use TF32 on a GPU.
"""

import os
from pathlib import Path

# One persistent compilation cache for the suite and the subprocesses it starts
# (they inherit the environment): a second run, or a second worker of pytest-xdist,
# loads what another compiled instead of compiling it again.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import matplotlib  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture
def key():
    return jax.random.key(0)
