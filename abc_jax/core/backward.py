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
(``value_and_grad_sum``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from abc_jax.core.model import Batch, Params, Residuals, forward, sigmoid


def vjp(params: Params, res: Residuals, g: Any) -> tuple[Params, jax.Array, Any]:
    """Manual VJP of one sample: (parameter cotangents, x cotangent, t cotangent).

    ``res`` from ``forward``: x (D,), u (H,), z (H,), w (O,), t (O,) or None; g a
    scalar. Returns ``Params(gA (H, D), gB (H, D), gC (O, H))``, gx (D,), gt (O,) or None.
    """
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


def manual_grad(params: Params, x: jax.Array, t: jax.Array | None = None) -> Params:
    """dL/d(A, B, C) for one sample: ``forward`` then ``vjp`` with g = 1."""
    return vjp(params, forward(params, x, t)[1], 1.0)[0]


# --- a batch: contractions over N -------------------------------------------


class Rows(NamedTuple):
    """The per-row vectors of a batch pass, feature-major (column i is row i)."""

    X: jax.Array  # (N, D)  x_i, as given (row-major)
    Z: jax.Array  # (H, N)  z_i = sigmoid(A x_i) + B x_i
    E: jax.Array  # (O, N)  w_i - t_i
    GW: jax.Array  # (O, N)  gw_i = 2 r_i (w_i - t_i)
    GZ: jax.Array  # (H, N)  gz_i = C^T gw_i  (= gv_i = gu_i)
    GY: jax.Array  # (H, N)  gy_i = gz_i * u_i (1 - u_i)


def rows(params: Params, batch: Batch) -> Rows:
    """The forward and backward rows of every sample at once (the direct form), the row
    weight r_i put in at the top, in gw_i, so every cotangent below carries it."""
    A, B, C = params
    X, r, T = batch
    U = sigmoid(A @ X.T)  # (H, N)  u_i = sigmoid(A x_i)
    Z = U + B @ X.T  # (H, N)  z_i = u_i + B x_i
    W = C @ Z  # (O, N)  w_i = C z_i
    E = W if T is None else W - T.T  # (O, N)  w_i - t_i
    GW = 2 * E if r is None else 2 * E * r[None, :]  # (O, N)  gw_i = 2 r_i (w_i - t_i)
    GZ = C.T @ GW  # (H, N)  gz_i = C^T gw_i
    GY = GZ * U * (1 - U)  # (H, N)  gy_i = gz_i * sigmoid'(y_i), from the saved u_i
    return Rows(X, Z, E, GW, GZ, GY)


def value_and_grad_sum(params: Params, batch: Batch,
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
    X, r, T = batch
    weight = jnp.asarray(X.shape[0], X.dtype) if r is None else jnp.sum(r)
    if not gram:
        R = rows(params, batch)
        total = jnp.sum(R.E * R.GW) / 2  # sum_i r_i ||w_i - t_i||^2
        # sum_i gy_i x_i^T, sum_i gz_i x_i^T (gv_i = gz_i), sum_i gw_i z_i^T
        return total, Params(R.GY @ X, R.GZ @ X, R.GW @ R.Z.T), weight
    A, B, C = params
    U = sigmoid(A @ X.T)  # (H, N)  u_i = sigmoid(A x_i)
    Z = U + B @ X.T  # (H, N)  z_i = u_i + B x_i
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
    GY = GZ * U * (1 - U)  # (H, N)  gy_i = gz_i * sigmoid'(y_i), from the saved u_i
    return total, Params(GY @ X, GZ @ X, gC), weight


CACHE_BYTES = 12 * 2**20  # the working set per chunk that ran fastest on a CPU (bench_step)
MIN_CHUNKS = 4  # fewer chunks than this: the whole batch at once
MIN_ROWS = 1024  # smaller chunks than this: the whole batch at once


def rows_per_chunk(chunk_size: Any, params: Params, batch: Batch) -> int | None:
    """The rows per chunk that ``chunk_size`` asks for: an int as it is, None for the whole
    batch, and "auto" the measured rule (static shapes, so it runs while tracing)::

        CPU:   rows = CACHE_BYTES / (itemsize (D + 3H + 2O))   the activations of a chunk
               (x, u, z and their cotangents, w - t and gw) fit in a cache of ~12 MiB;
               the whole batch where that gives fewer than MIN_CHUNKS chunks, or chunks
               of fewer than MIN_ROWS rows (rows so wide that the products are large anyway)
        else:  the whole batch (a GPU runs it at once)
    """
    if chunk_size != "auto":
        return chunk_size
    if jax.default_backend() != "cpu":
        return None
    (H, D), O = params.A.shape[-2:], params.C.shape[-2]
    width = (D + 3 * H + 2 * O) * jnp.dtype(batch.X.dtype).itemsize
    rows = CACHE_BYTES // width
    return None if rows < MIN_ROWS or MIN_CHUNKS * rows > batch.X.shape[0] else int(rows)


def chunked_sum(fn: Any, batch: Batch, chunk_size: int | None) -> Any:
    """sum over chunks of rows of ``fn(batch_chunk)``, in one compiled loop.

    ``lax.fori_loop`` over dynamic slices of every row array (no reshaped copy
    of X), then the remainder as one static slice: working memory is O(chunk_size).
    ``chunk_size`` None: ``fn(batch)``, the whole batch at once.
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


def value_and_grad(params: Params, batch: Batch, chunk_size: int | None = None,
                   gram: bool = False) -> tuple[jax.Array, Params]:
    """(batch_loss, its gradient) by the manual rule: weighted sums, then one division."""
    total, gsum, weight = chunked_sum(lambda b: value_and_grad_sum(params, b, gram), batch,
                                      rows_per_chunk(chunk_size, params, batch))
    return total / weight, jax.tree.map(lambda g: g / weight, gsum)


def batch_grad(params: Params, batch: Batch, chunk_size: int | None = None) -> Params:
    """The gradient of ``batch_loss`` in the cheaper of the two output forms."""
    H, O = params.A.shape[0], params.C.shape[0]
    gram = 2 * H < (3 * O if batch.T is None else O)  # the cheaper form (value_and_grad_sum)
    return value_and_grad(params, batch, chunk_size, gram)[1]


def per_sample_grads(params: Params, batch: Batch) -> Params:
    """r_i dL_i/d(A, B, C) per row: A, B (N, H, D), C (N, O, H); O(N H D) memory."""
    grads = jax.vmap(manual_grad, in_axes=(None, 0, 0))(params, batch.X, batch.T)
    if batch.weights is None:
        return grads
    return jax.tree.map(lambda g: g * batch.weights[:, None, None], grads)


# --- the one-sample loss as a custom_vjp --------------------------------------


@jax.custom_vjp
def abc_loss(params: Params, x: jax.Array, t: jax.Array | None) -> jax.Array:
    """L for one sample, a ``jax.custom_vjp`` whose backward pass is ``vjp``."""
    return forward(params, x, t)[0]


def _abc_loss_fwd(params: Params, x: jax.Array,
                  t: jax.Array | None) -> tuple[jax.Array, tuple[Params, Residuals]]:
    L, res = forward(params, x, t)
    return L, (params, res)


def _abc_loss_bwd(saved: tuple[Params, Residuals], g: jax.Array) -> tuple[Params, jax.Array, Any]:
    params, res = saved
    return vjp(params, res, g)


abc_loss.defvjp(_abc_loss_fwd, _abc_loss_bwd)
