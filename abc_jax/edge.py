"""The edge: what a user passes, checked once and turned into ``Params`` and ``Batch``.

Three kinds of check, each in one place:

- **Types and numbers**, in Python before anything is traced: a list becomes
  an array, a string or a dict is a ``TypeError`` naming the argument, an int
  or a float argument is checked for type and range (``check_int``,
  ``check_finite_float``, ``check_precision``, ``check_key``).
- **Shapes and dtypes**, by ``params``, ``batch``, ``sample``: plain Python on
  ``.shape`` and ``.dtype``, so they also run on tracers. The public functions
  call them inside their ``jax.jit``: they run once per compilation and cost
  nothing on later calls, yet raise named errors before anything compiles.
- **Values** (NaN/inf, negative weights, an overflow) need the device to finish,
  so for the array functions they are opt-in, as ``jax_debug_nans`` is in JAX:
  inside ``with value_checks():`` or with ``ABC_JAX_VALUE_CHECKS=1`` every call
  waits for its result and ``check_values`` explains a non-finite one. Training,
  files and scripts read their results anyway and always check.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax.core.model import Batch, Params, Residuals

DEFAULT_PRECISION = "highest"
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
FIELDS = ("A", "B", "C")
_switch = {"on": os.environ.get("ABC_JAX_VALUE_CHECKS", "") not in ("", "0")}
_ARRAY_TYPES: set[type] = set()  # types seen to be jax.Array: a set lookup beats isinstance


# --- numbers ------------------------------------------------------------------


def check_precision(precision: Any) -> str:
    """A matmul precision; None gives abc_jax's default, ``"highest"``.

    abc_jax's policy: its own computations run their matrix products at
    ``"highest"`` precision unless told otherwise, whatever JAX's global
    ``jax_default_matmul_precision`` says, so every accuracy figure holds on
    any device. On a CPU all settings compute the same float32 products. On an
    NVIDIA GPU, JAX's own default for float32 is TF32 (10-bit mantissa,
    relative error ~5e-4); ``precision="default"`` chooses it for speed. The
    value is applied with ``jax.default_matmul_precision`` while tracing, so it
    reaches the products autodiff creates too.
    """
    if precision is None:
        return DEFAULT_PRECISION
    if not isinstance(precision, str):
        raise TypeError(f"precision must be None or one of {PRECISIONS}, "
                        f"got {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    return precision


def check_int(value: Any, name: str, *, minimum: int = 1, allow_none: bool = False) -> Any:
    """A Python or NumPy int >= minimum (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> Any:
    """An int >= 1 (or None where allowed)."""
    return check_int(value, name, minimum=1, allow_none=allow_none)


def check_chunk_size(value: Any) -> Any:
    """``chunk_size``: "auto" (rows per chunk from the shapes and the backend:
    ``core.backward.rows_per_chunk``), None (the whole batch) or an int >= 1."""
    if isinstance(value, str):
        if value != "auto":
            raise TypeError(f"chunk_size must be 'auto', None (the whole batch) or an int >= 1, "
                            f"got str {value!r}")
        return value
    return check_positive_int(value, "chunk_size", allow_none=True)


def check_finite_float(value: Any, name: str, *, positive: bool = False) -> float:
    """A real number (Python, NumPy or a 0-d array; not a bool or a string), finite."""
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and not is_traced(value):
        value = value.item()
    real = (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """A floating dtype that JAX can hold as it is (float64 needs x64 enabled)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if _kind(dt) != "float":
        raise TypeError(f"{name} must be a floating dtype, got {dt}")
    if dt.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(f"{name} float64 needs x64 enabled: call "
                         "jax.config.update('jax_enable_x64', True) before creating arrays")
    return dt


def check_key(key: Any, name: str = "key") -> jax.Array:
    """One ``jax.random.key(seed)`` (or a legacy ``PRNGKey``, uint32 of shape (2,))."""
    if not isinstance(key, jax.Array):
        raise TypeError(f"{name} must be a jax.random key, e.g. jax.random.key(0), "
                        f"got {type(key).__name__}")
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise TypeError(f"{name} must be one jax.random key, e.g. jax.random.key(0), got dtype "
                        f"{key.dtype} and shape {key.shape}")
    return key


# --- types: what jit can take -------------------------------------------------


@functools.cache
def _kind(dtype: Any) -> str:
    """"float", "int" or "other": a dtype's kind, remembered per dtype (a hot path)."""
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    return "int" if jnp.issubdtype(dtype, jnp.integer) else "other"


def is_array(a: Any) -> bool:
    """``isinstance(a, jax.Array)``, remembered per type (a hot path: ~40 ns, not ~300)."""
    if type(a) in _ARRAY_TYPES:
        return True
    if isinstance(a, jax.Array):
        _ARRAY_TYPES.add(type(a))
        return True
    return False


def is_traced(*trees: Any) -> bool:
    """True if any leaf is a tracer (we are inside a caller's transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def array(a: Any, name: str) -> Any:
    """``a`` as an array of real numbers (a list becomes a NumPy array); else a named error.

    Arrays pass as they are (a tracer too); the cast to the params' dtype
    happens in ``batch``/``sample``, inside the compiled function.
    """
    if isinstance(a, (list, tuple)):
        try:
            a = np.asarray(a)
        except ValueError:
            raise TypeError(f"{name} must be an array; its nested lists are ragged") from None
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if _kind(a.dtype) == "other":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


def params_input(params: Any, name: str = "params") -> Params:
    """``Params`` of arrays from what a user passes: a ``Params`` or any 3-tuple."""
    if type(params) is Params and is_array(params.A) and is_array(params.B) and \
            is_array(params.C):
        return params  # the common case, kept fast
    if isinstance(params, dict):
        raise TypeError(f"{name} must be Params(A, B, C), got a dict: use abc_jax.Params(**d)")
    if isinstance(params, list) and params and isinstance(params[0], tuple):
        raise TypeError(f"{name} must be one Params(A, B, C), got a list of {len(params)}: "
                        "stack them into one Params with a leading axis, "
                        "jax.tree.map(lambda *a: jnp.stack(a), *params)")
    if not isinstance(params, tuple) or len(params) != 3:
        raise TypeError(f"{name} must be Params(A, B, C) (a 3-tuple of arrays), "
                        f"got {type(params).__name__}")
    return Params(*(array(a, f"{name}.{f}") for f, a in zip(FIELDS, params, strict=True)))


def data_input(data: Any, name: str = "X") -> Any:
    """An array or a ``Batch`` of arrays (None fields kept) from what a user passes."""
    if isinstance(data, Batch):
        return Batch(array(data.X, name), *(None if a is None else array(a, f)
                                            for f, a in zip(("weights", "T"), data[1:],
                                                            strict=True)))
    return data if is_array(data) else array(data, name)


def optional_input(a: Any, name: str, what: str = "an array") -> Any:
    """None, or ``array(a, name)``; a plain number is refused, saying what ``name`` must be."""
    if a is None:
        return None
    if isinstance(a, (int, float, complex)):
        raise TypeError(f"{name} must be {what} or None, got {type(a).__name__} {a!r}")
    return data_input(a, name)


# --- shapes and dtypes: plain Python on .shape, run while tracing ----------------


def params(p: Params, name: str = "params") -> Params:
    """``p`` checked (``check_params``), as JAX arrays."""
    check_params(p, name)
    return Params(*(a if is_array(a) else jnp.asarray(a) for a in p))


def check_params(p: Any, name: str = "params") -> None:
    """A, B (H, D), C (O, H), one floating dtype (float64 only with x64): anything with
    ``.shape`` and ``.dtype`` (arrays, tracers, ``jax.ShapeDtypeStruct``)."""
    shapes = [tuple(a.shape) for a in p]
    for f, s in zip(FIELDS, shapes, strict=True):
        if len(s) != 2:
            raise ValueError(f"{name}.{f} must be a matrix (rank 2), got shape {s}")
    (H, D), (HB, DB), (O, HC) = shapes
    if (HB, DB) != (H, D):
        raise ValueError(f"{name}.B must have the shape of A, (H, D) = {(H, D)}, got {(HB, DB)}")
    if HC != H:
        raise ValueError(f"{name}.C must be (O, H) with H = {H} (rows of A), got shape "
                         f"{(O, HC)}: the shapes of A, B, C do not chain")
    if min(H, D, O) < 1:
        raise ValueError(f"{name} dimensions must be >= 1, got D={D}, H={H}, O={O}")
    dtypes = {f: np.dtype(a.dtype) for f, a in zip(FIELDS, p, strict=True)}
    for f, dt in dtypes.items():
        if _kind(dt) != "float":
            raise TypeError(f"{name}.{f} must have a floating dtype, got {dt}")
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{name}.A, .B, .C must share one dtype, got {dtypes}")
    check_dtype(dtypes["A"], f"{name} dtype")


def cast(a: Any, dtype: Any, name: str = "the array") -> jax.Array:
    """``a`` (real numbers: a named TypeError otherwise) as a JAX array of ``dtype``."""
    if _kind(a.dtype) == "other":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a if isinstance(a, jax.Array) and a.dtype == dtype else jnp.asarray(a, dtype)


def sample(x: Any, D: int, dtype: Any, name: str = "x",
           what: tuple[str, str, str] = ("one sample", "D", "columns of A")) -> jax.Array:
    """One sample of shape (D,) (or one target of shape (O,), per ``what``), as ``dtype``."""
    kind, dim, of = what
    s = tuple(x.shape)
    if len(s) != 1:
        raise ValueError(f"{name} must be {kind} of shape ({dim},) = ({D},), got shape {s}")
    if s[0] != D:
        raise ValueError(f"{name} must have {dim} = {D} entries ({of}), got shape {s}")
    return cast(x, dtype, name)


def target(t: Any, O: int, dtype: Any, name: str = "t") -> jax.Array | None:
    """One target t (O,) or None (t = 0), as ``dtype``."""
    return None if t is None else sample(t, O, dtype, name, ("one target", "O", "rows of C"))


def batch_shapes(X: Any, weights: Any, T: Any, name: str = "X", D: int | None = None,
                 O: int | None = None, *, empty: bool = False) -> Any:
    """The one check of a batch's shapes: X (N, D), N >= 1 (0 too with ``empty``: one
    process's share of rows), weights (N,), T (N, O) (or (N,) for O = 1); D and O None:
    any (rows not yet matched to params). Plain Python on ``.shape``, so it also runs on
    tracers. Returns T, a 1-D one as (N, 1) where O = 1."""
    s = tuple(X.shape)
    if len(s) != 2:
        wanted = "(N, D)" if D is None else f"(N, D) = (N, {D})"
        raise ValueError(f"{name} must be a batch of shape {wanted}, got shape {s}")
    if s[0] == 0 and not empty:
        raise ValueError(f"{name} must hold at least one sample (N >= 1), got shape {s}")
    if D is not None and s[1] != D:
        raise ValueError(f"{name} must have D = {D} columns (columns of A), got shape {s}")
    if weights is not None and tuple(weights.shape) != (s[0],):
        raise ValueError(f"weights must have shape (N,) = ({s[0]},), one per row of "
                         f"{name}, got {tuple(weights.shape)}")
    if T is None:
        return None
    shape = tuple(T.shape)
    if O == 1 and shape == (s[0],):
        return T[:, None]  # 1-D targets of length N: one output, O = 1
    if len(shape) != 2 or shape[0] != s[0] or (O is not None and shape[1] != O):
        what = f"({s[0]}, {O}), one target of C's O = {O} rows" if O is not None else \
            f"({s[0]}, O), one target"
        raise ValueError(f"T must have shape (N, O) = {what} per row of {name}, got {shape}")
    return T


def batch(data: Any, D: int, O: int, dtype: Any, name: str = "X") -> Batch:
    """X (N, D) or ``Batch(X, weights (N,), T (N, O))``, checked and cast, as a ``Batch``."""
    X, weights, T = data if isinstance(data, Batch) else (data, None, None)
    T = batch_shapes(X, weights, T, name, D, O)
    return Batch(cast(X, dtype, name), None if weights is None else cast(weights, dtype, "weights"),
                 None if T is None else cast(T, dtype, "T"))


def params_and_batch(p: Params, data: Any, name: str = "X") -> tuple[Params, Batch]:
    """Checked ``(Params, Batch)``, the batch in the params' dtype."""
    p = params(p)
    return p, batch(data, p.A.shape[1], p.C.shape[0], p.A.dtype, name)


def params_and_sample(p: Params, x: Any, t: Any) -> tuple[Params, jax.Array, Any]:
    """Checked ``(Params, x (D,), t (O,) or None)`` in the params' dtype."""
    p = params(p)
    return p, sample(x, p.A.shape[1], p.A.dtype), target(t, p.C.shape[0], p.A.dtype)


def residuals(res: Any, p: Params) -> Residuals:
    """``Residuals(x (D,), u (H,), z (H,), w (O,), t (O,) or None)`` checked against ``p``."""
    if not isinstance(res, Residuals):
        raise TypeError(f"residuals must be the Residuals that forward returns, "
                        f"got {type(res).__name__}")
    (H, D), O, dtype = p.A.shape, p.C.shape[0], p.A.dtype
    sizes = {"x": ("D", D), "u": ("H", H), "z": ("H", H), "w": ("O", O), "t": ("O", O)}
    out = []
    for f, a in zip(Residuals._fields, res, strict=True):
        dim, n = sizes[f]
        out.append(None if a is None and f == "t" else
                   sample(array(a, f"residuals.{f}"), n, dtype, f"residuals.{f}",
                          (f"one vector of the sample's {f}", dim, "params")))
    return Residuals(*out)


# --- values: opt-in for the array functions -------------------------------------


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Within the block, every array function checks its inputs' and result's values.

    A NaN/inf in params, X, T or weights (or a negative or all-zero weight) is a
    ValueError naming the argument and the first bad entry; finite inputs whose
    result overflows are a FloatingPointError. Each call then waits for the
    device. Off by default (like ``jax_debug_nans``); ``ABC_JAX_VALUE_CHECKS=1``
    turns it on for a whole process.
    """
    before = _switch["on"]
    _switch["on"] = bool(enabled)
    try:
        yield
    finally:
        _switch["on"] = before


def values_checked() -> bool:
    """True inside ``value_checks()`` or with ``ABC_JAX_VALUE_CHECKS=1``."""
    return _switch["on"]


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every leaf of ``tree`` is finite (True for no leaves)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or
                             [jnp.bool_(True)]))


def weights_ok(weights: Any) -> jax.Array:
    """Row weights are finite, >= 0 and not all 0 (per member, for a leading member axis
    (M, N)); True for None: every row weighs 1."""
    if weights is None:
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(weights) & (weights >= 0)) & jnp.all(jnp.sum(weights, -1) > 0)


@jax.jit
def _values_flag(inputs: Any, out: Any) -> jax.Array:
    weights = [a.weights for a in inputs if isinstance(a, Batch)]
    return all_finite((inputs, out)) & jnp.all(jnp.stack([weights_ok(w) for w in weights] or
                                                         [jnp.bool_(True)]))


def check_values(out: Any, p: Params, inputs: Mapping[str, Any]) -> None:
    """Raise the error behind a non-finite ``out`` or a bad input (one device call if none).

    ``inputs``: the data arguments by name (arrays, ``Batch``, NamedTuples of
    arrays such as tangents, or None), in the order their errors are looked for.
    """
    values_pending(out, p, inputs)()


def values_pending(out: Any, p: Params, inputs: Mapping[str, Any]) -> Any:
    """``check_values`` in two halves: the device's check is dispatched now (JAX runs it
    asynchronously) and the returned function, called when the host reads results anyway,
    waits for it and raises the named error if any."""
    flag = values_flag(out, p, inputs)
    return lambda: None if bool(flag) else explain_values(out, p, inputs)


def values_flag(out: Any, p: Params, inputs: Mapping[str, Any]) -> jax.Array:
    """() bool: ``check_values``'s test, without its error: every input and ``out`` finite,
    every weight >= 0 with a positive sum. Traceable, so a compiled program can compute it
    alongside its work; ``explain_values`` gives the error where it is False."""
    return _values_flag((p, *(v for v in inputs.values() if v is not None)), out)


def explain_values(out: Any, p: Params, inputs: Mapping[str, Any]) -> None:
    """Raise the error behind a False ``values_flag``: the first bad input, else an
    overflow."""
    _explain(out, p, {k: v for k, v in inputs.items() if v is not None})


def _explain(out: Any, p: Params, named: Mapping[str, Any]) -> None:
    """The error behind a failed ``_values_flag``: the first bad input, else an overflow."""
    for f, a in zip(FIELDS, p, strict=True):
        raise_if_nonfinite(a, f"params.{f}")
    for name, a in named.items():
        if isinstance(a, Batch):
            explain_batch(a, name)
        elif getattr(a, "_fields", None):  # a NamedTuple of arrays: per field
            for f, leaf in zip(a._fields, a, strict=True):
                raise_if_nonfinite(leaf, f"{name}.{f}")
        else:
            raise_if_nonfinite(a, name)
    first = next(iter(named.values()), p.A)
    raise_overflow(p, getattr(first, "X", first), next(iter(named), "x"))


def explain_batch(data: Batch, name: str = "X") -> None:
    """The ValueError for a batch with a NaN/inf entry or bad weights, if any (weights
    (M, N): each member's)."""
    field = {"X": name} | {f: f if name == "X" else f"{name}.{f}" for f in ("weights", "T")}
    raise_if_nonfinite(data.X, field["X"])
    raise_if_nonfinite(data.T, field["T"])
    r = data.weights
    if r is not None:
        raise_if_nonfinite(r, field["weights"])
        if not bool(jnp.all(r >= 0)):
            raise ValueError(f"{field['weights']} must be >= 0, got min {float(jnp.min(r))}")
        empty = np.flatnonzero(np.asarray(jnp.sum(r, -1)).reshape(-1) <= 0).tolist()
        if empty:
            where = f" for members {empty}" if r.ndim > 1 else ""
            raise ValueError(f"{field['weights']} must not all be 0{where}: the weighted mean "
                             "needs sum(w) > 0")


@jax.jit
def _first_nonfinite(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    bad = ~jnp.isfinite(a).ravel()
    first = jnp.argmax(bad)
    return jnp.sum(bad), first, a.ravel()[first]


def raise_if_nonfinite(a: Any, name: str) -> None:
    """ValueError naming the count and the first NaN/inf entry of ``a``, if any.

    Computed on the device, so it also works for an array spread over processes.
    """
    if a is None or not jnp.issubdtype(a.dtype, jnp.inexact) or a.size == 0:
        return
    count, first, value = (np.asarray(v) for v in _first_nonfinite(a))
    if count:
        idx = ", ".join(str(int(i)) for i in np.unravel_index(int(first), a.shape))
        raise ValueError(f"{name} must be finite: it holds {int(count)} NaN/inf value(s), "
                         f"first {name}[{idx}] is {value}")


def raise_overflow(p: Params, X: Any, name: str, what: str = "the result") -> None:
    """FloatingPointError: finite inputs gave a non-finite result; the scales and a fix."""
    dtype = np.dtype(p[0].dtype)
    scale_x = max((float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(X)), default=0.0)
    scale_p = max(float(jnp.max(jnp.abs(a))) for a in p)
    wider = {2: ", or use float32 params",
             4: ", or use float64 (jax.config.update('jax_enable_x64', True) and float64 params)"}
    raise FloatingPointError(
        f"{what} is not finite although params and {name} are: it overflows {dtype} "
        f"(largest finite value {np.finfo(dtype).max:.3g}; max |{name}| = {scale_x:.3g}, "
        f"max |param| = {scale_p:.3g}, and L = ||C z||^2 squares them). "
        f"Rescale {name} (or the params){wider.get(dtype.itemsize, '')}")
