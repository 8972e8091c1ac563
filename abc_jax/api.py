"""The public array functions: each is the edge plus one compiled call.

Every function here has the same three steps:

1. Python checks of what jit cannot take (lists, strings, dicts) and of the
   number arguments (``edge.data_input``, ``edge.check_precision``, ...);
2. one ``jax.jit``-compiled body that checks shapes and dtypes while it traces
   (``edge.params_and_batch``: once per compilation, free afterwards) and then
   calls the pure core at the requested matmul precision;
3. with ``edge.value_checks()`` on, ``edge.check_values`` on the result.

So an eager call costs one jit dispatch plus a few Python checks (bench_step
measures it against a bare ``jax.jit(jax.grad(...))``), and inside a caller's
``jit``/``vmap``/``grad`` the body is inlined like any jitted function.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from abc_jax import edge, parallel
from abc_jax.core import backward, curvature, model, norms, oracles, tangents
from abc_jax.core.model import Batch, Params, Residuals
from abc_jax.preprocessing import Preprocessing, apply_preprocessing, undo_preprocessing

_precision = functools.partial(jax.jit, static_argnames=("precision",))


def _on_batch(core: Any) -> Any:
    """The compiled body of a public batch function: the edge's shape checks, then
    ``core(params, batch)`` at the requested matmul precision."""
    def body(params: Params, X: Any, precision: str) -> Any:
        params, batch = edge.params_and_batch(params, X)
        with jax.default_matmul_precision(precision):
            return core(params, batch)

    body.__name__ = body.__qualname__ = getattr(core, "__name__", "batch_function")
    return _precision(body)


def _done(out: Any, params: Params, inputs: dict[str, Any]) -> Any:
    """``out``, after the opt-in value checks."""
    if edge.values_checked() and not edge.is_traced(out):
        edge.check_values(out, params, inputs)
    return out


def init_params(key: jax.Array, in_dim: int, hidden_dim: int | None = None,
                out_dim: int | None = None, *, dtype: Any = jnp.float32) -> Params:
    """``Params(A (H, D), B (H, D), C (O, H))``, entries ~ Normal(0, 1 / fan_in).

    ``in_dim`` is D; ``hidden_dim`` (H) and ``out_dim`` (O) default to D, the
    homework's K x K matrices. ``dtype``: floating (float64 needs x64 enabled).
    """
    D = edge.check_positive_int(in_dim, "in_dim")
    H = edge.check_positive_int(D if hidden_dim is None else hidden_dim, "hidden_dim")
    O = edge.check_positive_int(D if out_dim is None else out_dim, "out_dim")
    return model.init_params(edge.check_key(key), D, H, O, edge.check_dtype(dtype))


# --- one sample -----------------------------------------------------------------


@_precision
def _forward(params: Params, x: Any, t: Any, precision: str) -> tuple[jax.Array, Residuals]:
    params, x, t = edge.params_and_sample(params, x, t)
    with jax.default_matmul_precision(precision):
        return model.forward(params, x, t)


def _sample_args(params: Any, x: Any, t: Any) -> tuple[Params, Any, Any]:
    return (edge.params_input(params), edge.data_input(x, "x"),
            edge.optional_input(t, "t", "one target array of shape (O,)"))


def forward(params: Params, x: jax.Array, t: jax.Array | None = None, *,
            precision: str | None = None) -> tuple[jax.Array, Residuals]:
    """Forward pass for one sample x (D,), params ``Params(A (H, D), B (H, D), C (O, H))``.

    Returns ``(L, residuals)``: the scalar loss ||C (sigmoid(A x) + B x) - t||^2
    (t (O,) the target, None for 0) and the ``Residuals(x (D,), u (H,), z (H,),
    w (O,), t)`` that ``manual_vjp`` consumes. ``precision``: matmul precision,
    None for abc_jax's default ``"highest"`` (``edge.check_precision``).
    """
    params, x, t = _sample_args(params, x, t)
    out = _forward(params, x, t, edge.check_precision(precision))
    return _done(out, params, {"x": x, "t": t})


def loss(params: Params, x: jax.Array, t: jax.Array | None = None, *,
         precision: str | None = None) -> jax.Array:
    """L = ||w - t||^2 for one sample x of shape (D,) (t (O,), None for 0: ||w||^2)."""
    return forward(params, x, t, precision=precision)[0]


@jax.jit
def _manual_vjp(params: Params, residuals: Residuals, g: Any) -> Params:
    params = edge.params(params)
    residuals = edge.residuals(residuals, params)
    return backward.vjp(params, residuals, g)[0]


def manual_vjp(params: Params, residuals: Residuals, g: Any = 1.0) -> Params:
    """The hand-derived backward pass for one sample.

    ``residuals`` come from ``forward(params, x, t)``: x (D,), u (H,), z (H,),
    w (O,), t (O,) or None; ``g`` is the scalar cotangent of L (1.0 gives the
    gradient). Returns ``Params(gA (H, D), gB (H, D), gC (O, H))`` = g * dL/d(A, B, C),
    where gC = gw z^T, gB = gz x^T, gA = (gz * u * (1 - u)) x^T, gw = 2 g (w - t),
    gz = C^T gw (the derivation: ``abc_jax.core.backward``).
    """
    if g is None or isinstance(g, (str, bytes)) or not np.isrealobj(g):
        raise TypeError(f"g must be a real scalar, the cotangent of the scalar loss L, got "
                        f"{type(g).__name__} {g!r}")
    if np.ndim(g) != 0:
        raise ValueError(f"g must be a scalar, the cotangent of the scalar loss L, got shape "
                         f"{np.shape(g)}; for a batch, vmap manual_vjp over the residuals")
    params = edge.params_input(params)
    out = _manual_vjp(params, residuals, g)
    return _done(out, params, {"residuals": residuals})


@_precision
def _manual_grad(params: Params, x: Any, t: Any, precision: str) -> Params:
    params, x, t = edge.params_and_sample(params, x, t)
    with jax.default_matmul_precision(precision):
        return backward.manual_grad(params, x, t)


def manual_grad(params: Params, x: jax.Array, t: jax.Array | None = None, *,
                precision: str | None = None) -> Params:
    """dL/d(A, B, C) for one sample x (D,) and target t (O,) (None: 0), as ``Params``.

    ``forward`` then ``manual_vjp``; ``precision`` as in ``forward``.
    """
    params, x, t = _sample_args(params, x, t)
    out = _manual_grad(params, x, t, edge.check_precision(precision))
    return _done(out, params, {"x": x, "t": t})


@jax.jit
def _abc_loss(params: Params, x: Any, t: Any) -> jax.Array:
    params, x, t = edge.params_and_sample(params, x, t)
    return backward.abc_loss(params, x, t)


def abc_loss(params: Params, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """L = ||C (sigmoid(A x) + B x) - t||^2 for one sample, differentiated by hand.

    x (D,), t (O,) or None (0) -> scalar. A ``jax.custom_vjp`` whose backward
    pass is ``manual_vjp`` plus gx = A^T gy + B^T gz and gt = -gw (t is an
    input like x: ``jax.grad(abc_loss, argnums=2)`` is dL/dt), so ``jax.grad``,
    ``jax.jit``, ``jax.vmap``, Optax and grad-of-grad run through the
    hand-written rule. A building block for your own transformations: it runs
    at the matmul precision in force (JAX's ``jax_default_matmul_precision``).
    Batch it with ``jax.vmap(abc_loss, in_axes=(None, 0, 0))``.
    Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) needs
    ``abc_loss_jvp``: asking this one raises a TypeError that says so
    (``jax.hessian``, forward over reverse, works).
    """
    params, x, t = _sample_args(params, x, t)
    try:
        out = _abc_loss(params, x, t)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError("abc_loss has a hand-derived reverse rule (jax.custom_vjp), which JAX "
                        "cannot push tangents through: for jax.jvp, jax.jacfwd or "
                        "jax.linearize use abc_loss_jvp, its twin with the hand-derived "
                        "forward rule (jax.custom_jvp)") from None
    return _done(out, params, {"x": x, "t": t})


# --- a batch ----------------------------------------------------------------------


def _on_rows_devices(tree: Any, X: Any) -> Any:
    """``tree`` (params, tangents) replicated over the devices of X's rows where they are
    sharded over several: arrays on one device would clash with them in jit."""
    rows = X.X if type(X) is Batch else X
    if type(getattr(rows, "sharding", None)) is NamedSharding:
        return parallel.replicate_like(tree, rows)
    return tree


def _batch_args(params: Any, X: Any, precision: Any) -> tuple[Params, Any, str]:
    params, X = edge.params_input(params), edge.data_input(X)
    return _on_rows_devices(params, X), X, edge.check_precision(precision)


_batch_loss = _on_batch(model.batch_loss)


def batch_loss(params: Params, X: Any, *, precision: str | None = None) -> jax.Array:
    """sum_i r_i L(params, X[i], T[i]) / sum_i r_i for X (N, D) or a ``Batch``.

    Unit weights and no targets: the mean of ||w_i||^2, the homework's loss.
    A scalar; ``precision`` as in ``forward``.
    """
    params, X, precision = _batch_args(params, X, precision)
    return _done(_batch_loss(params, X, precision), params, {"X": X})


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def _batch_grad(params: Params, X: Any, chunk_size: int | None, precision: str) -> Params:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return backward.batch_grad(params, batch, chunk_size)


def batch_grad(params: Params, X: Any, *, chunk_size: int | str | None = "auto",
               precision: str | None = None) -> Params:
    """Gradient of ``batch_loss`` by the manual derivation.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      X: samples (N, D), or a ``Batch(X, weights, T)`` (e.g. from ``shard_batch``).
      chunk_size: accumulate over chunks of this many rows in one compiled loop,
        so memory does not grow with N (same result to rounding); None: the
        whole batch at once; "auto" (the default of every batch function and of
        training): cache-sized chunks on a CPU where they hold at least 1024 rows and N
        at least four of them, else the whole batch (``core.backward.rows_per_chunk``,
        measured by bench_step).
      precision: matmul precision, None for abc_jax's default ``"highest"``
        (exact float32 on every device); ``"default"`` lets a GPU use TF32.

    Returns:
      ``Params(gA, gB, gC)`` = (GY^T X, GZ^T X, GW^T Z) / sum(r): one contraction
      over N per parameter (gC in the Gram form where that is cheaper).
    """
    params, X, precision = _batch_args(params, X, precision)
    chunk_size = edge.check_chunk_size(chunk_size)
    return _done(_batch_grad(params, X, chunk_size, precision), params, {"X": X})


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def _batch_value_and_grad(params: Params, X: Any, chunk_size: int | None,
                          precision: str) -> tuple[jax.Array, Params]:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return backward.value_and_grad(params, batch, chunk_size)


def batch_value_and_grad(params: Params, X: Any, *, chunk_size: int | str | None = "auto",
                         precision: str | None = None) -> tuple[jax.Array, Params]:
    """``(loss (), Params of gradients)``: ``batch_loss`` and ``batch_grad`` in one pass.

    The direct form of the manual derivation; arguments as in ``batch_grad``.
    """
    params, X, precision = _batch_args(params, X, precision)
    chunk_size = edge.check_chunk_size(chunk_size)
    out = _batch_value_and_grad(params, X, chunk_size, precision)
    return _done(out, params, {"X": X})


_per_sample_grads = _on_batch(backward.per_sample_grads)


def per_sample_grads(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """r_i dL_i/d(A, B, C) for every row of X (N, D): A, B (N, H, D), C (N, O, H).

    ``vmap`` of ``manual_grad`` times the row weight r_i (1 for a plain X, 0
    for padding), so ``batch_grad`` is their sum over sum(r). O(N H D) memory.
    """
    params, X, precision = _batch_args(params, X, precision)
    return _done(_per_sample_grads(params, X, precision), params, {"X": X})


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def _predict(params: Params, X: Any, chunk_size: int | None, precision: str) -> jax.Array:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return model.outputs(params, batch.X, backward.rows_per_chunk(chunk_size, params, batch))


def predict(params: Params, X: Any, *, preprocessing: Preprocessing | None = None,
            chunk_size: int | str | None = "auto", precision: str | None = None) -> jax.Array:
    """The network's outputs W (n, O), W[i] = C (sigmoid(A X[i]) + B X[i]).

    X: (N, D), giving n = N rows; or a ``Batch``, giving its rows of non-zero
    weight only (n of them, in order): a batch from ``shard_batch`` gives its N
    real rows, not its padding. Which rows those are is read from the weights'
    values, so a ``Batch`` with weights needs an eager call (outside ``jit``).
    ``preprocessing``: the ``Preprocessing`` the params were trained with
    (``fit_preprocessing``): X is in the user's units, (N, D - k) for params of D
    inputs (k = 1 with a constant column), and W comes back in the targets' units
    (``undo_preprocessing(prep, C z')`` of the preprocessed rows); None: X as it is.
    ``chunk_size``: rows per step of a ``lax.map`` (memory O(chunk_size)), None
    for all at once; ``precision`` as in ``forward``.
    """
    params, X, precision = _batch_args(params, X, precision)
    chunk_size = edge.check_chunk_size(chunk_size)
    weights = X.weights if isinstance(X, Batch) else None
    if weights is not None and edge.is_traced(weights):
        raise TypeError("predict on a Batch with weights returns its rows of non-zero weight, "
                        "a count known only from the weights' values: call it outside "
                        "jax.jit, or pass batch.X for every row")
    if preprocessing is not None:
        X = _preprocessed(params, X, preprocessing)
    W = _done(_predict(params, X, chunk_size, precision), params, {"X": X})
    W = W if weights is None else W[np.asarray(weights) > 0]
    return W if preprocessing is None else undo_preprocessing(preprocessing, W)


def _preprocessed(params: Params, X: Any, prep: Any) -> Any:
    """X (N, D - k) or its ``Batch`` through ``apply_preprocessing`` (targets left out: predict
    does not read them), checked against the params' D inputs."""
    if not isinstance(prep, Preprocessing):
        raise TypeError("preprocessing must be an abc_jax.Preprocessing (fit_preprocessing, "
                        f"load_preprocessing) or None, got {type(prep).__name__}")
    D, d, k = params.A.shape[-1], prep.x_mean.shape[0], prep.constant.shape[0]
    if D != d + k:
        raise ValueError(f"preprocessing gives {d} + {k} columns (D = {d} scaled, {k} constant) "
                         f"and the params take D = {D}: pass the preprocessing these params were "
                         "trained with")
    if isinstance(X, Batch):
        return X._replace(X=apply_preprocessing(prep, X.X), T=None)
    return apply_preprocessing(prep, X)


# --- the references -----------------------------------------------------------------


_oracle_grad = _on_batch(oracles.oracle_grad)


def oracle_grad(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """``jax.grad(batch_loss)(params, X)``, jitted: the reference gradient, as ``Params``.

    X is (N, D) or a ``Batch``. ``precision`` None is ``"highest"``: exact float32
    arithmetic on a GPU too.
    """
    params, X, precision = _batch_args(params, X, precision)
    return _done(_oracle_grad(params, X, precision), params, {"X": X})


# Bound on floats touched per lax.map step: 2 * directions * N * (D + H + O).
_FD_WORK = 1 << 24


@functools.partial(jax.jit, static_argnames=("batch_size", "precision"))
def _fd_grad(params: Params, X: Any, eps: jax.Array, batch_size: int, precision: str) -> Params:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return oracles.fd_grad(params, batch, eps.astype(params.A.dtype), batch_size)


def fd_grad(params: Params, X: Any, eps: float | None = None, *,
            precision: str | None = None) -> Params:
    """Central finite differences of ``batch_loss``, one parameter at a time.

    dL/dp_j ~ (L(p + eps e_j) - L(p - eps e_j)) / (2 eps) for each of the P
    flattened parameters, in batches (``lax.map``), jitted: 2P evaluations of
    the batch loss on X (N, D) or a ``Batch``. Returns ``Params`` like params.

    ``eps`` defaults to ``finfo(dtype).eps ** (1/3)``, which balances the
    O(eps^2) truncation error against the O(machine eps / eps) rounding error
    (about 6e-6 in float64, 5e-3 in float32); it is data, not a constant of the
    compiled code. ``precision`` as in ``oracle_grad``.
    """
    params, X, precision = _batch_args(params, X, precision)
    dtype = edge.params(params).A.dtype
    eps = float(np.finfo(dtype).eps) ** (1 / 3) if eps is None else eps
    eps = edge.check_finite_float(eps, "eps", positive=True)
    (H, D), O = np.shape(params.A), np.shape(params.C)[0]
    N = np.shape(getattr(X, "X", X))[0]
    work = 2 * max(N, 1) * (D + H + O)
    batch_size = max(1, min(2 * H * D + O * H, _FD_WORK // work))
    out = _fd_grad(params, X, np.asarray(eps, dtype), batch_size, precision)
    return _done(out, params, {"X": X})


def grad_errors(grads: Params, reference: Params) -> dict[str, dict[str, float]]:
    """Per parameter: max |grads - reference| and that over max |reference|.

    Returns ``{"A": {"max_abs": ..., "rel": ...}, "B": ..., "C": ...}``; the
    relative error is the one the tests bound (1e-12 float64, 1e-5 float32).
    """
    out = {}
    for name, g, r in zip(Params._fields, grads, reference, strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        max_abs = float(np.max(np.abs(g - r)))
        scale = float(np.max(np.abs(r)))
        out[name] = {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs}
    return out


# --- forward mode -------------------------------------------------------------------


def _tangent_params(tangents: Params, params: Params) -> Params:
    """``tangents`` checked to have the params' shapes, cast to their dtype."""
    dparams = edge.params(tangents, "tangents")
    for name, a, p in zip("ABC", dparams, params, strict=True):
        if a.shape != p.shape:
            raise ValueError(f"tangents.{name} must have the shape of params.{name}, "
                             f"{p.shape}, got {a.shape}")
    return Params(*(edge.cast(a, params.A.dtype) for a in dparams))


@_precision
def _manual_jvp(params: Params, x: Any, dparams: Params, dx: Any, t: Any, dt: Any,
                precision: str) -> tuple[jax.Array, jax.Array]:
    params, x, t = edge.params_and_sample(params, x, t)
    D, O, dtype = x.shape[0], params.C.shape[0], x.dtype
    dparams = _tangent_params(dparams, params)
    dx = jnp.zeros_like(x) if dx is None else edge.sample(dx, D, dtype, "x_tangent")
    if dt is not None and t is None:
        raise ValueError("t_tangent needs t: it is the direction the target moves in")
    dt = edge.target(dt, O, dtype, "t_tangent")
    with jax.default_matmul_precision(precision):
        return tangents.jvp(params, x, dparams, dx, t, dt)


def manual_jvp(params: Params, x: Any, tangents: Params, x_tangent: Any = None, *,
               t: Any = None, t_tangent: Any = None,
               precision: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(L, dL), two scalars: the loss of one sample and its derivative along a tangent.

    x (D,); ``tangents`` = ``Params(dA (H, D), dB (H, D), dC (O, H))``, a
    direction; ``x_tangent`` dx (D,) or None for 0; t (O,) the target (None: 0) and
    ``t_tangent`` dt (O,) (None: 0). dL = <dL/d(A, B, C, x, t), (dA, dB, dC, dx, dt)>, as
    ``jax.jvp(loss, (params, x, t), (tangents, x_tangent, t_tangent))``.
    ``precision``: matmul precision, None for abc_jax's ``"highest"``.
    """
    params, x, t = _sample_args(params, x, t)
    dparams = edge.params_input(tangents, "tangents")
    dx = edge.optional_input(x_tangent, "x_tangent", "one tangent array of shape (D,)")
    dt = edge.optional_input(t_tangent, "t_tangent", "one tangent array of shape (O,)")
    out = _manual_jvp(params, x, dparams, dx, t, dt, edge.check_precision(precision))
    return _done(out, params, {"x": x, "tangents": dparams, "x_tangent": dx, "t": t,
                               "t_tangent": dt})


@_precision
def _batch_jvp(params: Params, X: Any, dparams: Params,
               precision: str) -> tuple[jax.Array, jax.Array]:
    params, batch = edge.params_and_batch(params, X)
    dparams = _tangent_params(dparams, params)
    with jax.default_matmul_precision(precision):
        return tangents.batch_jvp(params, batch, dparams)


def batch_jvp(params: Params, X: Any, tangents: Params, *,
              precision: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(batch_loss, its derivative along ``tangents``) for X (N, D) or a ``Batch``, by hand.

    Two scalars, for about twice the cost of a forward pass.
    """
    params, X, precision = _batch_args(params, X, precision)
    dparams = _on_rows_devices(edge.params_input(tangents, "tangents"), X)
    out = _batch_jvp(params, X, dparams, precision)
    return _done(out, params, {"X": X, "tangents": dparams})


def _on_tangents(core: Any) -> Any:
    """The compiled body of a public curvature product: the edge's shape checks of params,
    the batch and the tangents, then ``core(params, batch, V, chunk_size)`` at the requested
    matmul precision."""
    def body(params: Params, X: Any, dparams: Params, chunk_size: int | None,
             precision: str) -> Params:
        params, batch = edge.params_and_batch(params, X)
        dparams = _tangent_params(dparams, params)
        with jax.default_matmul_precision(precision):
            return core(params, batch, dparams, chunk_size)

    body.__name__ = body.__qualname__ = core.__name__
    return functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))(body)


_ggn_vp, _hvp = _on_tangents(curvature.ggn_vp), _on_tangents(curvature.hvp)


def _curvature_product(compiled: Any, params: Any, X: Any, tangents: Any, chunk_size: Any,
                       precision: Any) -> Params:
    params, X, precision = _batch_args(params, X, precision)
    dparams = _on_rows_devices(edge.params_input(tangents, "tangents"), X)
    chunk_size = edge.check_chunk_size(chunk_size)
    out = compiled(params, X, dparams, chunk_size, precision)
    return _done(out, params, {"X": X, "tangents": dparams})


def ggn_vp(params: Params, X: Any, tangents: Params, *, chunk_size: int | str | None = "auto",
           precision: str | None = None) -> Params:
    """G V: the Gauss-Newton matrix of ``batch_loss`` times the tangent V, by hand.

    G = (2 / sum r) sum_i r_i J_i^T J_i with J_i = dw_i / d(A, B, C), the Jacobian of row i's
    output: the Hessian of the loss with the network's own curvature dropped, positive
    semi-definite, independent of the targets. Computed as forward mode's tangent rows
    dw_i = J_i V followed by the backward pass's contraction over the batch with the
    cotangent 2 r_i dw_i (the derivation: ``abc_jax.core.curvature``), as
    ``jax.vjp(outputs, params)[1](2 r dW / sum r)`` with ``dW = jax.jvp(outputs, ...)``.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      X: samples (N, D), or a ``Batch(X, weights, T)``.
      tangents: V = ``Params(dA, dB, dC)`` of the params' shapes.
      chunk_size: rows per chunk, summed in one compiled loop (None: the whole batch).
      precision: matmul precision, None for abc_jax's default ``"highest"``.

    Returns:
      ``Params`` of the params' shapes.
    """
    return _curvature_product(_ggn_vp, params, X, tangents, chunk_size, precision)


def hvp(params: Params, X: Any, tangents: Params, *, chunk_size: int | str | None = "auto",
        precision: str | None = None) -> Params:
    """H V: the Hessian of ``batch_loss`` w.r.t. (A, B, C) times the tangent V, by hand.

    ``jax.jvp(jax.grad(batch_loss), (params,), (V,))``'s value: the derivative of the
    gradient along V, each line of the backward pass differentiated by the product rule.
    It is ``ggn_vp`` plus the terms that carry the residuals w_i - t_i (the sigmoid's second
    derivative, dC^T gw, gw dz^T; ``abc_jax.core.curvature``), so it equals ``ggn_vp`` at a
    zero-residual fit; it is not positive semi-definite in general. Arguments as in
    ``ggn_vp``.
    """
    return _curvature_product(_hvp, params, X, tangents, chunk_size, precision)


_jvp_grad = _on_batch(tangents.jvp_grad)


def jvp_grad(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """The gradient of batch_loss (``Params``) from P = 2HD + OH manual JVPs.

    Forward mode's way to a gradient: P directional derivatives along the basis
    tangents, vmapped (P^2 memory, like ``jax.jacfwd``). Equals ``batch_grad``
    to rounding.
    """
    params, X, precision = _batch_args(params, X, precision)
    return _done(_jvp_grad(params, X, precision), params, {"X": X})


@jax.jit
def _abc_loss_jvp(params: Params, x: Any, t: Any) -> jax.Array:
    params, x, t = edge.params_and_sample(params, x, t)
    return tangents.abc_loss_jvp(params, x, t)


def abc_loss_jvp(params: Params, x: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """L for one sample x (D,) (target t (O,), None: 0) as a ``jax.custom_jvp`` with
    ``manual_jvp``'s tangent rule.

    ``abc_loss``'s twin: ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``,
    ``jax.linearize`` use the hand-derived tangents (t's too); ``jax.grad``
    transposes them. Runs at the matmul precision in force, as ``abc_loss``.
    """
    params, x, t = _sample_args(params, x, t)
    return _done(_abc_loss_jvp(params, x, t), params, {"x": x, "t": t})


# --- per-sample gradient norms ----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def _per_sample_grad_norms(params: Params, X: Any, chunk_size: int | None,
                           precision: str) -> jax.Array:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return norms.per_sample_grad_norms(params, batch, chunk_size)


def per_sample_grad_norms(params: Params, X: Any, *, chunk_size: int | str | None = "auto",
                          precision: str | None = None) -> jax.Array:
    """(N, 3): row i's Frobenius norms ||r_i dL_i/dA||, ||r_i dL_i/dB||, ||r_i dL_i/dC||.

    Exact products of vector norms (||gy_i|| ||x_i||, ||gz_i|| ||x_i||, ||gw_i|| ||z_i||)
    from the rows the batch contraction forms: O(N (D + H + O)) memory, no per-sample
    matrices. The total norm of row i's gradient is ``sqrt(sum(norms[i] ** 2))``.
    X (N, D) or a ``Batch`` (weights and targets included); arguments as in ``batch_grad``.
    """
    params, X, precision = _batch_args(params, X, precision)
    chunk_size = edge.check_chunk_size(chunk_size)
    out = _per_sample_grad_norms(params, X, chunk_size, precision)
    return _done(out, params, {"X": X})


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def _clipped_batch_grad(params: Params, X: Any, clip_norm: jax.Array, chunk_size: int | None,
                        precision: str) -> Params:
    params, batch = edge.params_and_batch(params, X)
    with jax.default_matmul_precision(precision):
        return norms.clipped_batch_grad(params, batch, clip_norm.astype(params.A.dtype),
                                        chunk_size)


def clipped_batch_grad(params: Params, X: Any, clip_norm: float, *,
                       chunk_size: int | str | None = "auto",
                       precision: str | None = None) -> Params:
    """(1 / sum r) sum_i min(1, c / ||g_i||) g_i, g_i = r_i dL_i/d(A, B, C): DP-SGD's clipping.

    One pass: the clip factors come from ``per_sample_grad_norms``' rows and scale them
    (as row weights) before the three contractions. ``clip_norm`` c > 0 (inf: no
    clipping; traced under a caller's jit); arguments as in ``batch_grad``; with c larger
    than every norm it equals ``batch_grad``.
    """
    params, X, precision = _batch_args(params, X, precision)
    clip = clip_norm
    if not edge.is_traced(clip_norm):
        clip = np.inf if clip_norm == np.inf else edge.check_finite_float(
            clip_norm, "clip_norm", positive=True)
    chunk_size = edge.check_chunk_size(chunk_size)
    out = _clipped_batch_grad(params, X, jnp.asarray(clip), chunk_size, precision)
    return _done(out, params, {"X": X})
