"""Forward mode by hand: tangents pushed forward through the same graph.

Where the backward pass sends one cotangent from L back to every input, the
forward pass sends one tangent (dA, dB, dC, dx), a direction in the inputs,
forward to L. The local derivatives are the backward pass's, applied the other
way, one line per forward equation::

    dy = dA x + A dx          (H,)     y = A x
    du = u * (1 - u) * dy     (H,)     u = sigmoid(y), sigmoid'(y) = u (1 - u)
    dv = dB x + B dx          (H,)     v = B x
    dz = du + dv              (H,)     z = u + v
    dw = dC z + C dz          (O,)     w = C z
    dL = 2 (w - t) . (dw - dt)  ()     L = ||w - t||^2  (the homework, t = 0: 2 w . dw)

dL is the directional derivative <dL/d(A, B, C, x, t), (dA, dB, dC, dx, dt)>. It is
linear in the tangent, and its transpose is the backward pass: transposing
dL = 2 (w - t) . (dw - dt) gives gw = 2 g (w - t) and gt = -gw, transposing
dw = dC z + C dz gives gC = gw z^T and gz = C^T gw, and so on up to
gA = gy x^T (a test checks it with ``jax.linear_transpose``).

The cost is the point. One JVP costs about one forward pass and gives ONE
directional derivative; the gradient needs one per parameter, P = 2HD + OH
of them (``jvp_grad``), where one VJP gives all P at once. Forward mode wins
the other way round: few inputs and many outputs (dw/dx for a small D and a
large O is D JVPs against O VJPs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from abc_jax.core.model import Batch, Params, forward, sigmoid


def jvp(params: Params, x: jax.Array, dparams: Params, dx: jax.Array, t: Any = None,
        dt: Any = None) -> tuple[jax.Array, jax.Array]:
    """(L, dL) for one sample x (D,), target t (O,) or None, along (dparams, dx, dt)."""
    A, B, C = params
    dA, dB, dC = dparams
    y, dy = A @ x, dA @ x + A @ dx  # (H,)
    u = sigmoid(y)
    du = u * (1 - u) * dy  # (H,)
    v, dv = B @ x, dB @ x + B @ dx  # (H,)
    z, dz = u + v, du + dv  # (H,)
    w, dw = C @ z, dC @ z + C @ dz  # (O,)
    e = w if t is None else w - t  # (O,)
    de = dw if dt is None else dw - dt  # (O,)
    return e @ e, 2 * (e @ de)


def batch_jvp(params: Params, batch: Batch, dparams: Params) -> tuple[jax.Array, jax.Array]:
    """(batch_loss, its derivative along dparams) over rows X (N, D), as contractions.

    Feature-major like the backward pass: dY = dA X^T (H, N), dW = dC Z + C dZ
    (O, N); the row losses ||w_i - t_i||^2 and their derivatives 2 (w_i - t_i) . dw_i are
    then weighted by r_i and divided by sum(r).
    """
    (A, B, C), (dA, dB, dC) = params, dparams
    Xt = batch.X.T  # (D, N)
    U = sigmoid(A @ Xt)  # (H, N)
    dU = U * (1 - U) * (dA @ Xt)  # (H, N)
    Z, dZ = U + B @ Xt, dU + dB @ Xt  # (H, N)
    W, dW = C @ Z, dC @ Z + C @ dZ  # (O, N)
    E = W if batch.T is None else W - batch.T.T  # (O, N)  w_i - t_i
    L, dL = jnp.sum(E * E, axis=0), 2 * jnp.sum(E * dW, axis=0)  # (N,)
    r = batch.weights
    if r is None:
        return jnp.mean(L), jnp.mean(dL)
    return (r @ L) / jnp.sum(r), (r @ dL) / jnp.sum(r)


def jvp_grad(params: Params, batch: Batch) -> Params:
    """The gradient as P = 2HD + OH directional derivatives, one per basis tangent, vmapped."""
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)  # (P, P): the naive cost, P tangents
    d = jax.vmap(lambda e: batch_jvp(params, batch, unravel(e))[1])(basis)  # (P,)
    return unravel(d)


@jax.custom_jvp
def abc_loss_jvp(params: Params, x: jax.Array, t: Any = None) -> jax.Array:
    """L for one sample as a ``jax.custom_jvp`` whose tangent rule is ``jvp``."""
    return forward(params, x, t)[0]


@abc_loss_jvp.defjvp
def _abc_loss_jvp_rule(primals: tuple[Params, jax.Array, Any],
                       tangents: tuple[Params, jax.Array, Any]) -> tuple[jax.Array, jax.Array]:
    (params, x, t), (dparams, dx, dt) = primals, tangents
    return jvp(params, x, dparams, dx, t, dt)
