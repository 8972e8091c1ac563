"""What a training run's arguments mean, checked once: shared, or one per member.

Each array argument of ``train_many`` is shared by all M members or carries a
leading member axis: params (M, H, D)..., lr (M,), keys (M,), X (M, N, D),
weights (M, N), T (M, N, O), and the same for held-out data. These functions
tell which, check that the sizes agree, check the values (training always
does: it reads its losses anyway) and place the members on a mesh's devices.
``train`` is the case M = 1 with everything shared.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from abc_jax import edge, parallel
from abc_jax.core.model import Batch, Params

FIELDS = ("X", "weights", "T")  # a Batch's fields, as named in messages


def member_params(params: Any) -> tuple[Params, int | None]:
    """(Params, M or None for shared); shapes checked on member 0, every member's dtype."""
    params = edge.params_input(params)
    if all(np.ndim(a) == 3 for a in params):
        sizes = {f: np.shape(a)[0] for f, a in zip("ABC", params, strict=True)}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(f"params: A, B, C need one leading (member) axis of one size "
                             f">= 1, got {sizes}")
        edge.check_params(Params(*(jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype)
                                   for a in params)))  # member 0's shapes chain, one dtype
        return Params(*(jnp.asarray(a) for a in params)), sizes["A"]
    return edge.params(params), None


def member_data(data: Any, D: int, O: int, dtype: Any,
                name: str = "X") -> tuple[Batch, Batch, dict[str, int]]:
    """(Batch cast to ``dtype``, its in_axes, {field: M}) for shared or per-member fields."""
    data = edge.data_input(data, name)
    names = (name, *(f"{name}.{f}" if name != "X" else f for f in FIELDS[1:]))
    fields = dict(zip(names, data if isinstance(data, Batch) else (data, None, None),
                      strict=True))
    sizes = {}
    for (n, a), rank in zip(fields.items(), (2, 1, 2), strict=True):
        if a is None:
            continue
        if n.endswith("T") and a.ndim in (1, 2) and O == 1 and a.ndim == np.ndim(data[0]) - 1:
            a = fields[n] = a[..., None]  # 1-D targets (N,) or (M, N) for O = 1
        if a.ndim not in (rank, rank + 1):
            raise ValueError(f"{n} must have rank {rank} (shared) or {rank + 1} (a leading "
                             f"member axis), got shape {np.shape(a)}")
        if a.ndim == rank + 1:
            sizes[n] = np.shape(a)[0]
    if 0 in sizes.values():
        raise ValueError(f"the member axis must hold at least one member, got {sizes}")
    first = edge.batch(Batch(*(a[0] if n in sizes else a for n, a in fields.items())), D, O,
                       dtype, name)  # shapes against the params, named
    N = first.X.shape[0]
    for (n, a), tail in zip(fields.items(), ((N, D), (N,), (N, O)), strict=True):
        if a is not None and tuple(np.shape(a)[-len(tail):]) != tail:
            raise ValueError(f"{n} must have shape {tail} per member (N = {N} rows of "
                             f"{name}), got {np.shape(a)}")
    batch = Batch(*(None if a is None else edge.cast(a, dtype) for a in fields.values()))
    return batch, Batch(*(0 if n in sizes else None for n in names)), sizes


