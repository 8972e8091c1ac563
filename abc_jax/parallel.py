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

Several processes (one per host) run as one multi-controller job on JAX's
distributed runtime: ``initialize_distributed`` joins it (gloo collectives on
CPUs, NCCL on GPUs), and ``shard_local_batch`` builds the global batch from
each process's own rows. The global row order is process 0's rows, then
process 1's, and so on; padding goes at the end as for one process, so the
same masking of rows >= N holds (see ``shard_local_batch``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
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

    With several processes, X here is the whole batch, the same on every
    process; ``shard_local_batch`` takes each process's own rows instead.
    """
    if isinstance(X, ShardedBatch):
        raise TypeError("X is already a ShardedBatch")
    mesh = _check_mesh(mesh)
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


def _check_mesh(mesh: Any) -> Mesh:
    """``mesh`` (default ``data_mesh()``), checked to have an Auto ``"data"`` axis."""
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
    return mesh


def unpack_batch(X: Any) -> tuple[Any, int | None]:
    """(array, n_valid): n_valid is the true N of a padded ShardedBatch, else None."""
    if isinstance(X, ShardedBatch):
        return X.X, X.n
    return X, None


def replicate_like(params: Any, X: Any) -> Any:
    """Replicate params over X's mesh when X is sharded across several devices.

    Parameters placed on one device would otherwise clash with a sharded X in
    ``jit``; replicated, each device holds its own copy (they are small). Any
    pytree of arrays works, ``jax.random`` keys included. With several
    processes each one places its own copy, so the values must be the same
    on every process.
    """
    sharding = getattr(X, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and sharding.mesh.size > 1):
        return params
    replicated = NamedSharding(sharding.mesh, PartitionSpec())

    def put(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # device_put refuses key arrays for devices of other processes: move the key data
            data = jax.device_put(jax.random.key_data(leaf), replicated)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, replicated)

    return jax.tree.map(put, params)


# --- several processes ------------------------------------------------------


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    heartbeat_timeout: int = 10,
    initialization_timeout: int = 300,
) -> None:
    """Join a job of ``num_processes`` processes on JAX's distributed runtime.

    Calls ``jax.distributed.initialize`` after choosing gloo for collectives
    between CPUs (``jax_cpu_collectives_implementation``; GPUs use NCCL
    whatever it says). Process 0 runs the coordinator at
    ``coordinator_address``; the others first wait, up to
    ``initialization_timeout`` seconds, for its port to accept connections,
    so a coordinator that is not there raises ``ConnectionError`` naming it
    (JAX itself would abort the process with a stack trace). Call it before
    any other JAX function. On SLURM and similar launchers
    ``jax.distributed.initialize()`` with no arguments finds all three values
    itself.

    Args:
      coordinator_address: ``"HOST:PORT"`` of process 0, reachable from every
        process (``"[::1]:PORT"`` for an IPv6 address).
      num_processes: P >= 1.
      process_id: this process, 0 <= process_id < P.
      heartbeat_timeout: seconds without a heartbeat after which JAX declares a
        process dead and terminates the others (they exit non-zero; JAX's
        default is 100).
      initialization_timeout: seconds to wait for all processes to join.

    Raises:
      ConnectionError: no coordinator answered within initialization_timeout.
      ValueError: a malformed address or out-of-range number.
    """
    host, port = _split_address(coordinator_address)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if (isinstance(process_id, bool) or not isinstance(process_id, int)
            or not 0 <= process_id < num_processes):
        raise ValueError(
            f"process_id must be an int in [0, {num_processes}), got {process_id!r}"
        )
    for name, value in (("heartbeat_timeout", heartbeat_timeout),
                        ("initialization_timeout", initialization_timeout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + initialization_timeout
    if process_id != 0:
        _wait_for_coordinator(host, port, coordinator_address, deadline, initialization_timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=max(1, math.ceil(deadline - time.monotonic())),
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


def _split_address(address: Any) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"coordinator_address must be 'HOST:PORT', got {address!r}")
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be 'HOST:PORT', got {address!r}")
    return host, int(port)


def _wait_for_coordinator(
    host: str, port: int, address: str, deadline: float, timeout: int
) -> None:
    """Return once HOST:PORT accepts a TCP connection; ConnectionError at the deadline."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no coordinator answered at {address} within {timeout} s: start process 0 "
                    "(it runs the coordinator) with the same coordinator address, and check "
                    "that the host and port are right and reachable from here"
                ) from None
            time.sleep(0.2)


