"""Problems and optimizers the experiments share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import abc_jax


def problem(key: jax.Array, n: int, in_dim: int, hidden_dim: int | None = None,
            out_dim: int | None = None, *, dtype: Any = jnp.float32) -> tuple[abc_jax.Params, Any]:
    """``init_params(kp, in_dim, hidden_dim, out_dim)`` and X (n, in_dim) ~ Normal(0, 1), where
    ``kp, kx = split(key)``."""
    kp, kx = jax.random.split(key)
    params = abc_jax.init_params(kp, in_dim, hidden_dim, out_dim, dtype=dtype)
    return params, jax.random.normal(kx, (n, in_dim), dtype)


OPTIMIZERS: dict[str, tuple[str, Callable[[float], Any]]] = {  # name -> (label, lr -> rule)
    "gd": ("hand-rolled GD", lambda lr: None), "sgd": ("optax.sgd", optax.sgd),  # None: train's
    "momentum": ("optax.sgd momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9)),
    "adam": ("optax.adam", optax.adam)}


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation | None:
    """``OPTIMIZERS[name]`` at learning rate ``lr``: None for "gd" (train's own rule)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name][1](lr)


def rate_kwargs(name: str, lr: float) -> dict[str, Any]:
    """``train``'s keywords for optimizer ``name`` at rate ``lr``: ``lr=`` for the hand-rolled
    rule ("gd"), else ``optimizer=`` carrying the rate."""
    optimizer = make_optimizer(name, lr)
    return {"lr": lr} if optimizer is None else {"optimizer": optimizer}
