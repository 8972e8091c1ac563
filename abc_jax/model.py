"""The ABC graph: parameters, a batch of rows, the forward pass and the loss.

For one sample x (shape (D,)) and parameters A (H, D), B (H, D), C (O, H)::

    y = A x          (H,)
    u = sigmoid(y)   (H,)
    v = B x          (H,)
    z = u + v        (H,)
    w = C z          (O,)
    L = ||w - t||^2  scalar, t (O,) the target (t = 0: the homework's ||w||^2)

Functions here take ONE sample; batch them with ``jax.vmap(f, in_axes=(None, 0))``.

The batch objective is a weighted mean over rows: with X (N, D) and row
weights w_i >= 0 (all 1 by default), ``batch_loss = sum_i w_i L_i / sum_i w_i``.
With unit weights that is the plain mean. The homework minimised the sum over
i; the minimiser is the same, and the mean keeps the learning rate independent
of N. A weight is data, not a static count: padding rows weigh 0, and a user's
importance weights use the same mechanism.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from abc_jax import validation


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
    weights: jax.Array | None = None  # (N,) w_i >= 0, sum > 0; None: every row weighs 1
    T: jax.Array | None = None  # (N, O) targets, row i the t of X[i]; None: all 0


def init_params(key: jax.Array, in_dim: int, hidden_dim: int | None = None,
                out_dim: int | None = None, *, dtype: Any = jnp.float32) -> Params:
    """``Params(A (H, D), B (H, D), C (O, H))``, entries ~ Normal(0, 1 / fan_in).

    ``in_dim`` is D; ``hidden_dim`` (H) and ``out_dim`` (O) default to D, the
    homework's K x K matrices. ``dtype``: floating (float64 needs x64 enabled).
    """
    D = validation.check_positive_int(in_dim, "in_dim")
    H = validation.check_positive_int(D if hidden_dim is None else hidden_dim, "hidden_dim")
    O = validation.check_positive_int(D if out_dim is None else out_dim, "out_dim")
    dtype = validation.check_dtype(dtype)
    ka, kb, kc = jax.random.split(validation.check_key(key), 3)
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


def _forward(params: Params, x: jax.Array,
             t: jax.Array | None = None) -> tuple[jax.Array, Residuals]:
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
    """sum_i w_i v_i / sum_i w_i over the leading axis (the plain mean for None)."""
    if weights is None:
        return jnp.mean(values, axis=0)
    w = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
    return jnp.sum(w * values, axis=0) / jnp.sum(weights)


def _batch_loss(params: Params, batch: Batch) -> jax.Array:
    """sum_i r_i L(params, X[i], T[i]) / sum_i r_i: the plain definition ``jax.grad``
    differentiates."""
    losses = jax.vmap(_forward, in_axes=(None, 0, 0))(params, batch.X, batch.T)[0]  # (N,)
    return weighted_mean(losses, batch.weights)


# --- the public functions: validate, then one checked computation -------------


def as_params(params: Any) -> tuple[Params, int, int, int, Any]:
    """Validate ``params`` and return ``(Params of arrays, D, H, O, dtype)``."""
    arrays, dtype = validation.check_params(params)
    if not (isinstance(params, Params) and all(isinstance(p, jax.Array) for p in params)):
        arrays = tuple(jnp.asarray(a) for a in arrays)
    (H, D), (O, _) = arrays[0].shape, arrays[2].shape
    return Params(*arrays), D, H, O, dtype


def as_sample(x: Any, D: int, dtype: Any, name: str = "x",
              what: tuple[str, str, str] = ("one sample", "D", "columns of A")) -> jax.Array:
    """One sample of shape (D,) (or one target of shape (O,), per ``what``), cast to ``dtype``."""
    kind, dim, of = what
    if isinstance(x, (list, tuple)):
        x = jnp.asarray(x)
    s = validation.shape_of(x, name)
    if len(s) != 1:
        raise ValueError(f"{name} must be {kind} of shape ({dim},) = ({D},), got shape {s}")
    if s[0] != D:
        raise ValueError(f"{name} must have {dim} = {D} entries ({of}), got shape {s}")
    return validation.as_array(x, name, dtype)


def as_batch(data: Any, D: int, O: int, dtype: Any, name: str = "X") -> Batch:
    """X (N, D) or ``Batch(X, weights, T)``, checked and cast to ``dtype``, as a ``Batch``."""
    X, weights, T = data if isinstance(data, Batch) else (data, None, None)
    if isinstance(X, (list, tuple)):
        X = jnp.asarray(X)
    s = validation.shape_of(X, name)
    if len(s) != 2:
        raise ValueError(f"{name} must be a batch of shape (N, D) = (N, {D}), got shape {s}")
    if s[0] == 0:
        raise ValueError(f"{name} must hold at least one sample (N >= 1), got shape {s}")
    if s[1] != D:
        raise ValueError(f"{name} must have D = {D} columns (columns of A), got shape {s}")
    X = validation.as_array(X, name, dtype)
    if weights is not None:
        weights = validation.as_array(weights, "weights", dtype)
        if weights.shape != (s[0],):
            raise ValueError(f"weights must have shape (N,) = ({s[0]},), one per row of "
                             f"{name}, got {weights.shape}")
    if T is not None:
        T = validation.as_array(jnp.asarray(T) if isinstance(T, (list, tuple)) else T, "T",
                                dtype)
        if T.shape != (s[0], O):
            raise ValueError(f"T must have shape (N, O) = ({s[0]}, {O}), one target of C's "
                             f"O = {O} rows per row of {name}, got {T.shape}")
    return Batch(X, weights, T)


def as_sample_and_target(params: Any, x: Any, t: Any) -> tuple[Params, jax.Array, Any]:
    """Validated ``(Params, x (D,), t (O,) or None)``, cast to the params' dtype."""
    params, D, _, O, dtype = as_params(params)
    x = as_sample(x, D, dtype)
    if t is not None:
        t = as_sample(t, O, dtype, "t", ("one target", "O", "rows of C"))
    return params, x, t


