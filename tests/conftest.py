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
# Most of the suite's time is XLA compiling small programs that then run for microseconds.
# Two settings make that compiling cheaper: LLVM's backend at -O0 without its expensive
# passes (about a third faster), and XLA:CPU's older elemental emitters for fused loops
# instead of its MLIR fusion emitters (test_train.py from a cold cache: 36 s -> 23 s).
# XLA's own graph optimisations (fusion, simplification) still run; the arithmetic is the
# same IEEE arithmetic (no fast-math either way), so every tolerance holds. Users' code keeps
# XLA's defaults; a caller's XLA_FLAGS that set the backend's level are kept as they are.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (f"{_flags} --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true "
                               "--xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

# Hypothesis: every example at a new shape compiles, so the default run draws a few
# examples (values vary, shapes come from small fixed sets); HYPOTHESIS_PROFILE=ci draws
# many, for a longer run by hand (the integration run's thorough property test sets its own
# count). No deadline: a first example compiles.
settings.register_profile("default", max_examples=6, deadline=None, database=None)
settings.register_profile("ci", max_examples=60, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def key():
    return jax.random.key(0)
