"""Data parallelism on JAX's own sharding: X split along N, params replicated.

``shard_batch(X)`` places the rows of X across all devices (a ``Mesh`` with one
``"data"`` axis and a ``NamedSharding`` of ``P("data", None)``). ``batch_grad``,
``batch_loss``, ``oracle_grad`` and ``train`` take the result unchanged: each
device runs the forward and backward pass on its rows, and XLA inserts the
all-reduce for the contractions over N (gA = GY^T X / N, ...). The parameters
are replicated.

The mesh axis is ``AxisType.Auto`` (XLA chooses the output sharding of the
contraction over the sharded N axis). With ``Explicit`` axes, the default of
``jax.make_mesh``, that contraction raises a sharding type error unless every
matmul names its output sharding, so a mesh with an Explicit ``"data"`` axis is
refused with a clear error instead.

N need not divide by the device count: X is then padded with zero rows to the
next multiple and wrapped as a ``ShardedBatch`` that remembers the true N. A
zero row still has a non-zero loss (sigmoid(0) = 1/2), so the padding is not
merely zeros: every batch function masks rows >= N out of the sums and divides
by the true N, giving the same result as one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class ShardedBatch:
    """Rows of X padded to a multiple of the device count, sharded along N.

    Attributes:
      X: (N_padded, D) array sharded along its first axis.
      n: the true number of samples N; rows ``n:`` are padding and ignored.
    """

    X: jax.Array
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        """The unpadded shape (N, D)."""
        return (self.n, self.X.shape[1])

    @property
    def dtype(self) -> Any:
        return self.X.dtype


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with an Auto ``"data"`` axis."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def shard_batch(X: Any, mesh: Mesh | None = None) -> jax.Array | ShardedBatch:
    """Place X (N, D) across the devices of ``mesh`` along N.

    Args:
      X: samples, shape (N, D), N >= 1.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis of type Auto; by
        default all devices (``data_mesh()``).

    Returns:
      A ``jax.Array`` sharded as ``P("data", None)`` when N divides by the size
      of the data axis; otherwise a ``ShardedBatch`` (X padded with zero rows,
      plus the true N) that the batch functions mask.
    """
    if isinstance(X, ShardedBatch):
        raise TypeError("X is already a ShardedBatch")
    if mesh is None:
        mesh = data_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[DATA_AXIS]
    if axis_type != AxisType.Auto:
        raise ValueError(
            f"mesh axis {DATA_AXIS!r} must be AxisType.Auto, got {axis_type}: the contraction "
            "over the sharded N axis has no unique output sharding under Explicit axes. "
            "Build the mesh with abc_jax.data_mesh() or jax.make_mesh(..., "
            "axis_types=(AxisType.Auto,))"
        )
    shape = np.shape(X)
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"X must be a batch of shape (N, D) with N >= 1, got shape {shape}")
    n = shape[0]
    ndev = mesh.shape[DATA_AXIS]
    pad = -n % ndev
    if pad:
        X = jnp.pad(jnp.asarray(X), ((0, pad), (0, 0)))
    Xs = jax.device_put(X, NamedSharding(mesh, PartitionSpec(DATA_AXIS, None)))
    return ShardedBatch(Xs, n) if pad else Xs


def unpack_batch(X: Any) -> tuple[Any, int | None]:
    """(array, n_valid): n_valid is the true N of a padded ShardedBatch, else None."""
    if isinstance(X, ShardedBatch):
        return X.X, X.n
    return X, None


def replicate_like(params: Any, X: Any) -> Any:
    """Replicate params over X's mesh when X is sharded across several devices.

    Parameters placed on one device would otherwise clash with a sharded X in
    ``jit``; replicated, each device holds its own copy (they are small).
    """
    sharding = getattr(X, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return jax.device_put(params, NamedSharding(sharding.mesh, PartitionSpec()))
    return params
