"""Input validation: static shape checks before tracing, value checks fused.

Shape, rank and dtype checks only read ``.shape`` and ``.dtype``, so they run
in Python before anything is traced and also work on tracers inside a
caller's ``jax.jit``. The check for NaN/inf in the data is not a separate
eager pass: the compiled computation returns an all-finite flag of its own
outputs alongside them (a non-finite input always makes the loss
non-finite), and only when that flag is false is the input scanned on the
host to name the offending entry. Inside a caller's jit the data are
tracers and the value check is skipped.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

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


def raise_if_nonfinite(data: Any, name: str) -> None:
    """Host-side scan of ``data``; raises ValueError naming the first bad entry."""
    arr = np.asarray(data)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be finite: it holds {int(bad.sum())} NaN/inf value(s), "
            f"first {name}[{', '.join(map(str, idx))}] = {arr[idx]}"
        )


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every leaf of ``tree`` is finite (computed on device)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


class Checked(NamedTuple):
    """One computation in two forms (see ``finite_checked``)."""

    fn: Callable[..., Any]  # plain, for a caller's own transformations
    flagged: Callable[..., Any]  # jit of (fn(...), all_finite(fn(...))), one computation


def finite_checked(fn: Callable[..., Any], **jit_kwargs: Any) -> Checked:
    """Wrap ``fn`` for ``call_checked``: a jit that also returns an all-finite flag.

    The flag is one reduction over the outputs in the same compiled
    computation, so there is one executable per shape whether or not the
    flag is read.
    """

    def flagged(*args: Any, **kwargs: Any) -> tuple[Any, jax.Array]:
        out = fn(*args, **kwargs)
        return out, all_finite(out)

    return Checked(fn, jax.jit(flagged, **jit_kwargs))


# Arrays already seen to be finite, by id, with a weak reference that drops
# the entry when the array dies. JAX arrays are immutable, so once is enough.
_known_finite: dict[int, weakref.ref[Any]] = {}


def _is_known_finite(data: Any) -> bool:
    ref = _known_finite.get(id(data))
    return ref is not None and ref() is data


def _mark_finite(data: Any) -> None:
    if isinstance(data, jax.Array):
        key = id(data)
        _known_finite[key] = weakref.ref(data, lambda _, key=key: _known_finite.pop(key, None))


def call_checked(
    checked: Checked, args: tuple[Any, ...], data: Any, name: str, **kwargs: Any
) -> Any:
    """Run ``checked`` on ``args`` and raise ValueError if ``data`` holds NaN or inf.

    - Under a caller's transformation the values are unknown: ``checked.fn``
      runs with no value check.
    - Otherwise ``checked.flagged`` returns the output and its all-finite flag
      from one computation. For a JAX array already seen to be finite the
      flag is not read: no synchronisation, so repeated calls on one X
      dispatch asynchronously like any jitted function.
    - For new data one scalar is read back. Only when the output is not
      finite is ``data`` scanned on the host (a non-finite input always makes
      the output non-finite); a non-finite output from finite data (overflow
      from huge parameters) is returned as is.
    """
    if is_traced(args):
        return checked.fn(*args, **kwargs)
    out, ok = checked.flagged(*args, **kwargs)
    if _is_known_finite(data):
        return out
    if not bool(ok):
        raise_if_nonfinite(data, name)
    _mark_finite(data)
    return out
