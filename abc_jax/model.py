"""The ABC graph: parameters, the forward pass and the loss.

For one sample x (shape (D,)) and parameters A (H, D), B (H, D), C (O, H)::

    y = A x          (H,)
    u = sigmoid(y)   (H,)
    v = B x          (H,)
    z = u + v        (H,)
    w = C z          (O,)
    L = ||w||^2      scalar

Functions here take ONE sample; batch them with ``jax.vmap(f, in_axes=(None, 0))``.
The batch objective is the mean, ``batch_loss(params, X) = mean_i L(params, X[i])``.
The homework minimised the sum over i; the minimiser is the same, and the mean
keeps the learning rate independent of N.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from abc_jax import validation
from abc_jax.parallel import replicate_like, unpack_batch


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


def init_params(
    key: jax.Array,
    in_dim: int,
    hidden_dim: int | None = None,
    out_dim: int | None = None,
    *,
    dtype: Any = jnp.float32,
) -> Params:
    """Random parameters, entries ~ Normal(0, 1 / fan_in).

    Args:
      key: a ``jax.random`` key.
      in_dim: D. ``hidden_dim`` (H) and ``out_dim`` (O) default to D, the
        homework's K x K matrices.
      dtype: a floating dtype (float64 needs ``jax_enable_x64``).

    Returns:
      ``Params(A (H, D), B (H, D), C (O, H))``.
    """
    D = validation.check_positive_int(in_dim, "in_dim")
    H = validation.check_positive_int(D if hidden_dim is None else hidden_dim, "hidden_dim")
    O = validation.check_positive_int(D if out_dim is None else out_dim, "out_dim")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    ka, kb, kc = jax.random.split(validation.check_key(key), 3)
    return Params(
        A=jax.random.normal(ka, (H, D), dtype) / jnp.sqrt(D).astype(dtype),
        B=jax.random.normal(kb, (H, D), dtype) / jnp.sqrt(D).astype(dtype),
        C=jax.random.normal(kc, (O, H), dtype) / jnp.sqrt(H).astype(dtype),
    )


def sigmoid(y: jax.Array) -> jax.Array:
    """sigmoid(y) = 1 / (1 + exp(-y)), elementwise.

    Finite for every finite y, and so is its derivative sigmoid(y)(1 - sigmoid(y)):
    ``jax.nn.sigmoid`` is XLA's logistic, which never overflows. (The homework's
    two-branch formula as a ``jnp.where`` would give NaN gradients from the
    branch not taken.)
    """
    return jax.nn.sigmoid(y)


def _forward(params: Params, x: jax.Array) -> tuple[jax.Array, Residuals]:
    A, B, C = params
    y = A @ x  # (H,)
    u = sigmoid(y)  # (H,)
    v = B @ x  # (H,)
    z = u + v  # (H,)
    w = C @ z  # (O,)
    L = jnp.sum(w * w)  # scalar, ||w||^2
    return L, Residuals(x, u, z, w)


def _batch_loss(params: Params, X: jax.Array, n_valid: int | None = None) -> jax.Array:
    """mean_i L(params, X[i]) over the first n_valid rows (default all); no validation.

    This is the plain differentiable definition that ``jax.grad`` differentiates
    for the reference gradient.
    """
    losses = jax.vmap(_forward, in_axes=(None, 0))(params, X)[0]  # (N,)
    if n_valid is None:
        return jnp.mean(losses)
    return jnp.sum(jnp.where(jnp.arange(X.shape[0]) < n_valid, losses, 0)) / n_valid


def as_params(params: Any) -> tuple[Params, int, int, int, Any]:
    """Validate and return ``(Params, D, H, O, dtype)``."""
    D, H, O, dtype = validation.check_params(params)
    if not (isinstance(params, Params) and all(isinstance(p, jax.Array) for p in params)):
        params = Params(*(jnp.asarray(p) for p in params))
    return params, D, H, O, dtype


def prepare_batch(
    params: Any, X: Any, chunk_size: Any = None
) -> tuple[Params, jax.Array, int | None, int | None]:
    """Validate params, X (an array or a padded ``ShardedBatch``) and chunk_size.

    Returns ``(params, X, n_valid, chunk_size)``: X cast to the params' dtype,
    n_valid the true N of a padded batch (else None), params replicated over
    X's devices when X is sharded, and chunk_size as given or, for None,
    ``default_chunk_size``'s choice.
    """
    params, D, H, O, dtype = as_params(params)
    X, n_valid = unpack_batch(X)
    X = validation.check_batch(X, D, dtype)
    chunk_size = validation.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if not validation.is_traced(params, X):
        params = replicate_like(params, X)
    if chunk_size is None:
        chunk_size = default_chunk_size(X, H, O)
    return params, X, n_valid, chunk_size


# Working set per chunk of the batch gradient that stays in a CPU core's
# L2/L3 share, and the fewest rows that still keep the matmuls efficient
# (at K = 1024, 256-row chunks were 1.5x slower than the whole batch).
_CPU_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_ROWS = 1024


def default_chunk_size(X: Any, H: int, O: int) -> int | None:
    """The chunk of rows ``batch_grad`` uses when ``chunk_size`` is None.

    On a CPU, a batch whose activations (about D + 2H + O numbers per row)
    exceed a few MiB is processed in chunks that fit the cache: the same
    FLOPs, fewer trips to main memory (at K = 256, N = 65536, about 1.5x
    faster). On a GPU, or for X sharded over several devices, or traced,
    None: the whole batch at once.
    """
    if validation.is_traced(X):
        return None
    sharding = getattr(X, "sharding", None)
    devices = getattr(sharding, "device_set", None)
    if devices is None or len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    N, D = X.shape
    row_bytes = (D + 2 * H + O) * X.dtype.itemsize
    rows = max(_MIN_CHUNK_ROWS, _CPU_CHUNK_BYTES // row_bytes)
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return rows if rows < N else None


def _scales(params: Params, X: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    A, B, C = params
    W = (sigmoid(X @ A.T) + X @ B.T) @ C.T  # (N, O)
    max_param = jnp.max(jnp.stack([jnp.max(jnp.abs(p)) for p in params]))
    return jnp.max(jnp.abs(X)), jnp.max(jnp.abs(W)), max_param


_scales_jit = jax.jit(_scales)


def describe_overflow(params: Params, data: jax.Array) -> str:
    """The scales behind an overflow: max |x|, max |w| (w = C z) and max |param|."""
    X = data.reshape(-1, data.shape[-1])
    x, w, p = (float(v) for v in _scales_jit(params, X))
    return f"max |x| = {x:.3g}, max |w| = {w:.3g} (w = C z, L = ||w||^2), max |param| = {p:.3g}"


def prepare_sample(
    params: Any, x: Any, *, precision: Any = None
) -> tuple[Params, jax.Array, dict[str, Any]]:
    """Validate params and one sample x (D,) for a ``validation.checked_entry``."""
    params, D, _, _, dtype = as_params(params)
    x = validation.check_sample(x, D, dtype)
    return params, x, dict(precision=validation.check_precision(precision))


def prepare_masked_batch(
    params: Any, X: Any, *, precision: Any = None
) -> tuple[Params, jax.Array, dict[str, Any]]:
    """Validate params and a batch for ``validation.checked_entry``: ``fn(params, X, n_valid)``."""
    params, X, n_valid, _ = prepare_batch(params, X)
    return params, X, dict(n_valid=n_valid, precision=validation.check_precision(precision))


_forward_entry = validation.checked_entry(_forward, prepare_sample, "x", describe_overflow)
_batch_loss_entry = validation.checked_entry(
    _batch_loss, prepare_masked_batch, "X", describe_overflow
)


def forward(
    params: Params, x: jax.Array, *, precision: str | None = None
) -> tuple[jax.Array, Residuals]:
    """Forward pass for one sample.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      x: one sample, shape (D,).
      precision: matmul precision, None for abc_jax's default ``"highest"``
        (see ``validation.check_precision``).

    Returns:
      ``(L, residuals)``: the scalar loss ||C (sigmoid(A x) + B x)||^2 and the
      ``Residuals(x, u, z, w)`` that ``manual_vjp`` consumes.

    Raises:
      ValueError, TypeError: bad shapes, dtypes or NaN/inf in params or x.
      FloatingPointError: finite inputs whose loss overflows the dtype.
    """
    return _forward_entry(params, x, precision=precision)


def loss(params: Params, x: jax.Array, *, precision: str | None = None) -> jax.Array:
    """L = ||w||^2 for one sample x of shape (D,)."""
    return forward(params, x, precision=precision)[0]


def batch_loss(params: Params, X: Any, *, precision: str | None = None) -> jax.Array:
    """(1/N) sum_i L(params, X[i]) for X of shape (N, D) (or a ``shard_batch`` result).

    The homework minimised the sum; the mean has the same minimiser and keeps
    the learning rate independent of N. ``precision`` as in ``forward``.
    """
    return _batch_loss_entry(params, X, precision=precision)
