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

Over a batch X (N, D) with row weights r_i >= 0 (all 1 by default), the loss
is sum_i r_i L_i / sum_i r_i and each parameter gradient is a weighted sum of
per-sample outer products, computed as ONE contraction over N::

    gA = sum_i r_i gy_i x_i^T / sum_i r_i = GY^T X / sum(r)      (H, D)
    gB = GZ^T X / sum(r),   gC = GW^T Z / sum(r)

with the weight put in once, at the top: gw_i = 2 r_i w_i, so every cotangent
below it carries r_i and a padding row (r_i = 0) contributes exactly nothing.
Never N outer products followed by a mean (about 20x slower at K = 64,
N = 4096, and O(N H D) memory). ``batch_grad`` uses the Gram form of the output
side where it is cheaper: W never formed, 6 N K^2 multiply-adds against autodiff's 7
(``_value_and_grad_sum``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from abc_jax import validation
from abc_jax.model import Batch, Params, Residuals, _forward, as_params, as_sample, prepare, sigmoid


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

    ``residuals`` come from ``forward(params, x)``: x (D,), u (H,), z (H,), w (O,);
    ``g`` is the scalar cotangent of L (1.0 gives the gradient). Returns
    ``Params(gA (H, D), gB (H, D), gC (O, H))`` = g * dL/d(A, B, C), where
    gC = gw z^T, gB = gz x^T, gA = (gz * u * (1 - u)) x^T, gw = 2 g w,
    gz = C^T gw (derivation in the module docstring).
    """
    if jnp.ndim(g) != 0:
        raise ValueError(f"g must be a scalar, the cotangent of the scalar loss L, got shape "
                         f"{jnp.shape(g)}; for a batch, vmap manual_vjp over the residuals")
    return _vjp(params, residuals, g)[0]


def _manual_grad(params: Params, x: jax.Array) -> Params:
    return _vjp(params, _forward(params, x)[1], 1.0)[0]


def manual_grad(params: Params, x: jax.Array, *, precision: str | None = None) -> Params:
    """dL/d(A, B, C) for one sample x (D,), as ``Params`` of A's, B's, C's shapes.

    ``forward`` then ``manual_vjp``; ``precision`` as in ``batch_grad``.
    """
    params, D, _, _, dtype = as_params(params)
    x = as_sample(x, D, dtype)
    return validation.run(_manual_grad, params, x, name="x", precision=precision)


# --- a batch: contractions over N -------------------------------------------


def _value_and_grad_sum(params: Params, X: jax.Array, r: jax.Array | None,
                        gram: bool) -> tuple[jax.Array, Params, jax.Array]:
    """(sum_i r_i L_i, sum_i r_i dL_i/dparams, sum_i r_i) over rows X (N, D), by hand.

    Activations are feature-major, (H, N), so every contraction over N is a
    plain matmul. The output side has two exact forms, chosen by shape:

    - direct: W = C Z, GW = 2 W r, gC = GW Z^T, GZ = C^T GW: 3 N O H multiply-adds.
    - Gram (``gram``): with M = C^T C (H, H), GZ = 2 M (Z r) and gC = 2 C (Z r) Z^T:
      2 N H^2 multiply-adds and W is never formed; cheaper when 2H < 3O. Its
      loss, sum_i r_i z_i^T M z_i, has an absolute error of order eps ||C||^2 ||z||^2,
      large relative to L near a minimum where C z ~ 0: so ``batch_grad`` (no
      loss) uses it, and training, which reports the loss, the direct form.
    """
    A, B, C = params
    U = sigmoid(A @ X.T)  # (H, N)  u_i = sigmoid(A x_i)
    Z = U + B @ X.T  # (H, N)  z_i = u_i + B x_i
    if gram:
        Zr = Z if r is None else Z * r[None, :]  # (H, N)  r_i z_i
        GZ = 2 * (C.T @ C) @ Zr  # (H, N)  gz_i = C^T gw_i = 2 r_i C^T C z_i
        total = jnp.sum(Z * GZ) / 2  # sum_i r_i ||C z_i||^2
        gC = 2 * (C @ (Zr @ Z.T))  # (O, H)  sum_i gw_i z_i^T = 2 C sum_i r_i z_i z_i^T
    else:
        W = C @ Z  # (O, N)  w_i = C z_i
        GW = 2 * W if r is None else 2 * W * r[None, :]  # (O, N)  gw_i = 2 r_i w_i
        total = jnp.sum(W * GW) / 2  # sum_i r_i ||w_i||^2
        gC = GW @ Z.T  # (O, H)  sum_i gw_i z_i^T
        GZ = C.T @ GW  # (H, N)  gz_i = C^T gw_i
    GY = GZ * U * (1 - U)  # (H, N)  gy_i = gz_i * sigmoid'(y_i), from the saved u_i
    gA = GY @ X  # (H, D)  sum_i gy_i x_i^T
    gB = GZ @ X  # (H, D)  sum_i gz_i x_i^T  (gv_i = gz_i)
    weight = jnp.asarray(X.shape[0], X.dtype) if r is None else jnp.sum(r)
    return total, Params(gA, gB, gC), weight


def _chunked_sum(fn: Any, X: jax.Array, r: jax.Array | None, chunk_size: int | None) -> Any:
    """sum over chunks of rows of ``fn(X_chunk, r_chunk)``, in one compiled loop.

    ``lax.fori_loop`` over dynamic slices (no reshaped copy of X), then the
    remainder as one static slice: working memory is O(chunk_size).
    """
    N = X.shape[0]
    if chunk_size is None or chunk_size >= N:
        return fn(X, r)
    n_full, rem = divmod(N, chunk_size)

    def rows(a: Any, start: Any) -> Any:
        return None if a is None else lax.dynamic_slice_in_dim(a, start, chunk_size)

    def body(i: Any, acc: Any) -> Any:
        part = fn(rows(X, i * chunk_size), rows(r, i * chunk_size))
        return jax.tree.map(jnp.add, acc, part)

    shapes = jax.eval_shape(fn, X[:chunk_size], None if r is None else r[:chunk_size])
    acc = lax.fori_loop(0, n_full, body, jax.tree.map(jnp.zeros_like, shapes))
    if rem:
        tail = fn(X[n_full * chunk_size:], None if r is None else r[n_full * chunk_size:])
        acc = jax.tree.map(jnp.add, acc, tail)
    return acc


def _value_and_grad(params: Params, batch: Batch, chunk_size: int | None = None,
                    gram: bool = False) -> tuple[jax.Array, Params]:
    """(batch_loss, its gradient) by the manual rule: weighted sums, then one division."""
    def fn(X: jax.Array, r: jax.Array | None) -> Any:
        return _value_and_grad_sum(params, X, r, gram)

    total, gsum, weight = _chunked_sum(fn, batch.X, batch.weights, chunk_size)
    return total / weight, jax.tree.map(lambda g: g / weight, gsum)


def _batch_grad(params: Params, batch: Batch, chunk_size: int | None = None) -> Params:
    H, O = params.A.shape[0], params.C.shape[0]
    return _value_and_grad(params, batch, chunk_size, gram=2 * H < 3 * O)[1]


# Working set per chunk that stays in a CPU core's cache share, and the fewest
# rows that keep the matmuls efficient (at K = 1024, 256-row chunks were 1.5x
# slower than the whole batch).
_CPU_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_ROWS = 1024


def default_chunk_size(X: Any, H: int, O: int) -> int | None:
    """Rows per chunk when ``chunk_size`` is None: cache-sized on one CPU device, else all.

    On a CPU, a batch whose activations (about D + 2H + O numbers per row)
    exceed a few MiB runs in chunks that fit the cache: the same FLOPs, fewer
    trips to main memory (at K = 256, N = 65536, about 1.5x faster). On a GPU,
    for X sharded over several devices, or traced: None, the whole batch.
    """
    if isinstance(X, jax.core.Tracer):
        return None
    devices = getattr(getattr(X, "sharding", None), "device_set", None)
    if devices is None or len(devices) != 1:
        return None
    if next(iter(devices)).platform != "cpu":
        return None
    N, D = X.shape
    rows = max(_MIN_CHUNK_ROWS, _CPU_CHUNK_BYTES // ((D + 2 * H + O) * X.dtype.itemsize))
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return rows if rows < N else None


def _prepare_chunks(params: Any, X: Any, chunk_size: Any) -> tuple[Params, Batch, int | None]:
    params, batch = prepare(params, X)
    chunk_size = validation.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if chunk_size is None:
        chunk_size = default_chunk_size(batch.X, params.A.shape[0], params.C.shape[0])
    return params, batch, chunk_size


def batch_grad(params: Params, X: Any, *, chunk_size: int | None = None,
               precision: str | None = None) -> Params:
    """Gradient of ``batch_loss`` by the manual derivation.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      X: samples (N, D), or a ``Batch(X, weights)`` (e.g. from ``shard_batch``).
      chunk_size: accumulate over chunks of this many rows in one compiled loop,
        so memory does not grow with N (same result to rounding). None:
        ``default_chunk_size``'s choice.
      precision: matmul precision, None for abc_jax's default ``"highest"``
        (exact float32 on every device); ``"default"`` lets a GPU use TF32.

    Returns:
      ``Params(gA, gB, gC)`` = (GY^T X, GZ^T X, GW^T Z) / sum(r): one contraction
      over N per parameter (gC in the Gram form where that is cheaper).

    Raises:
      ValueError, TypeError: a bad argument or NaN/inf in params or X, named.
      FloatingPointError: finite inputs whose gradient overflows the dtype.
    """
    params, batch, chunk_size = _prepare_chunks(params, X, chunk_size)
    return validation.run(_batch_grad, params, batch, name="X", chunk_size=chunk_size,
                          precision=precision)


def batch_value_and_grad(params: Params, X: Any, *, chunk_size: int | None = None,
                         precision: str | None = None) -> tuple[jax.Array, Params]:
    """``(loss (), Params of gradients)``: ``batch_loss`` and ``batch_grad`` in one pass.

    The direct form of the manual derivation; arguments as in ``batch_grad``.
    """
    params, batch, chunk_size = _prepare_chunks(params, X, chunk_size)
    return validation.run(_value_and_grad, params, batch, name="X", chunk_size=chunk_size,
                          precision=precision)


def _per_sample_grads(params: Params, batch: Batch) -> Params:
    grads = jax.vmap(_manual_grad, in_axes=(None, 0))(params, batch.X)
    if batch.weights is None:
        return grads
    return jax.tree.map(lambda g: g * batch.weights[:, None, None], grads)


def per_sample_grads(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """r_i dL_i/d(A, B, C) for every row of X (N, D): A, B (N, H, D), C (N, O, H).

    ``vmap`` of ``manual_grad`` times the row weight r_i (1 for a plain X, 0
    for padding), so ``batch_grad`` is their sum over sum(r). O(N H D) memory.
    """
    params, batch = prepare(params, X)
    return validation.run(_per_sample_grads, params, batch, name="X", precision=precision)


# --- the one-sample loss as a custom_vjp --------------------------------------


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

    x (D,) -> scalar. A ``jax.custom_vjp`` whose backward pass is ``manual_vjp``
    plus gx = A^T gy + B^T gz, so ``jax.grad``, ``jax.jit``, ``jax.vmap``, Optax
    and grad-of-grad run through the hand-written rule. Shapes are always
    checked; under a transformation values are not, and the caller's matmul
    precision applies; called eagerly it is ``loss(params, x)``. Batch it with
    ``jax.vmap(abc_loss, in_axes=(None, 0))``. Forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``) needs ``abc_loss_jvp``: asking this one
    raises a TypeError that says so (``jax.hessian``, forward over reverse, works).
    """
    params, D, _, _, dtype = as_params(params)
    x = as_sample(x, D, dtype)
    if not validation.is_traced(params, x):
        return validation.run(_abc_loss, params, x, name="x",
                              precision=validation.DEFAULT_PRECISION)
    try:
        return _abc_loss(params, x)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError("abc_loss has a hand-derived reverse rule (jax.custom_vjp), which JAX "
                        "cannot push tangents through: for jax.jvp, jax.jacfwd or "
                        "jax.linearize use abc_loss_jvp, its twin with the hand-derived "
                        "forward rule (jax.custom_jvp)") from None
