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

from abc_jax import validation
from abc_jax.model import (
    Batch,
    Params,
    _forward,
    as_sample,
    as_sample_and_target,
    prepare,
    sigmoid,
)


def _jvp(params: Params, x: jax.Array, dparams: Params, dx: jax.Array, t: Any = None,
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


def _batch_jvp(params: Params, batch: Batch, dparams: Params) -> tuple[jax.Array, jax.Array]:
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


def _jvp_grad(params: Params, batch: Batch) -> Params:
    """The gradient as P directional derivatives, one per basis tangent, vmapped."""
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)  # (P, P): the naive cost, P tangents
    d = jax.vmap(lambda e: _batch_jvp(params, batch, unravel(e))[1])(basis)  # (P,)
    return unravel(d)


def _check_tangents(tangents: Any, params: Params, dtype: Any) -> Params:
    """``tangents`` checked to have the params' shapes, cast to their dtype."""
    arrays, _ = validation.check_params(tangents, "tangents")
    for name, a, p in zip("ABC", arrays, params, strict=True):
        if tuple(a.shape) != p.shape:
            raise ValueError(f"tangents.{name} must have the shape of params.{name}, "
                             f"{p.shape}, got {tuple(a.shape)}")
    return Params(*(validation.as_array(a, f"tangents.{name}", dtype)
                    for name, a in zip("ABC", arrays, strict=True)))


def manual_jvp(params: Params, x: Any, tangents: Params, x_tangent: Any = None, *,
               t: Any = None, t_tangent: Any = None,
               precision: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(L, dL), two scalars: the loss of one sample and its derivative along a tangent.

    x (D,); ``tangents`` = ``Params(dA (H, D), dB (H, D), dC (O, H))``, a
    direction; ``x_tangent`` dx (D,) or None for 0; t (O,) the target (None: 0) and
    ``t_tangent`` dt (O,) (None: 0). dL = <dL/d(A, B, C, x, t), (dA, dB, dC, dx, dt)>, as
    ``jax.jvp(loss, (params, x, t), (tangents, x_tangent, t_tangent))``.
    ``precision``: matmul precision, None for abc_jax's ``"highest"``.
    """
    params, x, t = as_sample_and_target(params, x, t)
    D, O, dtype = x.shape[0], params.C.shape[0], x.dtype
    dparams = _check_tangents(tangents, params, dtype)
    dx = jnp.zeros_like(x) if x_tangent is None else as_sample(x_tangent, D, dtype, "x_tangent")
    if t_tangent is not None:
        if t is None:
            raise ValueError("t_tangent needs t: it is the direction the target moves in")
        t_tangent = as_sample(t_tangent, O, dtype, "t_tangent", ("one target", "O", "rows of C"))
    return validation.run(_jvp, params, x, dparams, dx, t, t_tangent,
                          name=("x", "tangents", "x_tangent", "t", "t_tangent"),
                          precision=precision)


def batch_jvp(params: Params, X: Any, tangents: Params, *,
              precision: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(batch_loss, its derivative along ``tangents``) for X (N, D) or a ``Batch``, by hand.

    Two scalars, for about twice the cost of a forward pass.
    """
    params, batch = prepare(params, X)
    dparams = _check_tangents(tangents, params, params.A.dtype)
    return validation.run(_batch_jvp, params, batch, dparams, name="X", precision=precision)


def jvp_grad(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """The gradient of batch_loss (``Params``) from P = 2HD + OH manual JVPs.

    Forward mode's way to a gradient: P directional derivatives along the basis
    tangents, vmapped (P^2 memory, like ``jax.jacfwd``). Equals ``batch_grad``
    to rounding.
    """
    params, batch = prepare(params, X)
    return validation.run(_jvp_grad, params, batch, name="X", precision=precision)


@jax.custom_jvp
def _abc_loss_jvp(params: Params, x: jax.Array, t: Any = None) -> jax.Array:
    return _forward(params, x, t)[0]


@_abc_loss_jvp.defjvp
def _abc_loss_jvp_rule(primals: tuple[Params, jax.Array, Any],
                       tangents: tuple[Params, jax.Array, Any]) -> tuple[jax.Array, jax.Array]:
    (params, x, t), (dparams, dx, dt) = primals, tangents
    return _jvp(params, x, dparams, dx, t, dt)


def abc_loss_jvp(params: Params, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """L for one sample x (D,) (target t (O,), None: 0) as a ``jax.custom_jvp`` with
    ``manual_jvp``'s tangent rule.

    ``abc_loss``'s twin: ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``,
    ``jax.linearize`` use the hand-derived tangents (t's too); ``jax.grad``
    transposes them. Shapes are checked; values when called eagerly (as ``abc_loss``).
    """
    params, x, t = as_sample_and_target(params, x, t)
    if validation.is_traced(params, x, t):
        return _abc_loss_jvp(params, x, t)
    return validation.run(_abc_loss_jvp, params, x, t, name=("x", "t"),
                          precision=validation.DEFAULT_PRECISION)
