"""Data parallelism on JAX's own sharding: rows split along N, params replicated.

``shard_batch(X)`` places the rows of X across all devices (a ``Mesh`` with one
Auto ``"data"`` axis, ``P("data", None)``) as a ``Batch`` padded with zero rows of
weight 0. Every batch function computes sum_i r_i L_i / sum_i r_i, so padding
changes nothing: ``jax.jit(batch_loss)(params, shard_batch(X))`` works for any N
and device count, and XLA inserts the all-reduce for the contractions over N.

Several processes (one per host) run as one job on JAX's distributed runtime:
``initialize_distributed`` joins it, and ``shard_local_batch`` builds the global
batch from each process's own rows, each process padding its share locally. How a
command-line program runs as one process of a job (signals, exit codes) is the
program's business: ``experiments.common.job``.
"""

from __future__ import annotations

import hashlib
import math
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from abc_jax import edge
from abc_jax.core.model import Batch

DATA_AXIS = "data"


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with an Auto ``"data"`` axis."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _rows(X: Any, empty: bool = False) -> tuple[Any, Any, Any]:
    """(X, weights, T) of an (N, D) array or a ``Batch`` of real numbers, shapes checked by
    ``edge.batch_shapes`` (N = 0 allowed with ``empty``)."""
    X, weights, T = edge.data_input(X) if isinstance(X, Batch) else (edge.array(X, "X"), None, None)
    dtype = np.dtype(X.dtype) if hasattr(X, "dtype") else np.asarray(X).dtype
    if len(np.shape(X)) == 2 and dtype.kind not in "fiu":
        raise TypeError(f"X must hold real numbers, got dtype {dtype}")
    return X, weights, edge.batch_shapes(X, weights, T, empty=empty)