def is_main_process() -> bool:
    """True in process 0, the one that writes results and checkpoints."""
    return jax.process_index() == 0


def _digest(value: Any) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(repr(value).encode()).digest()[:8], np.uint8)


def check_same_on_all_processes(values: dict[str, Any], what: str) -> None:
    """Raise ValueError on every process if any of ``values`` differs between processes.

    Each process contributes an 8-byte digest of ``repr(value)`` per entry;
    one all-gather compares them. Every process of a job must run the same
    computations with the same arguments; a difference would otherwise hang
    a collective or silently mix results.
    """
    if jax.process_count() == 1:
        return
    names = sorted(values)
    mine = np.stack([_digest(values[k]) for k in names])  # (len(names), 8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (P, len(names), 8)
    differ = []
    for i, k in enumerate(names):
        others = [str(p) for p in range(1, len(every)) if (every[p, i] != every[0, i]).any()]
        if others:
            differ.append(f"{k} (process {', '.join(others)})")
    if differ:
        raise ValueError(
            f"{what} must get the same arguments on every process; these differ from process "
            f"0's: {', '.join(differ)}"
        )


def failed_processes(ok: bool) -> list[int]:
    """The processes that passed ``ok=False``, the same list on every process (one all-gather).

    Lets every process stop together when one of them fails before a
    collective (e.g. cannot read its data), instead of the others waiting in
    that collective until the heartbeat timeout.
    """
    if jax.process_count() == 1:
        return [] if ok else [0]
    flags = np.asarray(multihost_utils.process_allgather(np.array(bool(ok), np.int32)))
    return [p for p, f in enumerate(flags.reshape(-1)) if not f]


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's ``data`` on every process (others pass anything, e.g. None).

    Two ``multihost_utils.broadcast_one_to_all`` calls: the length, then the
    bytes. With one process, ``data`` itself.
    """
    if jax.process_count() == 1:
        return data
    main = is_main_process()
    size = len(data) if main and data is not None else -1
    size = int(multihost_utils.broadcast_one_to_all(np.array(size, np.int32)))
    if size < 0:
        return None
    buf = np.frombuffer(data, np.uint8) if main else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the rows of each process are before and after ``shard_local_batch`` moves them.

    ``counts[p]`` rows of process p sit on its ``devices[p]`` devices of the
    mesh (consecutive, in process order). Source: each device holds
    ``source_rows`` rows, its process's rows in order, then zero padding.
    Target: the global rows 0 .. N-1 in order, ``target_rows`` per device,
    padding only at the end.
    """

    counts: tuple[int, ...]
    devices: tuple[int, ...]

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def ndev(self) -> int:
        return sum(self.devices)

    @property
    def source_rows(self) -> int:
        return max(1, max(-(-c // d) for c, d in zip(self.counts, self.devices, strict=True)))

    @property
    def target_rows(self) -> int:
        return -(-self.n // self.ndev)

    def transfers(self) -> list[tuple[int, int, int, int, int]]:
        """(source device, target device, source offset, target offset, rows) for every block."""
        R1, R = self.source_rows, self.target_rows
        out, device, first = [], 0, 0  # first: global index of the process's first row
        for count, ndev in zip(self.counts, self.devices, strict=True):
            for j in range(ndev):
                lo, hi = first + min(j * R1, count), first + min((j + 1) * R1, count)
                while lo < hi:  # rows [lo, hi) of device `device` go to target lo // R
                    k = lo // R
                    end = min(hi, (k + 1) * R)
                    out.append((device, k, lo - first - j * R1, lo - k * R, end - lo))
                    lo = end
                device += 1
            first += count
        return out


def _redistribute(source: jax.Array, layout: _Layout, mesh: Mesh) -> jax.Array:
    """Move the rows of ``source`` (source layout) into the target layout, on the devices."""
    return _mover(layout, mesh)(source)


@functools.lru_cache(maxsize=16)
def _mover(layout: _Layout, mesh: Mesh) -> Any:
    """The compiled move of ``_redistribute``, one per layout and mesh.

    A ``shard_map`` over the data axis: the blocks that move by the same
    number s of devices travel in one ``lax.ppermute`` (s = 0 stays local),
    each device copying at most ``target_rows`` rows per shift, so no device
    ever holds more than a few shards.
    """
    ndev, R = layout.ndev, layout.target_rows
    by_shift: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for t in layout.transfers():
        by_shift.setdefault(t[1] - t[0], []).append(t)

    def body(local: jax.Array) -> jax.Array:  # (R1, D) -> (R, D)
        i = lax.axis_index(DATA_AXIS)
        D = local.shape[1]
        out = jnp.zeros((R, D), local.dtype)
        rows = jnp.arange(R)[:, None]
        for shift, blocks in sorted(by_shift.items()):
            send_off, recv_off, recv_rows = (np.zeros(ndev, np.int32) for _ in range(3))
            for d, k, s_off, t_off, count in blocks:
                send_off[d], recv_off[k], recv_rows[k] = s_off, t_off, count
            B = max(count for *_, count in blocks)
            padded = jnp.pad(local, ((0, B), (0, 0)))
            buf = lax.dynamic_slice_in_dim(padded, jnp.asarray(send_off)[i], B)  # (B, D)
            if shift:
                buf = lax.ppermute(buf, DATA_AXIS, [(d, k) for d, k, *_ in blocks])
            lo, count = jnp.asarray(recv_off)[i], jnp.asarray(recv_rows)[i]
            zeros = jnp.zeros((R, D), local.dtype)
            window = jnp.concatenate([zeros, buf, zeros])  # row R + j holds buf[j]
            placed = lax.dynamic_slice_in_dim(window, R - lo, R)  # row r holds buf[r - lo]
            out = jnp.where((rows >= lo) & (rows < lo + count), placed, out)
        return out

    spec = PartitionSpec(DATA_AXIS, None)
    move = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)
    return jax.jit(move, out_shardings=NamedSharding(mesh, spec))


def shard_local_batch(X: Any, mesh: Mesh | None = None) -> jax.Array | ShardedBatch:
    """The global batch of a multi-process job, each process giving only its own rows.

    Every process calls it with its rows (n_p, D); n_p may differ between
    processes (and be 0), D and the dtype may not. The global batch holds
    N = sum_p n_p rows in the order process 0's rows, then process 1's, ...,
    and ``batch_grad``, ``batch_loss``, ``oracle_grad`` and ``train`` take it
    unchanged, with the same results as one process on all the rows (to
    rounding: the sums run in another order).

    Layout: the devices must each hold the same number of rows, so each
    process first places its rows on its own devices with zero padding
    (``jax.make_array_from_process_local_data``). Then one compiled
    ``shard_map`` moves rows between neighbouring devices so that the global
    rows are in order with all padding at the end: the layout ``shard_batch``
    gives one process, so the existing masking of rows >= N applies, and
    every device holds ceil(N / devices) rows, balanced even when the n_p are
    not. This happens once per batch; only rows that cross a device boundary
    move, in ``lax.ppermute`` blocks no larger than a shard.

    Args:
      X: this process's rows, shape (n_p, D), real numbers.
      mesh: a 1-D mesh with an Auto ``"data"`` axis whose devices are grouped
        by process in process order (default ``data_mesh()``: all devices),
        with at least one device of every process.

    Returns:
      As ``shard_batch``: a ``jax.Array`` sharded ``P("data", None)``, or a
      ``ShardedBatch`` with the padding and the true N. With one process,
      ``shard_batch(X, mesh)``.

    Raises:
      ValueError, TypeError: on every process, if one process's rows are not
        a batch (n, D) of real numbers (that process names the problem), the
        processes disagree on D or dtype, N is 0, or the mesh does not fit.
    """
    mesh = _check_mesh(mesh)
    local, problem = _local_rows(X)
    if jax.process_count() == 1:
        if problem is not None:
            raise problem
        return shard_batch(local, mesh)
    layout = _gather_layout(local, problem, mesh)
    R1 = layout.source_rows
    spec = NamedSharding(mesh, PartitionSpec(DATA_AXIS, None))
    mine = layout.devices[jax.process_index()] * R1
    padded = np.zeros((mine, local.shape[1]), local.dtype)
    padded[: len(local)] = local
    source = jax.make_array_from_process_local_data(
        spec, padded, (layout.ndev * R1, local.shape[1])
    )
    in_place = all(d == k and s == t for d, k, s, t, _ in layout.transfers())
    target = source if in_place and R1 == layout.target_rows else _redistribute(
        source, layout, mesh
    )
    return ShardedBatch(target, layout.n) if target.shape[0] > layout.n else target


def _local_rows(X: Any) -> tuple[np.ndarray, Exception | None]:
    """This process's rows as a 2-D array, or an empty one and the error to raise."""
    if isinstance(X, ShardedBatch):
        return np.zeros((0, 1)), TypeError("X is already a ShardedBatch")
    local = np.asarray(X)
    if local.ndim != 2:
        return np.zeros((0, 1)), ValueError(
            f"X must be this process's rows, shape (n, D), got shape {local.shape}"
        )
    if not (np.issubdtype(local.dtype, np.floating) or np.issubdtype(local.dtype, np.integer)):
        return np.zeros((0, 1)), TypeError(f"X must hold real numbers, got dtype {local.dtype}")
    return local, None


def _gather_layout(local: np.ndarray, problem: Exception | None, mesh: Mesh) -> _Layout:
    """Every process's row count, checked for D, dtype and the mesh (one all-gather).

    A process whose own rows are bad (``problem``) still takes part in the
    all-gather, so that every process raises, instead of the others waiting.
    """
    dt = np.dtype(local.dtype)
    mine = np.array([problem is None, local.shape[0], local.shape[1], dt.itemsize, ord(dt.kind)],
                    np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (P, 5)
    if problem is not None:
        raise problem
    bad = [p for p, ok in enumerate(every[:, 0]) if not ok]
    if bad:
        raise ValueError(
            f"the rows of process {', '.join(map(str, bad))} are not a batch (n, D) of real "
            "numbers; see that process's error"
        )
    every = every[:, 1:]
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"shard_local_batch needs a 1-D mesh with only the {DATA_AXIS!r} axis, "
            f"got axes {mesh.axis_names}"
        )
    owners = [d.process_index for d in mesh.devices.reshape(-1)]
    P = jax.process_count()
    if owners != sorted(owners) or set(owners) != set(range(P)):
        raise ValueError(
            "the mesh's devices must be grouped by process, in process order, with at least one "
            f"device of each of the {P} processes; got processes {owners} (data_mesh() of all "
            "devices is)"
        )
    devices = tuple(owners.count(p) for p in range(P))
    for col, name in ((1, "D (columns)"), (2, "dtype"), (3, "dtype")):
        if len(set(every[:, col].tolist())) > 1:
            shown = ", ".join(
                f"process {p}: {row[1] if col == 1 else np.dtype(chr(row[3]) + str(row[2]))}"
                for p, row in enumerate(every)
            )
            raise ValueError(f"the processes' rows must share {name}; got {shown}")
    counts = tuple(int(c) for c in every[:, 0])
    if sum(counts) == 0:
        raise ValueError("the processes hold no rows at all: the batch needs N >= 1")
    return _Layout(counts, devices)
