"""Input validation: static checks before tracing, value checks fused, cached by signature.

Shape, rank, dtype and argument checks only read ``.shape``, ``.dtype`` and
Python values, so they run before anything is traced and also work on
tracers inside a caller's ``jax.jit``. Their outcome depends only on the
call's signature (types, shapes, dtypes, sharding, keyword values), so
``checked_entry`` remembers it: a second call with the same signature goes
straight to the compiled function.

The check for NaN/inf is not a separate pass: the compiled computation
returns one all-finite flag of its outputs and the parameters alongside
them (a non-finite x always makes the outputs non-finite; an inf in A may
not, as sigmoid saturates, hence the parameters). Only when that flag is
false are the inputs scanned to name the offending entry, and when they are
all finite the error says the computation overflowed the dtype. Inside a
caller's jit the values are tracers and the value check is skipped.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FIELDS = ("A", "B", "C")

# Matmul precision (see ``check_precision``). "highest" is exact float32 on
# every backend; the others let a GPU use TF32 or bfloat16 passes.
DEFAULT_PRECISION = "highest"
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


def check_precision(precision: Any) -> str:
    """Validate a matmul precision; None gives abc_jax's default, ``"highest"``.

    abc_jax's policy: its own computations (``batch_grad``, ``batch_loss``,
    ``oracle_grad``, ``train`` ...) run their matrix products at
    ``"highest"`` precision unless told otherwise, whatever JAX's global
    ``jax_default_matmul_precision`` says, so every accuracy figure holds on
    any device. On a CPU all settings compute the same float32 products. On
    an NVIDIA GPU, JAX's own default for float32 is TF32 (a 10-bit mantissa,
    relative error ~5e-4); ``precision="default"`` (or ``"tensorfloat32"``)
    chooses it for speed. The value is applied with
    ``jax.default_matmul_precision`` while the computation is traced, so it
    reaches the products autodiff creates too.
    """
    if precision is None:
        return DEFAULT_PRECISION
    if not isinstance(precision, str):
        raise TypeError(
            f"precision must be None or one of {PRECISIONS}, got {type(precision).__name__}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    return precision


def is_traced(*trees: Any) -> bool:
    """True if any leaf is a tracer (we are inside a caller's transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _shape(a: Any, name: str) -> tuple[int, ...]:
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    return tuple(a.shape)


def check_params(params: Any, name: str = "params") -> tuple[int, int, int, np.dtype]:
    """Validate ``Params(A, B, C)`` and return ``(D, H, O, dtype)``.

    A and B must be (H, D), C must be (O, H), all of one floating dtype.
    """
    if not isinstance(params, tuple) or len(params) != 3:
        raise TypeError(
            f"{name} must be Params(A, B, C) (a 3-tuple of arrays), got {type(params).__name__}"
        )
    arrays = dict(zip(_FIELDS, params, strict=True))
    shapes = {f: _shape(a, f"{name}.{f}") for f, a in arrays.items()}
    for f, s in shapes.items():
        if len(s) != 2:
            raise ValueError(f"{name}.{f} must be a matrix (rank 2), got shape {s}")
    (H, D), (HB, DB), (O, HC) = shapes["A"], shapes["B"], shapes["C"]
    if (HB, DB) != (H, D):
        raise ValueError(f"{name}.B must have the shape of A, (H, D) = {(H, D)}, got {(HB, DB)}")
    if HC != H:
        raise ValueError(
            f"{name}.C must be (O, H) with H = {H} (rows of A), got shape {(O, HC)}: "
            "the shapes of A, B, C do not chain"
        )
    if min(H, D, O) < 1:
        raise ValueError(f"{name} dimensions must be >= 1, got D={D}, H={H}, O={O}")
    dtypes = {f: np.dtype(np.asarray(a).dtype if isinstance(a, (list, tuple)) else a.dtype)
              for f, a in arrays.items()}
    for f, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name}.{f} must have a floating dtype, got {dt}")
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{name}.A, .B, .C must share one dtype, got {dtypes}")
    return D, H, O, dtypes["A"]


def _as_data(x: Any, name: str, dtype: np.dtype) -> jax.Array:
    _shape(x, name)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    # Cast to the parameters' dtype: float32 params give float32 results even
    # when x is a float64 NumPy array and x64 is on.
    if isinstance(x, jax.Array) and x.dtype == dtype:
        return x
    return x.astype(dtype) if is_traced(x) else jnp.asarray(x, dtype=dtype)