def per_member(value: Any, name: str, minimum: float = 0.0, strict: bool = True) -> Any:
    """A finite number (> or >= ``minimum``), shared by every member, or a 1-D sequence (M,)
    of them, one per member: a float or a tuple of floats (the one place this is checked)."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
        raise TypeError(f"{name} must be a number or an array (M,) of numbers, got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number or array, not a traced value: call "
                        "training outside jax.jit/vmap/grad")
    a = np.asarray(value)
    if a.dtype.kind not in "iuf" or a.ndim > 1 or a.size == 0:
        raise TypeError(f"{name} must be a number or an array (M,) of numbers, got "
                        f"{a.dtype} of shape {a.shape}")
    bad = ~np.isfinite(a) | ((a <= minimum) if strict else (a < minimum))
    if bad.any():
        want = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be finite and {want}, got {a.tolist()}")
    return float(a) if a.ndim == 0 else tuple(float(v) for v in a)


def sizes_of(values: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """(name, M) for each value given one per member: a tuple (``per_member``) or an
    array with one axis."""
    return tuple((k, len(v) if isinstance(v, tuple) else int(np.shape(v)[0]))
                 for k, v in values.items() if isinstance(v, tuple) or np.ndim(v) == 1)


def jsonable(value: Any) -> Any:
    """A per-member value as JSON: a number or a list."""
    return list(value) if isinstance(value, tuple) else value


def check_together(key: Any, draws: str | None, patience: Any, eval_data: Any) -> None:
    """The arguments that need or exclude one another: a key exactly when the step draws
    from it, patience only with held-out data."""
    if draws is not None and key is None:
        raise ValueError(f"key is required: the step draws {draws} from it (pass "
                         "key=jax.random.key(0))")
    if key is not None and draws is None:
        raise ValueError("key: this training step draws nothing (full-batch training has no "
                         "randomness); drop key, or pass batch_size or privacy")
    if patience is not None and eval_data is None:
        raise ValueError("patience needs eval_data: early stopping watches the held-out loss")


def key_members(key: Any) -> int | None:
    """M for keys (M,) (typed) or (M, 2) (legacy uint32); None for one key or no key."""
    if not isinstance(key, jax.Array):
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    stacked = (typed and key.ndim == 1) or (key.dtype == jnp.uint32 and key.ndim == 2)
    return key.shape[0] if stacked else None


def member_keys(key: Any, M: int) -> Any:
    """Keys (M,): the stacked ones as given, else fold_in(key, m) per member."""
    if key is None or key_members(key) is not None:
        return key
    edge.check_key(key)
    return jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.arange(M))


def count_members(sizes: dict[str, int], members: Any) -> int:
    """The one member count all per-member arguments agree on."""
    if members is not None:
        sizes = sizes | {"members": edge.check_positive_int(members, "members")}
    if not sizes:
        raise ValueError("train_many needs the number of members: give stacked params (M, ...), "
                         "an lr array (M,), keys (M,), per-member data, or members=M")
    if len(set(sizes.values())) != 1:
        raise ValueError("the leading (member) axes disagree: " + ", ".join(
            f"{k} has {v}" for k, v in sizes.items()))
    return next(iter(sizes.values()))


def check_values(params: Params, batch: Batch, name: str = "X") -> None:
    """ValueError naming the first NaN/inf entry or a member's bad weights, if any
    (``edge.check_values``: one device call when all is well)."""
    edge.check_values((), params, {name: batch})


def values_pending(params: Params, batch: Batch, held: Batch | None) -> Any:
    """The same check of the training and the held-out data, dispatched now; the returned
    function raises its error when called (where the host reads the first losses)."""
    return edge.values_pending((), params, {"X": batch, "eval_data": held})


def values_ok(params: Params, batch: Batch, held: Batch | None) -> jax.Array:
    """() bool: ``values_pending``'s test, traceable (a run's one program computes it)."""
    return edge.values_flag((), params, {"X": batch, "eval_data": held})


def explain_values(params: Params, batch: Batch, held: Batch | None) -> None:
    """The error behind a False ``values_ok``."""
    edge.explain_values((), params, {"X": batch, "eval_data": held})


@jax.jit
def _rows(weights: jax.Array) -> jax.Array:
    return jnp.sum(weights > 0, axis=-1)


def row_counts(batch: Batch) -> np.ndarray:
    """Rows of non-zero weight: () or (M,) for per-member weights (N for no weights).

    Counted on the devices, so it also works for rows spread over processes.
    """
    if batch.weights is None:
        return np.asarray(batch.X.shape[-2])
    return np.asarray(_rows(batch.weights))


def rows_per_member(batch: Batch) -> int:
    """Rows of non-zero weight, one count for every member (mini-batches need it static)."""
    if batch.weights is None:
        return batch.X.shape[-2]
    counts = set(np.atleast_1d(row_counts(batch)).tolist())
    if len(counts) != 1:
        raise ValueError(f"weights: with batch_size every member needs the same number of rows "
                         f"of non-zero weight (one mini-batch schedule), got {sorted(counts)}")
    return counts.pop()


def check_mesh(mesh: Any, M: int) -> Any:
    """None, or a mesh whose "data" axis splits the M members evenly."""
    if mesh is None:
        return None
    n = parallel.check_mesh(mesh).shape[parallel.DATA_AXIS]
    if M % n:
        raise ValueError(f"mesh: its {parallel.DATA_AXIS!r} axis of {n} devices must split the "
                         f"M = {M} members evenly (M a multiple of {n})")
    return mesh


def not_sharded(batch: Batch) -> None:
    """A ValueError for rows sharded over devices: ``train_many`` splits members instead."""
    if any(len(getattr(getattr(a, "sharding", None), "device_set", ())) > 1 for a in batch):
        raise ValueError("train_many splits members, not rows, over devices: pass X as one "
                         "array, not sharded (shard_batch is for train), and mesh=")


def on_devices(mesh: Any, tree: Any, axes: Any = 0) -> Any:
    """With a mesh, ``tree``'s member axis split over its devices (``axes`` 0) or the tree
    on every device (None); for a ``Batch``, ``axes`` is a ``Batch`` of 0/None per field.
    Without a mesh, ``tree`` as it is."""
    if mesh is None or tree is None:
        return tree
    if isinstance(tree, Batch):
        return Batch(*(on_devices(mesh, a, ax) for a, ax in zip(tree, axes, strict=True)))
    spec = PartitionSpec(parallel.DATA_AXIS) if axes == 0 else PartitionSpec()
    return jax.device_put(tree, NamedSharding(mesh, spec))
