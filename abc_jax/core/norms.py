"""Per-sample gradient norms and per-sample clipping, from the rows of one batch pass.

Every per-sample gradient of this network is a sum of outer products (``backward``)::

    dL_i/dA = gy_i x_i^T   (H, D)
    dL_i/dB = gz_i x_i^T   (H, D)
    dL_i/dC = gw_i z_i^T   (O, H)

and the Frobenius norm of an outer product is the product of the vector norms,
||a b^T||_F^2 = sum_jk a_j^2 b_k^2 = ||a||^2 ||b||^2, so exactly::

    ||dL_i/dA||_F = ||gy_i|| ||x_i||
    ||dL_i/dB||_F = ||gz_i|| ||x_i||
    ||dL_i/dC||_F = ||gw_i|| ||z_i||

The rows gy_i, gz_i, gw_i, x_i, z_i are what the batch contraction of
``backward.rows`` forms for the batch gradient anyway (feature-major, (H, N) and (O, N)),
so all N norms cost O(N (D + H + O)) memory and no more time than one batch
gradient; no per-sample matrix (N x P, P = 2HD + OH) is ever formed. Autodiff
cannot use this: ``vmap(grad)`` materialises the N per-sample gradients and
then takes their norms.

As in ``per_sample_grads``, row i's gradient is g_i = r_i dL_i/dparams, the
row weight r_i >= 0 included (put in at the top: gw_i = 2 r_i (w_i - t_i)).

Clipping each g_i to norm at most c and summing is a reweighting of the rows:
min(1, c / ||g_i||) g_i has the same outer-product form with gw_i, gz_i, gy_i
scaled by the clip factor, so the clipped sum is the same three contractions
over N with the factors acting as extra row weights (``clipped_batch_grad``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from abc_jax.core.backward import Rows, chunked_sum, rows, rows_per_chunk
from abc_jax.core.model import Batch, Params


def column_norms(G: jax.Array) -> jax.Array:
    """(N,): the Euclidean norm of each column of G (F, N).

    The sum of squares over F is a product with a ones vector at full precision,
    not ``jnp.sum(G * G, axis=0)``: XLA's CPU reduction over the leading axis slows
    down ~30x once N passes ~20,000 (measured with JAX 0.10.2 at F = 64: 137 ms
    against 4.5 ms at N = 65536); the product does not.
    """
    ones = jnp.ones(G.shape[0], G.dtype)  # (F,)
    return jnp.sqrt(jnp.matmul(ones, G * G, precision=lax.Precision.HIGHEST))


def row_norms(rw: Rows) -> jax.Array:
    """(N, 3): ||gy_i|| ||x_i||, ||gz_i|| ||x_i||, ||gw_i|| ||z_i||, the norms of row i's
    gradient w.r.t. A, B, C (outer products: the Frobenius norm is the product)."""
    x = jnp.linalg.norm(rw.X, axis=1)  # (N,)  a reduction over the trailing axis: fast
    z, gy, gz, gw = (column_norms(G) for G in (rw.Z, rw.GY, rw.GZ, rw.GW))  # (N,)
    return jnp.stack([gy * x, gz * x, gw * z], axis=1)


def chunked_rows(fn: Any, batch: Batch, chunk_size: int | None) -> jax.Array:
    """``fn(batch)`` for a per-row ``fn`` (output (N, ...)), ``chunk_size`` rows at a time.

    Like ``chunked_sum``: ``lax.fori_loop`` over dynamic slices of every row array,
    each chunk's result written into its slice of the output, then the remainder as
    one static slice; working memory is O(chunk_size) besides the output. None: the
    whole batch at once.
    """
    N = batch.X.shape[0]
    if chunk_size is None or chunk_size >= N:
        return fn(batch)
    n_full, rem = divmod(N, chunk_size)

    def body(i: Any, out: jax.Array) -> jax.Array:
        chunk = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, i * chunk_size, chunk_size),
                             batch)
        return lax.dynamic_update_slice_in_dim(out, fn(chunk), i * chunk_size, axis=0)

    shape = jax.eval_shape(fn, jax.tree.map(lambda a: a[:chunk_size], batch))
    out = jnp.zeros((N, *shape.shape[1:]), shape.dtype)
    out = lax.fori_loop(0, n_full, body, out)
    if rem:
        tail = fn(jax.tree.map(lambda a: a[n_full * chunk_size:], batch))
        out = lax.dynamic_update_slice_in_dim(out, tail, n_full * chunk_size, axis=0)
    return out


def per_sample_grad_norms(params: Params, batch: Batch,
                          chunk_size: int | None = None) -> jax.Array:
    """Frobenius norms of each row's gradient w.r.t. A, B and C, without per-sample gradients.

    Row i's gradient is g_i = r_i dL_i/d(A, B, C) (``per_sample_grads``: weight and
    target included), and::

        out[i] = (||gy_i|| ||x_i||, ||gz_i|| ||x_i||, ||gw_i|| ||z_i||)

    exactly (module docstring). The norm of g_i over all three matrices is
    ``sqrt(sum(out[i] ** 2))``, i.e. ``jnp.linalg.norm(out, axis=1)``.

    Args:
        params: A (H, D), B (H, D), C (O, H).
        batch: X (N, D), weights (N,) or None, T (N, O) or None.
        chunk_size: rows per chunk, in one compiled loop (None: the whole batch).

    Returns:
        (N, 3), columns A, B, C. Memory O(N (D + H + O)) (O(chunk_size (D + H + O))
        besides the output with ``chunk_size``).
    """
    return chunked_rows(lambda b: row_norms(rows(params, b)), batch,
                        rows_per_chunk(chunk_size, params, batch))


def clip_factors(norms: jax.Array, clip_norm: Any) -> jax.Array:
    """min(1, c / n) for total norms n (N,): 1 where n <= c, so 1 for a zero-norm row
    (nothing to clip, and no 0/0) and for c = inf (no clipping)."""
    clipped = norms > clip_norm
    return jnp.where(clipped, clip_norm / jnp.where(clipped, norms, 1), 1)


def clipped_grad_sum(params: Params, batch: Batch, clip_norm: Any) -> tuple[Params, jax.Array]:
    """(sum_i f_i g_i, sum_i r_i): the clipped per-row gradients summed, one pass.

    The factors f_i = min(1, c / ||g_i||) scale the rows GY, GZ, GW (a row weight
    on top of r_i) before the three contractions over N. The scaled rows go
    behind ``lax.optimization_barrier``: XLA has fused the scaling into the
    products and run them as loops (measured at K = 256, N = 2048: ~30x slower); with
    JAX 0.10.2 on the CPU it does not, and the barrier costs nothing.
    """
    X = batch.X
    grads = clipped_rows_sum(rows(params, batch), clip_norm)
    r = batch.weights
    weight = jnp.asarray(X.shape[0], X.dtype) if r is None else jnp.sum(r)
    return grads, weight


def clipped_rows_sum(rw: Rows, clip_norm: Any) -> Params:
    """sum_i f_i g_i from a batch pass's rows (``backward.rows``), f_i = min(1, c / ||g_i||).

    Shapes: rows of N samples in, ``Params`` (H, D), (H, D), (O, H) out. The body of
    ``clipped_grad_sum``, for a caller that also needs the rows (e.g. their loss).
    """
    X, Z, _, GW, GZ, GY = rw
    norms = jnp.linalg.norm(row_norms(rw), axis=1)  # (N,)  ||g_i|| over A, B, C
    f = clip_factors(norms, jnp.asarray(clip_norm, norms.dtype))[None, :]  # (1, N)
    GY, GZ, GW = lax.optimization_barrier((GY * f, GZ * f, GW * f))
    return Params(A=GY @ X, B=GZ @ X, C=GW @ Z.T)  # sum_i f_i gy_i x_i^T, ...


def clipped_batch_grad(params: Params, batch: Batch, clip_norm: Any,
                       chunk_size: int | None = None) -> Params:
    """(1 / sum_i r_i) sum_i min(1, c / ||g_i||) g_i: the mean of per-row clipped gradients.

    g_i = r_i dL_i/d(A, B, C) as in ``per_sample_grads`` (weight and target
    included) and ||g_i|| its norm over all three matrices (the row norm of
    ``per_sample_grad_norms``). A row with ||g_i|| = 0 has factor 1 (it adds 0); a
    row of weight 0 adds nothing and counts nothing. The division is by sum_i r_i
    (N without weights), so with c >= max_i ||g_i|| (or c = inf) this is
    ``batch_grad``; DP-SGD's noise is added by the caller.

    Args:
        params: A (H, D), B (H, D), C (O, H).
        batch: X (N, D), weights (N,) or None, T (N, O) or None.
        clip_norm: c > 0, a scalar (cast to the params' dtype).
        chunk_size: rows per chunk, summed in one compiled loop (None: the whole batch).

    Returns:
        ``Params`` of shapes (H, D), (H, D), (O, H). One pass over the rows, no
        per-sample matrix: memory O(N (D + H + O)) (O(chunk_size (D + H + O)) chunked).
    """
    gsum, weight = chunked_sum(lambda b: clipped_grad_sum(params, b, clip_norm), batch,
                               rows_per_chunk(chunk_size, params, batch))
    return jax.tree.map(lambda g: g / weight, gsum)