def check_sample(x: Any, D: int, dtype: np.dtype, name: str = "x") -> jax.Array:
    """Validate one sample of shape (D,) and cast it to ``dtype``."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    s = _shape(x, name)
    if len(s) != 1:
        raise ValueError(f"{name} must be one sample of shape (D,) = ({D},), got shape {s}")
    if s[0] != D:
        raise ValueError(f"{name} must have D = {D} entries (columns of A), got shape {s}")
    return _as_data(x, name, dtype)


def check_batch(X: Any, D: int, dtype: np.dtype, name: str = "X") -> jax.Array:
    """Validate a batch of shape (N, D), N >= 1, and cast it to ``dtype``."""
    if isinstance(X, (list, tuple)):
        X = np.asarray(X)
    s = _shape(X, name)
    if len(s) != 2:
        raise ValueError(f"{name} must be a batch of shape (N, D) = (N, {D}), got shape {s}")
    if s[0] == 0:
        raise ValueError(f"{name} must hold at least one sample (N >= 1), got shape {s}")
    if s[1] != D:
        raise ValueError(f"{name} must have D = {D} columns (columns of A), got shape {s}")
    return _as_data(X, name, dtype)


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_finite_float(value: Any, name: str, *, positive: bool = False) -> float:
    """A Python or NumPy real number (not a bool, not a string), finite, optionally > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def check_key(key: Any, name: str = "key") -> jax.Array:
    """A ``jax.random.key(seed)`` (or a legacy ``PRNGKey``, uint32 of shape (2,))."""
    if not isinstance(key, jax.Array):
        raise TypeError(
            f"{name} must be a jax.random key, e.g. jax.random.key(0), got {type(key).__name__}"
        )
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise TypeError(
            f"{name} must be one jax.random key, e.g. jax.random.key(0) (or a legacy PRNGKey "
            f"of shape (2,)), got dtype {key.dtype} and shape {key.shape}"
        )
    return key


