"""The two independent gradients the manual one is checked against.

``oracle_grad`` is ``jax.grad`` of the batch loss (reverse-mode autodiff: the
reference). ``fd_grad`` is central finite differences, the naive method the
homework compared against: 2P loss evaluations for P = 2HD + OH parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from abc_jax.core.model import Batch, Params, batch_loss

oracle_grad = jax.grad(batch_loss)


def fd_grad(params: Params, batch: Batch, eps: jax.Array, batch_size: int) -> Params:
    """dL/dp_j ~ (L(p + eps e_j) - L(p - eps e_j)) / (2 eps), ``batch_size`` j at a time."""
    flat, unravel = ravel_pytree(params)

    def partial_derivative(i: jax.Array) -> jax.Array:
        e = jnp.zeros_like(flat).at[i].set(eps)
        up, down = batch_loss(unravel(flat + e), batch), batch_loss(unravel(flat - e), batch)
        return (up - down) / (2 * eps)

    return unravel(jax.lax.map(partial_derivative, jnp.arange(flat.shape[0]),
                               batch_size=batch_size))
