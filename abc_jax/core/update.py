"""The homework's update rule p <- p - lr * g, as an Optax transformation.

One epoch on the full batch, with p_e the parameters before epoch e and s_e
the optimizer state::

    L_e, g_e       = batch_loss(p_e, X), d batch_loss / dp (p_e)
    u_e, s_{e+1}   = optimizer.update(g_e, s_e, p_e)
    p_{e+1}        = p_e + u_e

``gradient_descent(lr)`` keeps lr in its state, so the rule and any Optax
optimizer go through one step and the learning rate is data: one compiled
loop serves every lr (and a stack of them, one per member).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GDState(NamedTuple):
    """State of ``gradient_descent``: the learning rate, as data."""

    lr: jax.Array  # ()


def gd_update(grads: Any, state: GDState, params: Any = None) -> tuple[Any, GDState]:
    """(-lr * grads, state): the arithmetic of ``optax.sgd(lr)``."""
    del params
    return jax.tree.map(lambda g: -state.lr * g, grads), state


def gradient_descent(lr: float) -> optax.GradientTransformation:
    """The homework's rule p <- p - lr * g, as an Optax transformation.

    ``init(params)`` puts lr into the state, in the params' dtype;
    ``update(grads, state, params) -> (-lr * grads, state)``. Every lr shares
    one ``update``, so one compiled loop.
    """
    def init(params: Any) -> GDState:
        return GDState(jnp.asarray(lr, jax.tree.leaves(params)[0].dtype))

    return optax.GradientTransformation(init, gd_update)
