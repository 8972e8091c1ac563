"""The hand-derived backward pass: one sample, a batch, and as a custom_vjp.

Reverse mode through y = A x, u = sigmoid(y), v = B x, z = u + v, w = C z,
L = ||w||^2, with g the cotangent of L (g = 1 for a gradient)::

    gw = 2 g w                (O,)     dL/dw = 2 w
    gC = gw z^T               (O, H)   outer product
    gz = C^T gw               (H,)
    gu = gv = gz              (H,)     z = u + v passes gz to both
    gB = gv x^T               (H, D)
    gy = gu * u * (1 - u)     (H,)     sigmoid'(y) from the saved u
    gA = gy x^T               (H, D)
    gx = A^T gy + B^T gv      (D,)     only needed by the custom_vjp

The homework wrote "2w * C" for C^T gw (a vector, (H,)) and "2w * z" for the
outer product gw z^T (a matrix, (O, H)).

Over a batch X (N, D) of the mean loss, each parameter gradient is a sum of
per-sample outer products, computed as ONE contraction over N::

    gA = (1/N) sum_i gy_i x_i^T = (1/N) GY^T X      (H, D)
    gB = (1/N) GZ^T X,   gC = (1/N) GW^T Z

never as N outer products followed by a mean (about 30x slower at K = 64,
N = 4096, and O(N H D) memory). ``batch_grad`` also uses the Gram form of the
output side where it is cheaper, gZ = 2 Z (C^T C), gC = 2 C (Z^T Z): it never
forms W and costs 6 N K^2 multiply-adds against autodiff's 7 (see
``_value_and_grad_sum``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from abc_jax import validation
from abc_jax.model import (
    Params,
    Residuals,
    _forward,
    _forward_entry,
    as_params,
    describe_overflow,
    prepare_batch,
    prepare_sample,
    sigmoid,
)


def _vjp(params: Params, res: Residuals, g: Any) -> tuple[Params, jax.Array]:
    """Manual VJP of one sample: (parameter cotangents, x cotangent)."""
    A, B, C = params
    x, u, z, w = res
    g = jnp.asarray(g, dtype=w.dtype)
    gw = 2 * g * w  # (O,)    L = ||w||^2       dL/dw = 2 w
    gC = jnp.outer(gw, z)  # (O, H)  w = C z          gw z^T
    gz = C.T @ gw  # (H,)                        C^T gw
    gu = gv = gz  # (H,)    z = u + v          the sum passes gz to both
    gB = jnp.outer(gv, x)  # (H, D)  v = B x          gv x^T
    gy = gu * u * (1 - u)  # (H,)    u = sigmoid(y)   sigmoid'(y) = u (1 - u)
    gA = jnp.outer(gy, x)  # (H, D)  y = A x          gy x^T
    gx = A.T @ gy + B.T @ gv  # (D,)  x feeds A x and B x
    return Params(gA, gB, gC), gx


def manual_vjp(params: Params, residuals: Residuals, g: Any = 1.0) -> Params:
    """The hand-derived backward pass for one sample.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      residuals: from ``forward(params, x)``: x (D,), u (H,), z (H,), w (O,).
      g: cotangent of the scalar loss (1.0 gives the gradient).

    Returns:
      ``Params(gA (H, D), gB (H, D), gC (O, H))`` = g * dL/d(A, B, C), where
      gC = gw z^T, gB = gz x^T, gA = (gz * u * (1 - u)) x^T, gw = 2 g w,
      gz = C^T gw (derivation in the module docstring).
    """
    return _vjp(params, residuals, g)[0]


def _manual_grad(params: Params, x: jax.Array) -> Params:
    return manual_vjp(params, _forward(params, x)[1])


_manual_grad_entry = validation.checked_entry(_manual_grad, prepare_sample, "x", describe_overflow)


def manual_grad(params: Params, x: jax.Array, *, precision: str | None = None) -> Params:
    """dL/d(A, B, C) for one sample x (D,): ``forward`` then ``manual_vjp``.

    ``precision``: matmul precision, None for abc_jax's default ``"highest"``.
    """
    return _manual_grad_entry(params, x, precision=precision)


def _gram_is_cheaper(H: int, O: int) -> bool:
    """2 N H^2 (Gram form) < 3 N O H (direct form) multiply-adds."""
    return 2 * H < 3 * O


def _value_and_grad_sum(
    params: Params, X: jax.Array, valid: jax.Array | None = None, *, gram: bool = False
) -> tuple[jax.Array, Params]:
    """(sum_i L_i, sum_i dL_i/dparams) over the rows of X (N, D) by the manual rule.

    Activations are feature-major, (H, N) with samples along the fast axis, so
    every contraction over N is a plain row-major matmul. The output side has
    two exact forms, chosen by shape (statically):

    - direct: W = C Z, GW = 2 W, gC = GW Z^T, GZ = C^T GW: 3 N O H multiply-adds.
    - Gram (``gram=True``): with M = C^T C (H, H), GZ = C^T (2 C Z) = 2 M Z and
      gC = sum_i 2 C z_i z_i^T = 2 C (Z Z^T): 2 N H^2 multiply-adds, and W is
      never formed. Cheaper when 2H < 3O; at D = H = O = K a gradient costs
      6 N K^2 instead of the 7 N K^2 that autodiff of the forward pass does.
      The gradient is as accurate as the direct form's, but the loss it gives,
      sum_i z_i^T M z_i, has an absolute error of order eps ||C||^2 ||z||^2
      rather than eps ||C z|| ||C|| ||z||: near a minimum where C z ~ 0 but
      z is not small, its relative error grows. So ``batch_grad`` (no loss)
      uses it, and ``train``, which reports the loss, uses the direct form.

    ``valid`` (N,) bool, if given, zeroes the z_i of padding rows, which zeroes
    their loss and every cotangent downstream.
    """
    A, B, C = params
    U = sigmoid(A @ X.T)  # (H, N)  u_i = sigmoid(A x_i)
    Z = U + B @ X.T  # (H, N)  z_i = u_i + B x_i
    if valid is not None:
        Z = jnp.where(valid, Z, 0)
    if gram:
        M2 = 2 * (C.T @ C)  # (H, H)  2 C^T C, independent of N
        GZ = M2 @ Z  # (H, N)  gz_i = C^T gw_i = 2 C^T C z_i
        total = jnp.sum(Z * GZ) / 2  # sum_i z_i^T C^T C z_i = sum_i ||w_i||^2
        gC = 2 * (C @ (Z @ Z.T))  # (O, H)  sum_i gw_i z_i^T = 2 C sum_i z_i z_i^T
    else:  # direct form
        W = C @ Z  # (O, N)  w_i = C z_i
        total = jnp.sum(W * W)
        GW = 2 * W  # (O, N)  gw_i = 2 w_i
        gC = GW @ Z.T  # (O, H)  sum_i gw_i z_i^T
        GZ = C.T @ GW  # (H, N)  gz_i = C^T gw_i
    GY = GZ * U * (1 - U)  # (H, N)  gy_i = gz_i * sigmoid'(y_i), from the saved u_i
    gA = GY @ X  # (H, D)  sum_i gy_i x_i^T
    gB = GZ @ X  # (H, D)  sum_i gz_i x_i^T  (gv_i = gz_i)
    return total, Params(gA, gB, gC)


def _chunked_sum(
    fn: Any, params: Params, X: jax.Array, chunk_size: int | None, n_valid: int | None
) -> Any:
    """Sum ``fn(params, X_chunk, valid_chunk)`` over chunks of rows in one compiled loop.

    ``lax.fori_loop`` with ``lax.dynamic_slice_in_dim`` (no reshaped copy of X)
    over the full chunks, then the remainder as one static slice, so working
    memory is O(chunk_size) whatever N is. Rows at index >= n_valid are padding.
    """
    N = X.shape[0]

    def valid_rows(start: Any, size: int) -> jax.Array | None:
        if n_valid is None or n_valid >= N:
            return None
        return start + jnp.arange(size) < n_valid

    if chunk_size is None or chunk_size >= N:
        return fn(params, X, valid_rows(0, N))
    n_full, rem = divmod(N, chunk_size)

    def body(i: Any, acc: Any) -> Any:
        start = i * chunk_size
        Xi = lax.dynamic_slice_in_dim(X, start, chunk_size)
        return jax.tree.map(jnp.add, acc, fn(params, Xi, valid_rows(start, chunk_size)))

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, params, X[:chunk_size]))
    acc = lax.fori_loop(0, n_full, body, zero)
    if rem:
        start = n_full * chunk_size
        tail = fn(params, X[start:], valid_rows(start, rem))
        acc = jax.tree.map(jnp.add, acc, tail)
    return acc


def _value_and_grad(
    params: Params,
    X: jax.Array,
    chunk_size: int | None = None,
    n_valid: int | None = None,
    *,
    gram: bool = False,
) -> tuple[jax.Array, Params]:
    """(batch_loss, batch_grad) of the mean over the first n_valid rows of X."""
    n = X.shape[0] if n_valid is None else n_valid
    fn = functools.partial(_value_and_grad_sum, gram=gram)
    total, gsum = _chunked_sum(fn, params, X, chunk_size, n_valid)
    return total / n, jax.tree.map(lambda s: s / n, gsum)


def _batch_grad(
    params: Params, X: jax.Array, chunk_size: int | None = None, n_valid: int | None = None
) -> Params:
    gram = _gram_is_cheaper(params.A.shape[0], params.C.shape[0])
    return _value_and_grad(params, X, chunk_size, n_valid, gram=gram)[1]


def _prepare_batch_grad(
    params: Any, X: Any, *, chunk_size: Any = None, precision: Any = None
) -> tuple[Params, jax.Array, dict[str, Any]]:
    params, X, n_valid, chunk_size = prepare_batch(params, X, chunk_size)
    statics = dict(chunk_size=chunk_size, n_valid=n_valid)
    return params, X, statics | dict(precision=validation.check_precision(precision))


_batch_grad_entry = validation.checked_entry(
    _batch_grad, _prepare_batch_grad, "X", describe_overflow
)


def batch_grad(
    params: Params, X: Any, *, chunk_size: int | None = None, precision: str | None = None
) -> Params:
    """Gradient of ``batch_loss`` (the mean over N) by the manual derivation.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      X: samples, shape (N, D); may be sharded across devices (``shard_batch``).
      chunk_size: if given, accumulate over chunks of this many rows inside one
        compiled loop, so working memory does not grow with N (same result to
        rounding). None lets ``model.default_chunk_size`` choose: cache-sized
        chunks for a large batch on one CPU device, else the whole batch.
      precision: matmul precision, None for abc_jax's default ``"highest"``
        (exact float32 on every device); ``"default"`` lets a GPU use TF32.

    Returns:
      ``Params(gA, gB, gC)`` with gA = (1/N) GY^T X, gB = (1/N) GZ^T X,
      gC = (1/N) GW^T Z: one contraction over N per parameter (gC in the
      Gram form 2 C (Z^T Z) / N where that is cheaper; see
      ``_value_and_grad_sum``).

    Raises:
      ValueError, TypeError: a bad argument or NaN/inf in params or X, named.
      FloatingPointError: finite inputs whose gradient overflows the dtype.
    """
    return _batch_grad_entry(params, X, chunk_size=chunk_size, precision=precision)


def _batch_value_and_grad(
    params: Params, X: jax.Array, chunk_size: int | None = None, n_valid: int | None = None
) -> tuple[jax.Array, Params]:
    return _value_and_grad(params, X, chunk_size, n_valid)


_batch_value_and_grad_entry = validation.checked_entry(
    _batch_value_and_grad, _prepare_batch_grad, "X", describe_overflow
)


def batch_value_and_grad(
    params: Params, X: Any, *, chunk_size: int | None = None, precision: str | None = None
) -> tuple[jax.Array, Params]:
    """``(batch_loss, batch_grad)`` in one pass of the manual derivation."""
    return _batch_value_and_grad_entry(params, X, chunk_size=chunk_size, precision=precision)


def _per_sample_grads(params: Params, X: jax.Array) -> Params:
    return jax.vmap(_manual_grad, in_axes=(None, 0))(params, X)


def _prepare_per_sample(
    params: Any, X: Any, *, precision: Any = None
) -> tuple[Params, jax.Array, dict[str, Any]]:
    params, D, _, _, dtype = as_params(params)
    X = validation.check_batch(X, D, dtype)
    return params, X, dict(precision=validation.check_precision(precision))


_per_sample_grads_entry = validation.checked_entry(
    _per_sample_grads, _prepare_per_sample, "X", describe_overflow
)


def per_sample_grads(params: Params, X: jax.Array, *, precision: str | None = None) -> Params:
    """dL_i/d(A, B, C) for every row of X (N, D): each field has a leading N axis.

    ``vmap`` of ``manual_grad``; costs O(N H D) memory, so use ``batch_grad``
    when only the mean is needed.
    """
    return _per_sample_grads_entry(params, X, precision=precision)


@jax.custom_vjp
def _abc_loss(params: Params, x: jax.Array) -> jax.Array:
    return _forward(params, x)[0]


def _abc_loss_fwd(params: Params, x: jax.Array) -> tuple[jax.Array, tuple[Params, Residuals]]:
    L, res = _forward(params, x)
    return L, (params, res)


def _abc_loss_bwd(saved: tuple[Params, Residuals], g: jax.Array) -> tuple[Params, jax.Array]:
    params, res = saved
    return _vjp(params, res, g)


_abc_loss.defvjp(_abc_loss_fwd, _abc_loss_bwd)


def abc_loss(params: Params, x: jax.Array) -> jax.Array:
    """L = ||C (sigmoid(A x) + B x)||^2 for one sample, differentiated by hand.

    A ``jax.custom_vjp`` whose backward pass is ``manual_vjp`` plus the x
    cotangent gx = A^T gy + B^T gz, so ``jax.grad``, ``jax.jit``, ``jax.vmap``,
    Optax and grad-of-grad all run through the hand-written rule. Shapes are
    checked (also on tracers). Under a transformation, values are not checked
    and the products follow the caller's matmul precision, as in any JAX
    function; called eagerly it is ``loss(params, x)``: values checked,
    "highest" precision. Batch it with ``jax.vmap(abc_loss, in_axes=(None, 0))``.
    """
    params, D, _, _, dtype = as_params(params)
    x = validation.check_sample(x, D, dtype)
    if validation.is_traced(params, x):
        return _abc_loss(params, x)
    return _forward_entry(params, x)[0]