def _first_nonfinite(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    bad = ~jnp.isfinite(a).ravel()
    first = jnp.argmax(bad)
    return jnp.sum(bad), first, a.ravel()[first]


_first_nonfinite_jit = jax.jit(_first_nonfinite)


def raise_if_nonfinite(data: Any, name: str) -> None:
    """Raise ValueError naming the first NaN/inf entry of ``data``, if any.

    Computed on the device (three scalars come back), so it also works for
    an array sharded across several processes.
    """
    if not isinstance(data, jax.Array):
        data = np.asarray(data)
    if not jnp.issubdtype(data.dtype, jnp.inexact) or data.size == 0:
        return
    count, first, value = (np.asarray(v) for v in _first_nonfinite_jit(data))
    if count:
        idx = np.unravel_index(int(first), data.shape)
        raise ValueError(
            f"{name} must be finite: it holds {int(count)} NaN/inf value(s), "
            f"first {name}[{', '.join(str(int(i)) for i in idx)}] is {value}"
        )


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every leaf of ``tree`` is finite (computed on device)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


Prepare = Callable[..., tuple[Any, Any, dict[str, Any]]]
_FINITE_CACHE = 256  # entries of an entry point's seen-finite inputs
Describe = Callable[[Any, Any], str]


def checked_entry(fn: Callable[..., Any], prepare: Prepare, name: str,
                  describe_overflow: Describe) -> Callable[..., Any]:
    """A public entry point for ``fn(params, data, **statics)``: validated, jitted, checked.

    Args:
      fn: the plain computation; ``statics`` are hashable keyword arguments.
      prepare: ``prepare(params, data, **kwargs) -> (params, data, statics)``
        validates the call (raising TypeError/ValueError naming the argument)
        and returns the arrays to use and ``fn``'s static keywords, which
        must include ``precision`` (a ``check_precision`` value).
      name: the data argument's name for messages (``"X"`` or ``"x"``).
      describe_overflow: ``(params, data) -> str``, the scales involved, for
        the error raised when finite inputs give a non-finite result.

    Returns:
      ``call(params, data, **kwargs)``. Outside any transformation it runs
      one compiled computation that returns the outputs and their all-finite
      flag, reads the flag (one scalar; not for the very arrays that already
      gave a finite result) and raises on a non-finite result:
      ValueError naming the first bad entry of the params or the data, or
      FloatingPointError for an overflow from finite inputs. Under a
      caller's transformation it traces ``fn`` plainly. A call whose
      signature (leaf types, shapes, dtypes, data sharding, kwargs) was
      seen before, with arrays used as given, skips ``prepare``.
    """

    jits: dict[tuple[tuple[str, Any], ...], Callable[..., Any]] = {}  # statics -> jit

    def compiled(statics: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
        if statics not in jits:
            kwargs = dict(statics)
            precision = kwargs.pop("precision")

            def flagged(params: Any, data: Any) -> tuple[Any, jax.Array]:
                with jax.default_matmul_precision(precision):
                    out = fn(params, data, **kwargs)
                return out, all_finite((params, out))

            jits[statics] = jax.jit(flagged)
        return jits[statics]

    seen: dict[Any, Callable[..., Any]] = {}  # call signature -> jit, for the fast path

    def signature(params: Any, data: Any, kwargs: dict[str, Any]) -> Any:
        A, B, C = params
        return (type(params), type(A), type(B), type(C), type(data),
                A.shape, A.dtype, B.shape, B.dtype, C.shape, C.dtype,
                data.shape, data.dtype, data.sharding, *kwargs.items())

    # The very arrays that already gave a finite result, by id, with the jit
    # they went through: the same immutable arrays give the same result again,
    # so neither the validation nor the flag (a synchronisation) is needed.
    # Weak references tell a live array from a dead one whose id was reused
    # and keep nothing alive; the record is bounded.
    finite: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def checked_run(jitted: Callable[..., Any], params: Any, data: Any, key: Any) -> Any:
        out, ok = jitted(params, data)
        if not ok:
            raise_nonfinite(params, data, name, describe_overflow)
        if key is not None:
            if len(finite) >= _FINITE_CACHE:
                finite.clear()
            A, B, C = params
            finite[key] = (weakref.ref(A), weakref.ref(B), weakref.ref(C), weakref.ref(data),
                           jitted)
        return out

    def call(params: Any, data: Any, **kwargs: Any) -> Any:
        try:
            A, B, C = params
            key = (type(params), id(A), id(B), id(C), id(data), *kwargs.items())
            hit = finite.get(key)
        except Exception:  # not three arrays, or an unhashable argument: prepare() says
            key = hit = None
        if hit is not None:
            rA, rB, rC, rX, jitted = hit
            if rA() is A and rB() is B and rC() is C and rX() is data:
                return jitted(params, data)[0]
        try:
            sig = signature(params, data, kwargs)
            jitted = seen.get(sig)
        except Exception:
            sig = jitted = None
        if jitted is not None:
            return checked_run(jitted, params, data, key)
        new_params, new_data, statics = prepare(params, data, **kwargs)
        if is_traced(new_params, new_data):
            statics = dict(statics)
            with jax.default_matmul_precision(statics.pop("precision")):
                return fn(new_params, new_data, **statics)
        jitted = compiled(tuple(sorted(statics.items())))
        if sig is not None and new_params is params and new_data is data:
            seen[sig] = jitted
            return checked_run(jitted, params, data, key)
        return checked_run(jitted, new_params, new_data, None)  # converted: new every call

    def lower(params: Any, data: Any, **kwargs: Any) -> Any:
        """The compiled computation of ``call(params, data, **kwargs)``, lowered (for HLO)."""
        params, data, statics = prepare(params, data, **kwargs)
        return compiled(tuple(sorted(statics.items()))).lower(params, data)

    call.lower = lower
    call.executables = lambda: sum(j._cache_size() for j in jits.values())  # for tests
    return call


def raise_nonfinite(params: Any, data: Any, name: str, describe_overflow: Describe) -> None:
    """Explain a non-finite result: a NaN/inf input (named), else an overflow."""
    for field, p in zip(_FIELDS, params, strict=True):
        raise_if_nonfinite(p, f"params.{field}")
    raise_if_nonfinite(data, name)
    dtype = np.dtype(params[0].dtype)
    raise FloatingPointError(
        f"the result is not finite although params and {name} are: it overflows {dtype} "
        f"(largest finite value {np.finfo(dtype).max:.3g}). {describe_overflow(params, data)}. "
        f"Rescale {name} (or the params), or use float64 "
        "(jax.config.update('jax_enable_x64', True) and float64 params)"
    )
