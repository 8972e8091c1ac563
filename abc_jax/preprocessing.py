"""Preprocessing that travels with the params: standardised inputs and targets, and an
optional constant input column, fitted on the training rows.

The graph (``abc_jax.core``) stays as it is; preprocessing sits outside it. Fitted on rows
X (N, D) with weights r_i and targets T (N, O), it maps a row x (D,) and its target t (O,)
to what the model sees, and the model's output w' (O,) back to t's units::

    x' = [(x - x_mean) / x_scale, 1]     (D + 1,) with ``bias``, else (D,)
    t' = (t - t_mean) / t_scale          (O,)
    w  = w' * t_scale + t_mean           (O,)  ``undo_preprocessing``

x_mean, x_scale (and t_mean, t_scale) are the weighted mean and standard deviation of the
training rows (sum_i r_i x_i / sum_i r_i; the variance divides by sum_i r_i, as
scikit-learn's ``StandardScaler`` with ``sample_weight``): a row of weight 0 takes no part,
so padding and held-out rows masked by weight do not move them. A column constant to
rounding gets scale 1 (StandardScaler's rule), so it maps to 0, not to NaN.

The constant column gives the graph a bias without changing its equations: y = A x' has
A's last column as a bias of A, v = B x' one of B, and through C (z = u + v) an output
bias. Without ``standardize`` the means are 0 and the scales 1 (x' = [x, 1], w = w').

Typical use::

    prep = abc_jax.fit_preprocessing(abc_jax.Batch(X, T=T), standardize=True, bias=True)
    params = abc_jax.init_params(key, X.shape[1] + 1, H, T.shape[1])   # D + 1 inputs
    params = abc_jax.train(params, abc_jax.apply_preprocessing(prep, abc_jax.Batch(X, T=T)),
                           ...).params
    abc_jax.save_params("params.npz", params, preprocessing=prep)
    W = abc_jax.predict(params, X_new, preprocessing=prep)                # in T's units

All three functions are plain ``jax.numpy``: they run under ``jit`` and on sharded arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import edge
from abc_jax.core.model import Batch


class Preprocessing(NamedTuple):
    """A fitted preprocessing (a pytree): what ``apply_preprocessing`` and
    ``undo_preprocessing`` compute with (module docstring: the maps)."""

    x_mean: jax.Array  # (D,)  0 without standardize
    x_scale: jax.Array  # (D,)  > 0; 1 without standardize
    constant: jax.Array  # (k,)  columns appended to the scaled X: (1,) [1.] with bias, else (0,)
    t_mean: jax.Array | None = None  # (O,)  None: fitted without targets (outputs kept as they are)
    t_scale: jax.Array | None = None  # (O,)  > 0


def _float(a: Any, name: str) -> jax.Array:
    """``a`` as a floating JAX array (integers become JAX's default float)."""
    a = edge.array(a, name)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = jnp.asarray(a, jnp.result_type(float))
    return jnp.asarray(a)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _moments(A: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted mean and scale (N, K) -> (K,), (K,): the rows of weight 0 masked out (a NaN
    there does not leak), the variance divided by sum r, scale 1 for a column constant to
    rounding (StandardScaler's bound: var <= n eps var + (n eps mean)^2, n = sum r)."""
    used = (r > 0)[:, None]
    A = jnp.where(used, A, 0)
    n = jnp.sum(r)
    mean = jnp.sum(r[:, None] * A, axis=0) / n
    var = jnp.sum(r[:, None] * jnp.where(used, A - mean[None, :], 0) ** 2, axis=0) / n
    eps = jnp.finfo(A.dtype).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return mean, jnp.where(constant, 1, jnp.sqrt(var))


def fit_preprocessing(data: Any, *, standardize: bool = True, bias: bool = False) -> Preprocessing:
    """Fit the preprocessing of ``data``'s rows.

    Args:
      data: X (N, D), or a ``Batch(X (N, D), weights (N,), T (N, O) or (N,))``: rows of
        weight 0 take no part; with T the targets are standardised too.
      standardize: scale each column of X (and T) to weighted mean 0 and standard deviation
        1; False: the means 0 and the scales 1.
      bias: append a constant 1 column to X (the model then takes D + 1 inputs).

    Returns:
      ``Preprocessing(x_mean (D,), x_scale (D,), constant (1,) or (0,), t_mean (O,) or None,
      t_scale (O,) or None)`` in X's floating dtype.

    Raises ValueError for a shape that is not (N, D) with N >= 1, weights that are not (N,),
    or (outside ``jit``) weights that are all 0; TypeError for a flag that is not a bool.
    """
    standardize, bias = _check_flag(standardize, "standardize"), _check_flag(bias, "bias")
    X, r, T = data if isinstance(data, Batch) else (data, None, None)
    X = _float(X, "X")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be rows of shape (N, D) with N >= 1, got shape {X.shape}")
    N, dtype = X.shape[0], X.dtype
    r = jnp.ones((N,), dtype) if r is None else _float(r, "weights").astype(dtype)
    if r.shape != (N,):
        raise ValueError(f"weights must have shape (N,) = ({N},), one per row of X, got "
                         f"{r.shape}")
    if not edge.is_traced(r) and not bool(jnp.sum(r) > 0):
        raise ValueError("weights must not all be 0: the preprocessing is fitted on the rows "
                         "of non-zero weight")
    if T is not None:
        T = _float(T, "T").astype(dtype)
        T = T[:, None] if T.ndim == 1 else T
        if T.ndim != 2 or T.shape[0] != N:
            raise ValueError(f"T must have shape (N, O) or (N,) with N = {N}, one target per "
                             f"row of X, got {T.shape}")
    constant = jnp.ones((1,) if bias else (0,), dtype)
    if not standardize:
        x = (jnp.zeros((X.shape[1],), dtype), jnp.ones((X.shape[1],), dtype))
        t = (None, None) if T is None else (jnp.zeros((T.shape[1],), dtype),
                                            jnp.ones((T.shape[1],), dtype))
    else:
        x = _moments(X, r)
        t = (None, None) if T is None else _moments(T, r)
    return Preprocessing(*x, constant, *t)


def _check(prep: Any) -> Preprocessing:
    if not isinstance(prep, Preprocessing):
        raise TypeError("preprocessing must be an abc_jax.Preprocessing (from "
                        f"fit_preprocessing or load_preprocessing), got {type(prep).__name__}")
    return prep


def _inputs(prep: Preprocessing, X: Any, name: str) -> jax.Array:
    X = _float(X, name)
    D = prep.x_mean.shape[0]
    if X.ndim != 2 or X.shape[1] != D:
        raise ValueError(f"{name} must have shape (N, {D}): D = {D} columns, as the rows the "
                         f"preprocessing was fitted on, got {X.shape}")
    X = (X - prep.x_mean.astype(X.dtype)[None, :]) / prep.x_scale.astype(X.dtype)[None, :]
    const = jnp.broadcast_to(prep.constant.astype(X.dtype), (X.shape[0], prep.constant.shape[0]))
    return jnp.concatenate([X, const], axis=1)


def apply_preprocessing(prep: Preprocessing, data: Any) -> Any:
    """What the model sees: X (N, D) -> X' (N, D + k), or a ``Batch`` -> ``Batch(X', weights,
    T')`` with T' = (T - t_mean) / t_scale (T (N, O) or (N,) keeps its shape).

    Raises ValueError if X has other than the D columns fitted on, or T other than O
    columns, or the batch has targets and the preprocessing was fitted without (it cannot
    scale them: fit it on a ``Batch`` with T).
    """
    prep = _check(prep)
    if not isinstance(data, Batch):
        return _inputs(prep, data, "X")
    X, r, T = data
    if T is not None:
        if prep.t_mean is None:
            raise ValueError("the batch has targets T but the preprocessing was fitted without "
                             "them, so it cannot scale them: fit it on a Batch with T")
        T = _float(T, "T")
        O = prep.t_mean.shape[0]
        T2 = T[:, None] if T.ndim == 1 and O == 1 else T
        if T2.ndim != 2 or T2.shape[1] != O:
            raise ValueError(f"T must have O = {O} columns, as the targets the preprocessing "
                             f"was fitted on, got shape {T.shape}")
        mean, scale = (a.astype(T.dtype)[None, :] for a in (prep.t_mean, prep.t_scale))
        T = ((T2 - mean) / scale).reshape(T.shape)
    return Batch(_inputs(prep, X, "X"), r, T)


def undo_preprocessing(prep: Preprocessing, W: Any) -> jax.Array:
    """The model's outputs W' (n, O) in the targets' units: W' * t_scale + t_mean (as given
    for a preprocessing fitted without targets)."""
    prep = _check(prep)
    W = _float(W, "W")
    if prep.t_mean is None:
        return W
    O = prep.t_mean.shape[0]
    if W.ndim != 2 or W.shape[1] != O:
        raise ValueError(f"W must have shape (n, {O}): the model's O = {O} outputs per row, as "
                         f"the targets the preprocessing was fitted on, got {W.shape}")
    return W * prep.t_scale.astype(W.dtype)[None, :] + prep.t_mean.astype(W.dtype)[None, :]
