"""Input validation and the one checked run every public function goes through.

Argument checks are plain Python on ``.shape``, ``.dtype`` and numbers: they
raise before anything is traced and also work on tracers. Value checks are
fused into the computation: ``run`` jits ``fn`` with one all-finite flag and
explains a false flag only afterwards (see ``run``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PRECISION = "highest"
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
_FIELDS = ("A", "B", "C")


def check_precision(precision: Any) -> str:
    """Validate a matmul precision; None gives abc_jax's default, ``"highest"``.

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


@functools.cache
def _kind(dtype: Any) -> str:
    """"float", "int" or "other": a dtype's kind, remembered per dtype (a hot path)."""
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    return "int" if jnp.issubdtype(dtype, jnp.integer) else "other"


def is_traced(*trees: Any) -> bool:
    """True if any leaf is a tracer (we are inside a caller's transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def shape_of(a: Any, name: str) -> tuple[int, ...]:
    """The shape of an array-like argument; TypeError naming it if it is none."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    return tuple(a.shape)


def as_array(a: Any, name: str, dtype: Any) -> jax.Array:
    """``a`` (real numbers, checked) cast to ``dtype``; a tracer stays a tracer."""
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    shape_of(a, name)
    if _kind(a.dtype) == "other":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if isinstance(a, jax.Array) and a.dtype == dtype:
        return a
    return a.astype(dtype) if is_traced(a) else jnp.asarray(a, dtype=dtype)


def check_params(params: Any, name: str = "params") -> tuple[tuple[Any, Any, Any], np.dtype]:
    """``((A, B, C) unconverted, dtype)``: A, B (H, D), C (O, H), one floating dtype.

    float64 only with x64 enabled (it would otherwise become float32 silently).
    """
    if isinstance(params, dict):
        raise TypeError(f"{name} must be Params(A, B, C), got a dict: use abc_jax.Params(**d)")
    if not isinstance(params, tuple) or len(params) != 3:
        raise TypeError(f"{name} must be Params(A, B, C) (a 3-tuple of arrays), "
                        f"got {type(params).__name__}")
    arrays = [np.asarray(a) if isinstance(a, (list, tuple)) else a for a in params]
    shapes = [shape_of(a, f"{name}.{f}") for f, a in zip(_FIELDS, arrays, strict=True)]
    for f, s in zip(_FIELDS, shapes, strict=True):
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
    dtypes = {f: np.dtype(a.dtype) for f, a in zip(_FIELDS, arrays, strict=True)}
    for f, dt in dtypes.items():
        if _kind(dt) != "float":
            raise TypeError(f"{name}.{f} must have a floating dtype, got {dt}")
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{name}.A, .B, .C must share one dtype, got {dtypes}")
    return tuple(arrays), check_dtype(dtypes["A"], f"{name} dtype")


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


# --- values: one flag, explained only when it is false ------------------------


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every leaf of ``tree`` is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def weights_ok(weights: Any) -> jax.Array:
    """Row weights are finite, >= 0 and not all 0 (True for None: every row weighs 1)."""
    if weights is None:
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(weights) & (weights >= 0)) & (jnp.sum(weights) > 0)


@functools.partial(jax.jit, static_argnames=("fn", "precision", "statics"))
def _flagged(params: Any, data: Any, *args: Any, fn: Callable[..., Any], precision: str,
             statics: tuple[tuple[str, Any], ...]) -> tuple[Any, jax.Array]:
    with jax.default_matmul_precision(precision):
        out = fn(params, data, *args, **dict(statics))
    weights = getattr(data, "weights", None)
    return out, all_finite((params, out)) & weights_ok(weights)


def run(fn: Callable[..., Any], params: Any, data: Any, *args: Any, name: str,
        precision: str | None, **statics: Any) -> Any:
    """``fn(params, data, *args, **statics)`` at ``check_precision(precision)``, checked.

    ``params`` and ``data`` (an array or a pytree with ``X`` and optionally
    ``weights``) are already validated and cast; ``args`` are further arrays,
    ``statics`` hashable; ``name`` is the data argument's name in messages (a
    tuple: then the names of data and of the args after it, e.g. ``("x", "t")``).
    Under a caller's transformation ``fn`` is traced plainly. Otherwise one
    compiled call also returns an all-finite flag; a false flag raises
    ValueError (a NaN/inf input or a bad weight, named) or FloatingPointError
    (finite inputs overflowed the dtype).
    """
    precision = check_precision(precision)
    if is_traced(params, data, args):
        with jax.default_matmul_precision(precision):
            return fn(params, data, *args, **statics)
    out, ok = _flagged(params, data, *args, fn=fn, precision=precision,
                       statics=tuple(sorted(statics.items())))
    if not np.asarray(ok):  # reads the flag: about 10 us cheaper than bool(ok) on a CPU
        names = (name,) if isinstance(name, str) else name
        for arg, arg_name in zip(args, names[1:], strict=False):
            fields = getattr(arg, "_fields", None)  # a NamedTuple (tangents): per field
            for f, leaf in zip(fields, arg, strict=True) if fields else [(None, arg)]:
                raise_if_nonfinite(leaf, arg_name if f is None else f"{arg_name}.{f}")
        explain_nonfinite(params, data, names[0])
    return out


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


def explain_nonfinite(params: Any, data: Any, name: str) -> None:
    """Raise the error behind a false all-finite flag: a bad input, else an overflow."""
    for field, p in zip(_FIELDS, params, strict=True):
        raise_if_nonfinite(p, f"params.{field}")
    X = getattr(data, "X", data)
    raise_if_nonfinite(X, name)
    raise_if_nonfinite(getattr(data, "T", None), "T")
    weights = getattr(data, "weights", None)
    if weights is not None:
        raise_if_nonfinite(weights, "weights")
        if not bool(jnp.all(weights >= 0)):
            raise ValueError(f"weights must be >= 0, got min {float(jnp.min(weights))}")
        if not bool(jnp.sum(weights) > 0):
            raise ValueError("weights must not all be 0: the weighted mean needs sum(w) > 0")
    raise_overflow(params, X, name)


def raise_overflow(params: Any, X: Any, name: str, what: str = "the result") -> None:
    """FloatingPointError: finite inputs gave a non-finite result; the scales and a fix."""
    dtype = np.dtype(params[0].dtype)
    scale_x = float(jnp.max(jnp.abs(X)))
    scale_p = max(float(jnp.max(jnp.abs(p))) for p in params)
    wider = {2: ", or use float32 params",
             4: ", or use float64 (jax.config.update('jax_enable_x64', True) and float64 params)"}
    raise FloatingPointError(
        f"{what} is not finite although params and {name} are: it overflows {dtype} "
        f"(largest finite value {np.finfo(dtype).max:.3g}; max |{name}| = {scale_x:.3g}, "
        f"max |param| = {scale_p:.3g}, and L = ||C z||^2 squares them). "
        f"Rescale {name} (or the params){wider.get(dtype.itemsize, '')}")
