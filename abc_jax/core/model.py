"""The ABC graph: parameters, a batch of rows, the forward pass and the loss.

For one sample x (shape (D,)) and parameters A (H, D), B (H, D), C (O, H)::

    y = A x          (H,)
    u = sigmoid(y)   (H,)
    v = B x          (H,)
    z = u + v        (H,)
    w = C z          (O,)
    L = ||w - t||^2  scalar, t (O,) the target (t = 0: the homework's ||w||^2)

``forward`` takes ONE sample; batch it with ``jax.vmap(f, in_axes=(None, 0))``.

The batch objective is a weighted mean over rows: with X (N, D) and row
weights r_i >= 0 (all 1 by default), ``batch_loss = sum_i r_i L_i / sum_i r_i``.
With unit weights that is the plain mean. The homework minimised the sum over
i; the minimiser is the same, and the mean keeps the learning rate independent
of N. A weight is data, not a static count: padding rows weigh 0, and a user's
importance weights use the same mechanism.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Params(NamedTuple):
    """The three parameter matrices (a pytree)."""

    A: jax.Array  # (H, D)
    B: jax.Array  # (H, D)
    C: jax.Array  # (O, H)


class Residuals(NamedTuple):
    """What the backward pass needs from the forward pass of one sample."""

    x: jax.Array  # (D,)  input
    u: jax.Array  # (H,)  sigmoid(A x): sigmoid'(y) = u (1 - u), nothing recomputed
    z: jax.Array  # (H,)  u + B x
    w: jax.Array  # (O,)  C z
    t: jax.Array | None = None  # (O,) the target; None: t = 0, the homework's loss


class Batch(NamedTuple):
    """Rows of samples, their weights and targets (a pytree: it passes through jit, vmap, grad).

    Every batch function takes either a plain X (N, D), meaning unit weights
    and zero targets (the homework), or a ``Batch``. ``shard_batch`` returns
    one whose padding rows weigh 0.
    """

    X: jax.Array  # (N, D) samples
    weights: jax.Array | None = None  # (N,) r_i >= 0, sum > 0; None: every row weighs 1
    T: jax.Array | None = None  # (N, O) targets, row i the t of X[i]; None: all 0


def init_params(key: jax.Array, D: int, H: int, O: int, dtype: Any) -> Params:
    """A (H, D), B (H, D), C (O, H) with entries ~ Normal(0, 1 / fan_in)."""
    ka, kb, kc = jax.random.split(key, 3)
    return Params(A=jax.random.normal(ka, (H, D), dtype) / jnp.sqrt(D).astype(dtype),
                  B=jax.random.normal(kb, (H, D), dtype) / jnp.sqrt(D).astype(dtype),
                  C=jax.random.normal(kc, (O, H), dtype) / jnp.sqrt(H).astype(dtype))


def sigmoid(y: jax.Array) -> jax.Array:
    """sigmoid(y) = 1 / (1 + exp(-y)), elementwise.

    Finite for every finite y, and so is its derivative sigmoid(y)(1 - sigmoid(y)):
    ``jax.nn.sigmoid`` is XLA's logistic, which never overflows. (The homework's
    two-branch formula as a ``jnp.where`` would give NaN gradients from the
    branch not taken.)
    """
    return jax.nn.sigmoid(y)


def forward(params: Params, x: jax.Array,
            t: jax.Array | None = None) -> tuple[jax.Array, Residuals]:
    """(L, residuals) for one sample x (D,) and target t (O,) (None: 0)."""
    A, B, C = params
    y = A @ x  # (H,)
    u = sigmoid(y)  # (H,)
    v = B @ x  # (H,)
    z = u + v  # (H,)
    w = C @ z  # (O,)
    e = w if t is None else w - t  # (O,)
    L = jnp.sum(e * e)  # scalar, ||w - t||^2
    return L, Residuals(x, u, z, w, t)


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """sum_i r_i v_i / sum_i r_i over the leading axis (the plain mean for None)."""
    if weights is None:
        return jnp.mean(values, axis=0)
    w = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
    return jnp.sum(w * values, axis=0) / jnp.sum(weights)


def batch_loss(params: Params, batch: Batch) -> jax.Array:
    """sum_i r_i L(params, X[i], T[i]) / sum_i r_i: the plain definition ``jax.grad``
    differentiates."""
    losses = jax.vmap(forward, in_axes=(None, 0, 0))(params, batch.X, batch.T)[0]  # (N,)
    return weighted_mean(losses, batch.weights)


def outputs(params: Params, X: jax.Array, chunk_size: int | None = None) -> jax.Array:
    """W (N, O), row i the output w = C z of X[i]; ``chunk_size`` rows at a time."""
    def one(x: jax.Array) -> jax.Array:
        return forward(params, x)[1].w

    return jax.lax.map(one, X, batch_size=chunk_size) if chunk_size else jax.vmap(one)(X)
