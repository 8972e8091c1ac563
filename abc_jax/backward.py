"""The hand-derived backward pass: one sample, a batch, and as a custom_vjp.

Reverse mode through y = A x, u = sigmoid(y), v = B x, z = u + v, w = C z,
L = ||w - t||^2 (t the target, 0 in the homework), with g the cotangent of L
(g = 1 for a gradient)::

    gw = 2 g (w - t)          (O,)     dL/dw = 2 (w - t)
    gC = gw z^T               (O, H)   outer product
    gz = C^T gw               (H,)
    gu = gv = gz              (H,)     z = u + v passes gz to both
    gB = gv x^T               (H, D)
    gy = gu * u * (1 - u)     (H,)     sigmoid'(y) from the saved u
    gA = gy x^T               (H, D)
    gx = A^T gy + B^T gv      (D,)     only needed by the custom_vjp
    gt = -gw                  (O,)     likewise

The homework wrote "2w * C" for C^T gw (a vector, (H,)) and "2w * z" for the
outer product gw z^T (a matrix, (O, H)).

Over a batch X (N, D) with row weights r_i >= 0 (all 1 by default), the loss
is sum_i r_i L_i / sum_i r_i and each parameter gradient is a weighted sum of
per-sample outer products, computed as ONE contraction over N::

    gA = sum_i r_i gy_i x_i^T / sum_i r_i = GY^T X / sum(r)      (H, D)
    gB = GZ^T X / sum(r),   gC = GW^T Z / sum(r)

with the weight put in once, at the top: gw_i = 2 r_i (w_i - t_i), so every cotangent
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
from abc_jax.model import (
    Batch,
    Params,
    Residuals,
    _forward,
    as_sample_and_target,
    prepare,
    sigmoid,
)


def _vjp(params: Params, res: Residuals, g: Any) -> tuple[Params, jax.Array, Any]:
    """Manual VJP of one sample: (parameter cotangents, x cotangent, t cotangent)."""
    A, B, C = params
    x, u, z, w, t = res
    g = jnp.asarray(g, dtype=w.dtype)
    e = w if t is None else w - t  # (O,)  the residual w - t (t = 0: w)
    gw = 2 * g * e  # (O,)    L = ||w - t||^2   dL/dw = 2 (w - t)
    gC = jnp.outer(gw, z)  # (O, H)  w = C z          gw z^T
    gz = C.T @ gw  # (H,)                        C^T gw
    gu = gv = gz  # (H,)    z = u + v          the sum passes gz to both
    gB = jnp.outer(gv, x)  # (H, D)  v = B x          gv x^T
    gy = gu * u * (1 - u)  # (H,)    u = sigmoid(y)   sigmoid'(y) = u (1 - u)
    gA = jnp.outer(gy, x)  # (H, D)  y = A x          gy x^T
    gx = A.T @ gy + B.T @ gv  # (D,)  x feeds A x and B x
    gt = None if t is None else -gw  # (O,)  dL/dt = -2 (w - t)
    return Params(gA, gB, gC), gx, gt


def manual_vjp(params: Params, residuals: Residuals, g: Any = 1.0) -> Params:
    """The hand-derived backward pass for one sample.

    ``residuals`` come from ``forward(params, x, t)``: x (D,), u (H,), z (H,),
    w (O,), t (O,) or None; ``g`` is the scalar cotangent of L (1.0 gives the
    gradient). Returns ``Params(gA (H, D), gB (H, D), gC (O, H))`` = g * dL/d(A, B, C),
    where gC = gw z^T, gB = gz x^T, gA = (gz * u * (1 - u)) x^T, gw = 2 g (w - t),
    gz = C^T gw (derivation in the module docstring).
    """
    if jnp.ndim(g) != 0:
        raise ValueError(f"g must be a scalar, the cotangent of the scalar loss L, got shape "
                         f"{jnp.shape(g)}; for a batch, vmap manual_vjp over the residuals")
    return _vjp(params, residuals, g)[0]


def _manual_grad(params: Params, x: jax.Array, t: jax.Array | None = None) -> Params:
    return _vjp(params, _forward(params, x, t)[1], 1.0)[0]


def manual_grad(params: Params, x: jax.Array, t: jax.Array | None = None, *,
                precision: str | None = None) -> Params:
    """dL/d(A, B, C) for one sample x (D,) and target t (O,) (None: 0), as ``Params``.

    ``forward`` then ``manual_vjp``; ``precision`` as in ``batch_grad``.
    """
    params, x, t = as_sample_and_target(params, x, t)
    return validation.run(_manual_grad, params, x, t, name=("x", "t"), precision=precision)


# --- a batch: contractions over N -------------------------------------------


def _value_and_grad_sum(params: Params, batch: Batch,
                        gram: bool) -> tuple[jax.Array, Params, jax.Array]:
    """(sum_i r_i L_i, sum_i r_i dL_i/dparams, sum_i r_i) over rows X (N, D), by hand.

    Activations are feature-major, (H, N), so every contraction over N is a
    plain matmul. The output side has two exact forms, chosen by shape:

    - direct: W = C Z, GW = 2 (W - T^T) r, gC = GW Z^T, GZ = C^T GW: 3 N O H
      multiply-adds.
    - Gram (``gram``): with M = C^T C (H, H), GZ = 2 (M Z - C^T T^T) r and
      gC = 2 (C Z - T^T) r Z^T = 2 C (Z r Z^T) - 2 (T^T r) Z^T: W is never formed,
      2 N H^2 multiply-adds, plus 2 N O H for targets; cheaper when 2H < 3O
      (targets: 2H < O). Its loss, sum_i r_i (z_i^T M z_i - 2 t_i^T C z_i + ||t_i||^2),
      has an absolute error of order eps ||C||^2 ||z||^2, large relative to L near
      a minimum where C z ~ t: so ``batch_grad`` (no loss) uses it, and training,
      which reports the loss, the direct form.
    """
    A, B, C = params
    X, r, T = batch
    U = sigmoid(A @ X.T)  # (H, N)  u_i = sigmoid(A x_i)
    Z = U + B @ X.T  # (H, N)  z_i = u_i + B x_i
    if gram:
        Zr = Z if r is None else Z * r[None, :]  # (H, N)  r_i z_i
        GZ = 2 * (C.T @ C) @ Zr  # (H, N)  2 r_i C^T C z_i
        total = jnp.sum(Z * GZ) / 2  # sum_i r_i ||C z_i||^2
        gC = 2 * (C @ (Zr @ Z.T))  # (O, H)  2 C sum_i r_i z_i z_i^T
        if T is not None:
            Tr = T.T if r is None else T.T * r[None, :]  # (O, N)  r_i t_i
            TZ = Tr @ Z.T  # (O, H)  sum_i r_i t_i z_i^T
            GZ = GZ - 2 * (C.T @ Tr)  # gz_i = 2 r_i C^T (C z_i - t_i)
            gC = gC - 2 * TZ  # sum_i gw_i z_i^T, gw_i = 2 r_i (C z_i - t_i)
            total = total - 2 * jnp.sum(C * TZ) + jnp.sum(Tr * T.T)
    else:
        W = C @ Z  # (O, N)  w_i = C z_i
        E = W if T is None else W - T.T  # (O, N)  w_i - t_i
        GW = 2 * E if r is None else 2 * E * r[None, :]  # (O, N)  gw_i = 2 r_i (w_i - t_i)
        total = jnp.sum(E * GW) / 2  # sum_i r_i ||w_i - t_i||^2
        gC = GW @ Z.T  # (O, H)  sum_i gw_i z_i^T
        GZ = C.T @ GW  # (H, N)  gz_i = C^T gw_i
    GY = GZ * U * (1 - U)  # (H, N)  gy_i = gz_i * sigmoid'(y_i), from the saved u_i
    gA = GY @ X  # (H, D)  sum_i gy_i x_i^T
    gB = GZ @ X  # (H, D)  sum_i gz_i x_i^T  (gv_i = gz_i)
    weight = jnp.asarray(X.shape[0], X.dtype) if r is None else jnp.sum(r)
    return total, Params(gA, gB, gC), weight


def _chunked_sum(fn: Any, batch: Batch, chunk_size: int | None) -> Any:
    """sum over chunks of rows of ``fn(batch_chunk)``, in one compiled loop.

    ``lax.fori_loop`` over dynamic slices of every row array (no reshaped copy
    of X), then the remainder as one static slice: working memory is O(chunk_size).
    """
    N = batch.X.shape[0]
    if chunk_size is None or chunk_size >= N:
        return fn(batch)
    n_full, rem = divmod(N, chunk_size)

    def body(i: Any, acc: Any) -> Any:
        rows = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, i * chunk_size, chunk_size),
                            batch)
        return jax.tree.map(jnp.add, acc, fn(rows))

    shapes = jax.eval_shape(fn, jax.tree.map(lambda a: a[:chunk_size], batch))
    acc = lax.fori_loop(0, n_full, body, jax.tree.map(jnp.zeros_like, shapes))
    if rem:
        tail = fn(jax.tree.map(lambda a: a[n_full * chunk_size:], batch))
        acc = jax.tree.map(jnp.add, acc, tail)
    return acc


def _value_and_grad(params: Params, batch: Batch, chunk_size: int | None = None,
                    gram: bool = False) -> tuple[jax.Array, Params]:
    """(batch_loss, its gradient) by the manual rule: weighted sums, then one division."""
    total, gsum, weight = _chunked_sum(lambda b: _value_and_grad_sum(params, b, gram), batch,
                                       chunk_size)
    return total / weight, jax.tree.map(lambda g: g / weight, gsum)


def _batch_grad(params: Params, batch: Batch, chunk_size: int | None = None) -> Params:
    H, O = params.A.shape[0], params.C.shape[0]
    gram = 2 * H < (3 * O if batch.T is None else O)  # the cheaper form (_value_and_grad_sum)
    return _value_and_grad(params, batch, chunk_size, gram)[1]


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
    grads = jax.vmap(_manual_grad, in_axes=(None, 0, 0))(params, batch.X, batch.T)
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
def _abc_loss(params: Params, x: jax.Array, t: jax.Array | None) -> jax.Array:
    return _forward(params, x, t)[0]


def _abc_loss_fwd(params: Params, x: jax.Array,
                  t: jax.Array | None) -> tuple[jax.Array, tuple[Params, Residuals]]:
    L, res = _forward(params, x, t)
    return L, (params, res)


def _abc_loss_bwd(saved: tuple[Params, Residuals], g: jax.Array) -> tuple[Params, jax.Array, Any]:
    params, res = saved
    return _vjp(params, res, g)


_abc_loss.defvjp(_abc_loss_fwd, _abc_loss_bwd)


def abc_loss(params: Params, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """L = ||C (sigmoid(A x) + B x) - t||^2 for one sample, differentiated by hand.

    x (D,), t (O,) or None (0) -> scalar. A ``jax.custom_vjp`` whose backward
    pass is ``manual_vjp`` plus gx = A^T gy + B^T gz and gt = -gw (t is an
    input like x: ``jax.grad(abc_loss, argnums=2)`` is dL/dt), so ``jax.grad``,
    ``jax.jit``, ``jax.vmap``, Optax and grad-of-grad run through the
    hand-written rule. Shapes are always checked; under a transformation values
    are not, and the caller's matmul precision applies; called eagerly it is
    ``loss(params, x, t)``. Batch it with ``jax.vmap(abc_loss, in_axes=(None, 0, 0))``.
    Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) needs
    ``abc_loss_jvp``: asking this one raises a TypeError that says so
    (``jax.hessian``, forward over reverse, works).
    """
    params, x, t = as_sample_and_target(params, x, t)
    if not validation.is_traced(params, x, t):
        return validation.run(_abc_loss, params, x, t, name=("x", "t"),
                              precision=validation.DEFAULT_PRECISION)
    try:
        return _abc_loss(params, x, t)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError("abc_loss has a hand-derived reverse rule (jax.custom_vjp), which JAX "
                        "cannot push tangents through: for jax.jvp, jax.jacfwd or "
                        "jax.linearize use abc_loss_jvp, its twin with the hand-derived "
                        "forward rule (jax.custom_jvp)") from None