def _padded(X: Any, weights: Any, T: Any, rows: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """X, its weights (ones if None) and targets padded with zero rows of weight 0 to ``rows``."""
    X = np.asarray(X)
    wdtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
    w = np.ones(len(X), wdtype) if weights is None else np.asarray(weights, wdtype)
    pad = rows - len(X)
    T = None if T is None else np.pad(np.asarray(T), ((0, pad), (0, 0)))
    return np.pad(X, ((0, pad), (0, 0))), np.pad(w, (0, pad)), T


def shard_batch(X: Any, mesh: Mesh | None = None) -> Batch:
    """Place X (N, D), N >= 1, or a ``Batch``, across the devices of ``mesh`` along N.

    ``mesh``: a ``Mesh`` with an Auto ``"data"`` axis, default ``data_mesh()``.
    Returns ``Batch(X, weights, T)`` sharded ``P("data")`` along N, padded to a
    multiple of the data axis's size with zero rows of weight 0. With several
    processes X is the whole batch, the same on each (else ``shard_local_batch``).
    """
    mesh = check_mesh(mesh)
    X, weights, T = _rows(X)
    ndev = mesh.shape[DATA_AXIS]
    Xp, wp, Tp = _padded(X, weights, T, -(-np.shape(X)[0] // ndev) * ndev)
    rows, per_row = (NamedSharding(mesh, PartitionSpec(DATA_AXIS, *s)) for s in ((None,), ()))
    return Batch(jax.device_put(Xp, rows), jax.device_put(wp, per_row),
                 None if Tp is None else jax.device_put(Tp, rows))


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
        if leaf is None:
            return None
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(leaf), replicated)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, replicated)

    return jax.tree.map(put, tree)


def check_mesh(mesh: Any) -> Mesh:
    """``mesh`` (default ``data_mesh()``), checked to have an Auto ``"data"`` axis.

    Under ``Explicit`` axes (``jax.make_mesh``'s default) the contraction over
    the sharded N axis is a sharding type error, so such a mesh is refused.
    """
    if mesh is None:
        mesh = data_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[DATA_AXIS]
    if axis_type != AxisType.Auto:
        raise ValueError(f"mesh axis {DATA_AXIS!r} must be AxisType.Auto, got {axis_type}: the "
                         "contraction over the sharded N axis has no unique output sharding under "
                         "Explicit axes. Build the mesh with abc_jax.data_mesh() or "
                         "jax.make_mesh(..., axis_types=(AxisType.Auto,))")
    return mesh


def shard_local_batch(X: Any, mesh: Mesh | None = None) -> Batch:
    """The global batch of a multi-process job, each process giving only its own rows.

    Every process calls it with its rows (n_p, D), or a ``Batch`` of them; n_p
    may differ between processes (and be 0), D, the dtype and whether rows have
    targets T (and their O) may not. Each
    process pads its rows with weight-0 rows to the same count per device, on
    its own devices: no row moves between hosts. The real rows are, in global
    order, process 0's, then process 1's, ...; batch functions and ``train``
    give the results of one process on all rows, to rounding. ``mesh``: 1-D,
    Auto ``"data"`` axis, devices grouped by process in process order (default
    ``data_mesh()``). Returns a ``Batch`` as ``shard_batch`` does.

    Raises:
      ValueError, TypeError: on every process, if one process's rows are not a
        batch (n, D) of real numbers (that process names the problem), the
        processes disagree on D or dtype, N is 0, or the mesh does not fit.
    """
    mesh = check_mesh(mesh)
    if jax.process_count() == 1:
        return shard_batch(X, mesh)
    try:
        X, weights, T = _rows(X, empty=True)
        problem = None
    except (TypeError, ValueError) as e:
        X, weights, T, problem = np.zeros((0, 1)), None, None, e
    counts, per_device = _gather_counts(np.asarray(X), T, problem, mesh)
    R = max(1, max(-(-c // d) for c, d in zip(counts, per_device, strict=True)))
    me = jax.process_index()
    Xp, wp, Tp = _padded(X, weights, T, per_device[me] * R)
    n, put = len(mesh.devices.reshape(-1)) * R, jax.make_array_from_process_local_data
    rows, per_row = (NamedSharding(mesh, PartitionSpec(DATA_AXIS, *s)) for s in ((None,), ()))
    return Batch(put(rows, Xp, (n, Xp.shape[1])), put(per_row, wp, (n,)),
                 None if Tp is None else put(rows, Tp, (n, Tp.shape[1])))


def _gather_counts(local: np.ndarray, T: Any, problem: Exception | None,
                   mesh: Mesh) -> tuple[list[int], list[int]]:
    """Every process's row count and device count, checked (one all-gather).

    A process whose own rows are bad still takes part, so that every process
    raises instead of the others waiting in a collective.
    """
    dt = np.dtype(local.dtype)
    O = -1 if T is None else np.shape(T)[1]  # -1: no targets
    mine = np.array([problem is None, local.shape[0], local.shape[1], dt.itemsize, ord(dt.kind),
                     O], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (P, 6)
    if problem is not None:
        raise problem
    bad = [str(p) for p, ok in enumerate(every[:, 0]) if not ok]
    if bad:
        raise ValueError(f"the rows of process {', '.join(bad)} are not a batch (n, D) of real "
                         "numbers; see that process's error")
    owners = [d.process_index for d in mesh.devices.reshape(-1)]
    P = jax.process_count()
    if len(mesh.axis_names) != 1 or owners != sorted(owners) or set(owners) != set(range(P)):
        raise ValueError(f"the mesh must be 1-D over devices grouped by process, in process "
                         f"order, with at least one device of each of the {P} processes; got "
                         f"axes {mesh.axis_names} and processes {owners} (data_mesh() is)")
    if len({tuple(row) for row in every[:, 2:].tolist()}) > 1:
        shown = ", ".join(f"process {p}: D={r[2]}, {np.dtype(chr(r[4]) + str(r[3]))}, "
                          f"{f'T with O={r[5]}' if r[5] >= 0 else 'no T'}"
                          for p, r in enumerate(every))
        raise ValueError(f"the processes' rows must share D, dtype and targets; got {shown}")
    if every[:, 1].sum() == 0:
        raise ValueError("the processes hold no rows at all: the batch needs N >= 1")
    return [int(c) for c in every[:, 1]], [owners.count(p) for p in range(P)]


# --- several processes ------------------------------------------------------


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           heartbeat_timeout: int = 10, initialization_timeout: int = 300) -> None:
    """Join a job of ``num_processes`` processes on JAX's distributed runtime.

    ``jax.distributed.initialize`` with gloo for collectives between CPUs (GPUs
    use NCCL). Process 0 runs the coordinator at ``coordinator_address``
    (``"HOST:PORT"``, ``"[::1]:PORT"`` for IPv6); the others first wait up to
    ``initialization_timeout`` seconds for its port, so a missing coordinator
    raises ``ConnectionError`` instead of JAX aborting the process. Call it
    before any other JAX function (on SLURM and similar launchers
    ``jax.distributed.initialize()`` finds the values itself). 0 <= process_id
    < num_processes. After ``heartbeat_timeout`` seconds without a heartbeat
    JAX declares a process dead and terminates the others (JAX's default: 100).

    Raises:
      ConnectionError: no coordinator answered within initialization_timeout.
      ValueError, TypeError: a malformed address or a number out of range, named.
    """
    host, port = _split_address(coordinator_address)
    edge.check_positive_int(num_processes, "num_processes")
    if edge.check_int(process_id, "process_id", minimum=0) >= num_processes:
        raise ValueError(f"process_id must be < num_processes = {num_processes}, got {process_id}")
    edge.check_positive_int(heartbeat_timeout, "heartbeat_timeout")
    edge.check_positive_int(initialization_timeout, "initialization_timeout")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + initialization_timeout
    if process_id != 0:
        _wait_for_coordinator(host, port, coordinator_address, deadline, initialization_timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=max(1, math.ceil(deadline - time.monotonic())))


def _split_address(address: Any) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"coordinator_address must be 'HOST:PORT', got {address!r}")
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be 'HOST:PORT', got {address!r}")
    return host, int(port)


def _wait_for_coordinator(host: str, port: int, address: str, deadline: float,
                          timeout: int) -> None:
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

    One all-gather of an 8-byte digest of ``repr(value)`` per entry: a difference
    would otherwise hang a collective or silently mix results.
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
        raise ValueError(f"{what} must get the same arguments on every process; these differ "
                         f"from process 0's: {', '.join(differ)}")


def failed_processes(ok: bool) -> list[int]:
    """The processes that passed ``ok=False``, the same list on every process (one all-gather).

    Lets every process stop together when one fails before a collective,
    instead of the others waiting in it until the heartbeat timeout.
    """
    if jax.process_count() == 1:
        return [] if ok else [0]
    flags = np.asarray(multihost_utils.process_allgather(np.array(bool(ok), np.int32)))
    return [p for p, f in enumerate(flags.reshape(-1)) if not f]


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's ``data`` on every process (others pass anything, e.g. None).

    Two ``broadcast_one_to_all`` calls: the length, then the bytes.
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
