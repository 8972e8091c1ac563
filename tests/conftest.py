"""Strict JAX for every test: x64 on, rank promotion raises, a key fixture."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import matplotlib  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture
def key():
    return jax.random.key(0)