def replicate_like(tree: Any, X: Any) -> Any:
    """``tree`` replicated over X's mesh when X is sharded over several devices.

    Parameters on one device would clash with a sharded X in ``jit``. Keys move
    as key data.
    """
    sharding = getattr(X, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and sharding.mesh.size > 1):
        return tree
    replicated = NamedSharding(sharding.mesh, PartitionSpec())

    def put(leaf: Any) -> Any:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(leaf), replicated)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, replicated)

    return jax.tree.map(put, tree)


def prepare(params: Any, data: Any, name: str = "X") -> tuple[Params, Batch]:
    """Validated ``(Params, Batch)``; params replicated where a sharded X lives."""
    params, D, _, O, dtype = as_params(params)
    batch = as_batch(data, D, O, dtype, name)
    if not validation.is_traced(params, batch):
        params = replicate_like(params, batch.X)
    return params, batch


def forward(params: Params, x: jax.Array, t: jax.Array | None = None, *,
            precision: str | None = None) -> tuple[jax.Array, Residuals]:
    """Forward pass for one sample x (D,), params ``Params(A (H, D), B (H, D), C (O, H))``.

    Returns ``(L, residuals)``: the scalar loss ||C (sigmoid(A x) + B x) - t||^2
    (t (O,) the target, None for 0) and the ``Residuals(x (D,), u (H,), z (H,),
    w (O,), t)`` that ``manual_vjp`` consumes.
    ``precision``: matmul precision, None for abc_jax's default ``"highest"``
    (``validation.check_precision``).

    Raises:
      ValueError, TypeError: bad shapes, dtypes or NaN/inf in params or x.
      FloatingPointError: finite inputs whose loss overflows the dtype.
    """
    params, x, t = as_sample_and_target(params, x, t)
    return validation.run(_forward, params, x, t, name=("x", "t"), precision=precision)


def loss(params: Params, x: jax.Array, t: jax.Array | None = None, *,
         precision: str | None = None) -> jax.Array:
    """L = ||w - t||^2 for one sample x of shape (D,) (t (O,), None for 0: ||w||^2)."""
    return forward(params, x, t, precision=precision)[0]


def batch_loss(params: Params, X: Any, *, precision: str | None = None) -> jax.Array:
    """sum_i r_i L(params, X[i], T[i]) / sum_i r_i for X (N, D) or a ``Batch``.

    Unit weights and no targets: the mean of ||w_i||^2, the homework's loss.

    A scalar; ``precision`` as in ``forward``.
    """
    params, batch = prepare(params, X)
    return validation.run(_batch_loss, params, batch, name="X", precision=precision)


def _outputs(params: Params, X: jax.Array, chunk_size: int | None = None) -> jax.Array:
    """W (N, O), row i the output w = C z of X[i]; ``chunk_size`` rows at a time."""
    def one(x: jax.Array) -> jax.Array:
        return _forward(params, x)[1].w

    return jax.lax.map(one, X, batch_size=chunk_size) if chunk_size else jax.vmap(one)(X)


def predict(params: Params, X: Any, *, chunk_size: int | None = None,
            precision: str | None = None) -> jax.Array:
    """The network's outputs W (N, O), W[i] = C (sigmoid(A X[i]) + B X[i]), for X (N, D).

    X may be a ``Batch`` (its weights and targets are ignored) or sharded; a batch from
    ``shard_batch`` gets outputs for its padding rows too (keep W[:N]).
    ``chunk_size``: rows per step of a ``lax.map`` (memory O(chunk_size)), None for all
    at once; ``precision`` as in ``forward``.
    """
    params, batch = prepare(params, X.X if isinstance(X, Batch) else X)
    chunk = validation.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    return validation.run(_outputs, params, batch.X, name="X", precision=precision,
                          chunk_size=chunk)
