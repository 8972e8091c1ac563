"""Strict JAX for every test: x64 on, rank promotion raises, exact matmuls, a key fixture.

abc_jax's own functions compute at "highest" matmul precision by default; the
global setting pins the same for the tests' independent references (plain
jnp), which would otherwise use TF32 on a GPU.
"""

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
