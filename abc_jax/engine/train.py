"""The public training functions: one engine, M members; ``train`` is M = 1.

``train_many`` checks its arguments once (``engine.arguments``), builds a
``TrainConfig``, stacks the members' state and hands it to the pipeline
(``engine.pipeline.fit``). ``train`` is that with one member and everything
shared, and returns the member alone; ``train_per_sample`` is one member per
row; ``cross_validate`` is one member per fold, whose row weights mask its
held-out fold.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import checkpoint, edge, parallel
from abc_jax.core import backward
from abc_jax.core.model import Batch, Params
from abc_jax.core.update import GDState
from abc_jax.engine import arguments, pipeline
from abc_jax.engine import privacy as dp
from abc_jax.engine.config import EVERY, TrainConfig
from abc_jax.engine.loop import State
from abc_jax.engine.pipeline import CHECKPOINT, CHUNK, EVALUATION, Plan, Run, strong


class TrainResult(NamedTuple):
    """What ``train`` returns."""

    params: Params  # A (H, D), B (H, D), C (O, H); train_per_sample: leading N axis
    losses: jax.Array  # (epochs,) (fewer after an early stop); train_per_sample: (N, epochs)
    eval_losses: jax.Array | None = None  # (k,) held-out loss at eval_epochs; no eval_data: None
    eval_epochs: jax.Array | None = None  # (k,) int, epochs done when each was measured
    best_epoch: int | None = None  # the eval epoch of the lowest held-out loss
    metrics: dict[str, np.ndarray] | None = None  # callbacks' metrics, each (k,) at eval_epochs
    epsilon: float | None = None  # privacy=DPSGD(...): epsilon spent at delta; else None
    delta: float | None = None  # the delta of epsilon (the given one, else 1 / n)
    sampling_rate: float | None = None  # q, each row's probability to be in a step


class TrainManyResult(NamedTuple):
    """What ``train_many`` returns; M members, E epochs, k evaluations."""

    params: Params  # A (M, H, D), ...: each member's last (finite) params, its best with patience
    losses: jax.Array  # (M, E): losses[m, e] before update e; NaN once a member stopped
    diverged: jax.Array  # (M,) bool
    diverged_at: jax.Array  # (M,) int: the first epoch with a non-finite loss, -1 if none
    eval_losses: jax.Array | None = None  # (M, k) held-out losses, NaN after a member stopped
    eval_epochs: jax.Array | None = None  # (k,)
    best_epoch: jax.Array | None = None  # (M,) the eval epoch of each member's lowest
    stopped_at: jax.Array | None = None  # (M,) the epoch patience or a callback stopped it, -1
    metrics: dict[str, np.ndarray] | None = None  # callbacks' metrics, each (M, k)
    epsilon: np.ndarray | None = None  # (M,) privacy=DPSGD(...): epsilon spent at delta
    delta: np.ndarray | None = None  # (M,) the delta of epsilon (given, else 1 / n)
    sampling_rate: float | None = None  # q, each row's probability to be in a step


class DivergenceError(RuntimeError):
    """The loss became NaN or inf.

    ``.result``: the ``TrainResult`` of params at the start of the last epoch
    with a finite loss and the losses before the first non-finite one;
    ``.epoch``: that first epoch; ``.lr``: the run's (None with an optimizer).
    """

    def __init__(self, message: str, result: TrainResult, epoch: int, lr: float | None):
        super().__init__(message)
        self.result, self.epoch, self.lr = result, epoch, lr

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the extra arguments
        return type(self), (str(self), self.result, self.epoch, self.lr)


# --- building a run -------------------------------------------------------------------


def _checkpoint_dir(path: Any) -> Any:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"checkpoint_dir must be a folder (it is created if missing), got "
                         f"{str(path)!r}, an existing file")
    return path


def _callbacks(callbacks: Any) -> tuple[Any, ...]:
    callbacks = tuple(callbacks or ())
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be functions (epoch, params, metrics) -> dict or "
                            f"None, got {type(cb).__name__}")
    return callbacks


def _initial_state(optimizer: Any, params: Params, lr: Any, M: int) -> State:
    """The loop's carry before epoch 0 for every member: stacked params and optimizer state.

    An ``optax.inject_hyperparams`` hyperparameter given as an array (M,) is one
    value per member.
    """
    P = Params(*(jnp.broadcast_to(a, (M, *a.shape[-2:])) for a in params))
    if optimizer is None:
        opt = GDState(jnp.broadcast_to(jnp.asarray(lr, params.A.dtype), (M,)))
    else:
        opt = jax.vmap(optimizer.init)(P)
        hyper = getattr(opt, "hyperparams", None)
        if isinstance(hyper, dict):  # (M,) given: init broadcast it to (M, M); member m's is [m, m]
            opt = opt._replace(hyperparams={
                k: jnp.diagonal(v) if jnp.ndim(v) == 2 and v.shape == (M, M) else v
                for k, v in hyper.items()})
    return strong(State(P, opt, P, np.zeros((M,), bool), np.zeros((M,), bool)))


def _settings(params: Params, batch: Batch, held: Any, state: State, lr: Any,
              config: TrainConfig, keys: Any, n_rows: int) -> dict[str, Any]:
    """What identifies a run, for its checkpoint and the processes' agreement. Speed knobs
    (chunk_size, precision, epochs_per_chunk, devices, processes) may change across a resume
    and are left out."""
    if keys is not None and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)

    def prints(b: Batch) -> list[float]:
        r = b.weights
        return [v for a in b if a is not None for v in checkpoint.fingerprint(
            a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a[:, None],
            r.reshape(-1) if r is not None and a.shape[:-1] == r.shape and a is not r
            else None)]

    return {
        "M": int(state.bad.shape[0]), "N": n_rows, "D": params.A.shape[-1],
        "H": params.A.shape[-2], "O": params.C.shape[-2], "dtype": str(params.A.dtype),
        "lr": None if lr is None else np.asarray(lr).tolist(), "grad": config.grad,
        "batch_size": config.batch_size, "key": None if keys is None else
        np.asarray(keys).tolist(),
        "optimizer": "gradient_descent" if config.optimizer is None else "optax",
        "opt_state": str(jax.tree.structure(state.opt_state)),
        "data_shapes": [None if a is None else list(a.shape) for a in batch],
        "data_fingerprint": prints(batch),
        "params_fingerprint": [v for p in params for v in checkpoint.fingerprint(
            p.reshape(-1, p.shape[-1]))],
        "evaluation": None if held is None else {
            "every": config.eval_every, "patience": config.patience,
            "fingerprint": prints(held[0])},
    } | ({} if config.privacy is None else {"privacy": config.privacy.settings()})


def _launch(params: Params, lr: Any, batch: Batch, axes: Batch, keys: Any, config: TrainConfig,
            epochs: int, M: int, held: Any, callbacks: Sequence[Any],
            checkpoint_dir: Any, progress: bool, desc: str, mesh: Any = None) -> Run:
    """Build the state, resume, fit: the run every function shares (values checked)."""
    n_rows = arguments.rows_per_member(batch) if config.batch_size else 0
    state = _initial_state(config.optimizer, params, lr, M)
    settings = None
    if checkpoint_dir is not None or jax.process_count() > 1:  # before any collective
        settings = _settings(params, batch, held, state, lr, config, keys, n_rows)
        parallel.check_same_on_all_processes(
            settings | {"epochs": epochs, "checkpoint": checkpoint_dir is not None}, desc)
    state = parallel.replicate_like(state, batch.X)
    run = Run.start(state)
    private = None if config.privacy is None else parallel.replicate_like(
        arguments.on_devices(mesh, config.privacy.arrays(M, params.A.dtype)), batch.X)
    plan = Plan(arguments.on_devices(mesh, batch, axes), axes,
                parallel.replicate_like(arguments.on_devices(mesh, keys), batch.X), config,
                n_rows, epochs, (), checkpoint_dir, settings, private)
    run = pipeline.resume(run, plan)
    run.state = arguments.on_devices(mesh, run.state)
    with pipeline.progress_bar(progress, epochs, run.epoch, desc) as bar:
        held_out = [] if held is None else [
            (EVALUATION, pipeline.held_out_loss(*arguments.on_devices(mesh, held, held[1]),
                                                config.precision)),
            (EVALUATION, pipeline.EarlyStopping(run, config.patience))]
        plan = dataclasses.replace(plan, callbacks=[
            (CHUNK, pipeline.divergence_guard(run)), (CHUNK, pipeline.progress(bar)),
            *held_out, *[(EVALUATION, cb) for cb in callbacks],
            (CHECKPOINT, pipeline.checkpoint_writer(run, checkpoint_dir, settings))])
        return pipeline.fit(run, plan)


def _spent(run: Run, config: TrainConfig, batch: Batch, one: bool = False) -> dict[str, Any]:
    """The private run's cost, as result fields: epsilon (M,) at delta (M,) for each
    member's epochs with a finite loss (``engine.privacy.spent``), and q; floats for
    ``one`` member (``train``). {} if not private."""
    if config.privacy is None:
        return {}
    M = run.best_loss.shape[0]
    rows = np.broadcast_to(arguments.row_counts(batch), (M,))
    eps, delta = dp.spent(config.privacy, dp.is_finite_count(run.loss_table()), rows)
    if one:
        eps, delta = float(eps[0]), float(delta[0])
    return {"epsilon": eps, "delta": delta, "sampling_rate": config.privacy.sampling_rate}


def _check_values(params: Params, batch: Batch, held: Any) -> None:
    """Training always checks its inputs' values: a named ValueError for a NaN/inf entry
    or bad weights, in the training batch or the held-out one."""
    arguments.check_values(params, batch)
    if held is not None:
        arguments.check_values(params, held[0], "eval_data")


def _held(eval_data: Any, batch: Batch, D: int, O: int, dtype: Any,
          many: bool) -> tuple[Batch, Batch] | None:
    """Held-out data checked like the training batch (with targets if and only if it has
    them), as (Batch, member axes)."""
    if eval_data is None:
        return None
    if many:
        held, axes, _ = arguments.member_data(eval_data, D, O, dtype, "eval_data")
    else:
        held = edge.batch(edge.data_input(eval_data, "eval_data"), D, O, dtype, "eval_data")
        held, axes = parallel.replicate_like(held, batch.X), Batch(None, None, None)
    if (held.T is None) != (batch.T is None):
        has, lacks = ("the training batch", "eval_data") if held.T is None else \
            ("eval_data", "the training batch")
        raise ValueError(f"eval_data: {has} has targets T and {lacks} has none, so the "
                         "held-out loss would score other outputs than training does: give both "
                         "targets (Batch(X, T=T)) or neither")
    return held, axes


# --- the public functions ---------------------------------------------------------------


def train(params: Params, X: Any, *, lr: float | None = None, epochs: int,
          optimizer: Any = None, grad: str = "manual", batch_size: int | None = None,
          key: jax.Array | None = None, chunk_size: int | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike[str] | None = None,
          epochs_per_chunk: int = EVERY, precision: str | None = None,
          eval_data: Any = None, patience: int | None = None, eval_every: int = EVERY,
          checkpoint_every: int = EVERY, callbacks: Sequence[Any] = (),
          privacy: dp.DPSGD | None = None) -> TrainResult:
    """Minimise ``batch_loss(params, X)``: per epoch (u, s) = optimizer.update(g, s, p), p += u.

    params: ``Params(A (H, D), B (H, D), C (O, H))``, whose dtype the result and X take.
    X: samples (N, D) or a ``Batch`` (row weights, targets T (N, O) or (N,) for O = 1;
    from ``shard_batch`` or, with every process calling alike, ``shard_local_batch``).
    lr: the rate of the hand-rolled rule p <- p - lr g (data: every lr shares one
    compilation); give it without ``optimizer`` only: an ``optax.GradientTransformation``
    carries its own rate (``GradientTransformationExtraArgs`` such as ``optax.lbfgs()``
    also get value, grad and value_fn). epochs >= 0. The other knobs are ``TrainConfig``'s:
    grad, batch_size (needs ``key``; mini-batches shuffled with ``fold_in(key, epoch)``),
    chunk_size (as in ``batch_grad``: None is the whole batch), precision,
    epochs_per_chunk, eval_every, checkpoint_every, patience.
    checkpoint_dir: process 0 writes ``checkpoint.npz`` every ``checkpoint_every`` epochs and
    at the end (and on Ctrl-C); a later call continues from it; one of another run is
    refused, naming each setting that differs.
    eval_data: held-out X (N', D) or ``Batch`` (with targets exactly when X has them): its
    loss at epoch 0, every ``eval_every`` epochs and at the end. patience: stop once that
    many evaluations in a row did not lower it, and return the params of the lowest.
    callbacks: functions ``(epoch, params, metrics) -> dict | None`` called at every
    evaluation, after the held-out loss; metrics holds "loss" (the last epoch's) and
    "eval_loss"; a returned dict adds metrics (numbers) to ``result.metrics``, and
    ``{"stop": True}`` ends the run there.
    privacy: ``DPSGD(...)``: DP-SGD from ``key`` (``abc_jax.engine.privacy``), its cost in
    ``result.epsilon``, ``.delta``, ``.sampling_rate``; needs ``pip install -e ".[privacy]"``.

    Returns ``TrainResult(params, losses, eval_losses, eval_epochs, best_epoch, metrics)``:
    losses (epochs,) (fewer after an early stop), losses[e] the batch loss before update e
    (mini-batches: the mean of epoch e's batch losses weighted by their rows' weights).

    Raises DivergenceError (a non-finite loss; names the epoch and the knob to turn),
    FloatingPointError (the loss or gradient overflows at the initial params: no lr helps),
    ValueError or TypeError (a bad argument, before any tracing; a checkpoint of another run).
    """
    if edge.is_traced(params, X, key, eval_data):
        raise TypeError("train runs its own compiled loop: call it outside jax.jit/vmap/grad")
    config = TrainConfig(optimizer, grad, batch_size, chunk_size, precision, epochs_per_chunk,
                         eval_every, checkpoint_every, patience, privacy)
    epochs = edge.check_int(epochs, "epochs", minimum=0)
    lr, _ = arguments.member_lr(lr, optimizer, many=False)
    keys = None if key is None else edge.check_key(key)[None]
    dp.check_members(privacy, key, many=False)
    arguments.check_together(key, batch_size, privacy, patience, eval_data)
    user = [_one_member(cb) for cb in _callbacks(callbacks)]
    params = edge.params(edge.params_input(params))
    D, O, dtype = params.A.shape[1], params.C.shape[0], params.A.dtype
    batch = edge.batch(edge.data_input(X), D, O, dtype)
    held = _held(eval_data, batch, D, O, dtype, many=False)
    _check_values(params, batch, held)
    run = _launch(params, lr, batch, Batch(None, None, None), keys, config, epochs, 1, held,
                  user, _checkpoint_dir(checkpoint_dir), progress, "train")
    result = _member(run, 0, held is not None, config.patience, dtype)._replace(
        **_spent(run, config, batch, one=True))
    if bool(run.state.bad[0]):
        _diverged(result, run, params, batch, lr, config.optimizer is not None)
    return result


def _one_member(callback: Any) -> Any:
    """A user's callback for ``train``: params and metrics without the member axis."""
    def call(epoch: int, params: Params, metrics: dict[str, Any]) -> Any:
        return callback(epoch, jax.tree.map(lambda a: a[0], params),
                        {k: float(v[0]) for k, v in metrics.items()})

    return call


def _member(run: Run, m: int, held: bool, patience: Any, dtype: Any) -> TrainResult:
    """Member m of a run as ``train``'s result: its losses up to where the run ended."""
    params = jax.tree.map(lambda a: a[m], run.best if patience is not None else run.state.params)
    losses = jnp.asarray(run.loss_table()[m].astype(dtype))
    epochs = jnp.asarray(run.eval_epochs, jnp.int32) if run.eval_epochs else None
    metrics = {k: np.stack(v)[:, m] for k, v in run.metrics.items() if k != "eval_loss"}
    if not held:
        return TrainResult(params, losses, metrics=metrics or None, eval_epochs=epochs)
    return TrainResult(params, losses, jnp.asarray(np.stack(run.metrics["eval_loss"])[:, m],
                                                   dtype), epochs, int(run.best_epoch[m]),
                       metrics or None)


@jax.jit
def _finite_at(params: Params, batch: Batch) -> jax.Array:
    return edge.all_finite(backward.value_and_grad(params, batch))


def _diverged(result: TrainResult, run: Run, params: Params, batch: Batch, lr: Any,
              custom: bool) -> None:
    """Raise DivergenceError at the first non-finite loss (FloatingPointError at the start)."""
    L = np.asarray(result.losses)
    e = int(np.argmax(~np.isfinite(L)))
    if e <= 1 and not bool(_finite_at(params, batch)):  # an overflow, not a divergence
        try:
            edge.raise_overflow(params, batch.X, "X", "the loss or its gradient")
        except FloatingPointError as err:
            raise FloatingPointError(f"at the initial parameters, before any update: {err}. "
                                     "No learning rate fixes this") from None
    holds = (f"the params and losses up to epoch {e - 1}, the last finite one" if e else
             "the initial params: no epoch had a finite loss")
    advice = ("lower the optimizer's own learning rate (e.g. optax.adam(1e-3) -> "
              "optax.adam(1e-4))" if custom else
              f"try a smaller learning rate, e.g. lr={lr / 10:g}")
    raise DivergenceError(
        f"training diverged: the loss is {L[e]} at epoch {e}{'' if custom else f' (lr={lr:g})'};"
        f" {advice}. The error's .result holds {holds}",
        result._replace(params=jax.tree.map(lambda a: a[0], run.state.last_good),
                        losses=result.losses[:e]), e, lr)


def train_many(params: Params, X: Any, *, lr: Any = None, epochs: int, optimizer: Any = None,
               grad: str = "manual", batch_size: int | None = None, key: Any = None,
               members: int | None = None, chunk_size: int | None = None,
               progress: bool = True, checkpoint_dir: str | os.PathLike[str] | None = None,
               epochs_per_chunk: int = EVERY, precision: str | None = None,
               mesh: Any = None, eval_data: Any = None, patience: int | None = None,
               eval_every: int = EVERY, checkpoint_every: int = EVERY,
               callbacks: Sequence[Any] = (),
               privacy: dp.DPSGD | None = None) -> TrainManyResult:
    """Train M members in one compiled loop; member m is ``train`` on its own arguments.

    Each array argument is shared or carries a leading member axis M:
    params ``Params`` A (M, H, D), B (M, H, D), C (M, O, H) (e.g. one ``init_params`` per
    seed, stacked) or (H, D), (H, D), (O, H); X (N, D) or (M, N, D), or a ``Batch`` whose
    X, weights ((N,) or (M, N)) and T ((N, O) or (M, N, O)) are each shared or per member;
    eval_data likewise. lr: a number or (M,), for the hand-rolled rule (with ``optimizer``
    the rate is the optimizer's: one per member with ``optax.inject_hyperparams(
    optax.adam)(learning_rate=rates)``, rates (M,)). key: one key (member m:
    ``fold_in(key, m)``) or keys (M,). members: M, needed only when no argument carries it.
    mesh: a ``data_mesh()`` whose devices split the members evenly (the same results as
    on one device), None: one device. The rest as in ``train``; patience and callbacks act
    per member: callbacks get params (M, ...) and metrics (M,) and may return (M,) values
    or ``{"stop": mask (M,)}``. With batch_size every member needs the same count of
    non-zero weights. privacy: a ``DPSGD``, its clip_norm and noise_multiplier maybe (M,).

    Returns ``TrainManyResult``: a member whose loss became NaN/inf at epoch e is frozen
    there (its params those before epoch e - 1's update, as ``DivergenceError.result``),
    a member whose patience ran out (or a callback stopped) at epoch e likewise, keeping
    its best params; losses NaN after. A loss that overflows at the initial params is a
    divergence at epoch 0 here (``train`` raises FloatingPointError).
    """
    if edge.is_traced(params, X, lr, key, eval_data):
        raise TypeError("train_many runs its own compiled loop: call it outside jax.jit/vmap")
    config = TrainConfig(optimizer, grad, batch_size, chunk_size, precision, epochs_per_chunk,
                         eval_every, checkpoint_every, patience, privacy)
    epochs = edge.check_int(epochs, "epochs", minimum=0)
    if key is not None and arguments.key_members(key) is None:
        edge.check_key(key)
    private_sizes = dp.check_members(privacy, key, many=True)
    arguments.check_together(key, batch_size, privacy, patience, eval_data)
    callbacks = _callbacks(callbacks)
    params, m_params = arguments.member_params(params)
    (D, O), dtype = (params.A.shape[-1], params.C.shape[-2]), params.A.dtype
    batch, axes, sizes = arguments.member_data(X, D, O, dtype)
    arguments.not_sharded(batch)
    held = _held(eval_data, batch, D, O, dtype, many=True)
    lr, m_lr = arguments.member_lr(lr, optimizer, many=True)
    sizes |= {k: v for k, v in (("params", m_params), ("lr", m_lr),
                                ("key", arguments.key_members(key))) if v is not None}
    sizes |= private_sizes
    if held is not None:
        sizes |= {f"eval_data{'.' + f if f != 'X' else ''}": np.shape(a)[0]
                  for f, a, ax in zip(arguments.FIELDS, held[0], held[1], strict=True)
                  if ax == 0}
    M = arguments.count_members(sizes, members)
    mesh = arguments.check_mesh(mesh, M)
    _check_values(params, batch, held)
    if jax.process_count() > 1:
        raise ValueError("train_many runs in one process: call it in each with its own members")
    run = _launch(params, lr, batch, axes, arguments.member_keys(key, M), config, epochs, M,
                  held, callbacks, _checkpoint_dir(checkpoint_dir), progress,
                  f"train_many ({M} members)", mesh)
    return _many(run, epochs, held is not None, config.patience, dtype)._replace(
        **_spent(run, config, batch))


def _many(run: Run, epochs: int, held: bool, patience: Any, dtype: Any) -> TrainManyResult:
    """The run's members: params (a diverged member's last finite; the best with patience),
    losses NaN-padded to ``epochs``, where members diverged or stopped."""
    L = run.loss_table()
    L = np.pad(L, ((0, 0), (0, epochs - L.shape[1])), constant_values=np.nan)
    bad, at = np.asarray(run.state.bad), run.diverged_at
    frozen = jnp.asarray(bad)
    params = jax.tree.map(lambda g, p: jnp.where(frozen[:, None, None], g, p),
                          run.state.last_good, run.state.params)
    if patience is not None:
        params = run.best
    stopped = np.where(bad, -1, run.stopped_at)
    metrics = {k: np.stack(v, axis=1) for k, v in run.metrics.items() if k != "eval_loss"}
    out = TrainManyResult(params, jnp.asarray(L, dtype), frozen, jnp.asarray(at),
                          stopped_at=jnp.asarray(stopped), metrics=metrics or None,
                          eval_epochs=jnp.asarray(run.eval_epochs, jnp.int32)
                          if run.eval_epochs else None)
    if not held:
        return out
    return out._replace(eval_losses=jnp.asarray(np.stack(run.metrics["eval_loss"], axis=1),
                                                dtype),
                        best_epoch=jnp.asarray(run.best_epoch))


def train_per_sample(params: Params, X: Any, *, lr: float, epochs: int, progress: bool = True,
                     epochs_per_chunk: int = EVERY,
                     precision: str | None = None) -> TrainResult:
    """The homework's first experiment: one copy of the params trained on each sample.

    Copy i follows p <- p - lr * dL(p, X[i])/dp for ``epochs`` epochs, exactly
    ``train(params, X[i:i+1], lr=lr, epochs=epochs)``: ``train_many`` with one member per
    row. The homework then averaged the matrices::

        jax.tree.map(lambda p: p.mean(0), result.params)

    ``params`` is the common start; X (N, D) or a ``Batch`` (rows of weight 0 are dropped;
    copy i learns its row's target T[i]); the other arguments as in ``train``.

    Returns ``TrainResult`` with params A (N, H, D), B (N, H, D), C (N, O, H) and
    losses (N, epochs): losses[i, e] = L(p_i,e, X[i]), before update e.

    Raises DivergenceError: a copy's loss became NaN or inf; names the sample that
    diverged first. Every other copy has run all epochs: ``.result`` holds every copy's
    last finite params and all losses, NaN/inf from a copy's divergence on.
    """
    if edge.is_traced(params, X):
        raise TypeError("train_per_sample runs its own compiled loop: call it outside jax.jit")
    config = TrainConfig(epochs_per_chunk=epochs_per_chunk, precision=precision)
    epochs = edge.check_int(epochs, "epochs", minimum=0)
    lr, _ = arguments.member_lr(lr, None, many=False)  # one lr for every copy
    params = edge.params(edge.params_input(params))
    batch = edge.batch(edge.data_input(X), params.A.shape[1], params.C.shape[0],
                       params.A.dtype)
    arguments.check_values(params, batch)
    keep = slice(None) if batch.weights is None else np.asarray(batch.weights) > 0
    rows = Batch(jnp.asarray(batch.X)[keep], None, None if batch.T is None else batch.T[keep])
    per_row = Batch(*(None if a is None else a[:, None] for a in rows))  # member i: row i
    M = rows.X.shape[0]
    run = _launch(params, lr, per_row, Batch(0, None, None if rows.T is None else 0), None,
                  config, epochs, M, None, (), None, progress, f"train_per_sample ({M} rows)")
    r = _many(run, epochs, False, None, params.A.dtype)
    at = np.asarray(r.diverged_at)
    if (at >= 0).any():
        e = int(at[at >= 0].min())
        i = int(np.flatnonzero(at == e)[0])
        if e <= 1 and not bool(_finite_at(params, rows)):
            edge.raise_overflow(params, rows.X, "X", "at the initial parameters, before any "
                                "update, a sample's loss or gradient")
        raise DivergenceError(
            f"training diverged: sample {i}'s loss is {r.losses[i, e]} at epoch {e} "
            f"(lr={lr:g}); {int((at >= 0).sum())} of {len(at)} copies diverged; try a smaller "
            f"learning rate, e.g. lr={lr / 10:g}. The error's .result holds every copy's last "
            "finite params and all losses, NaN from a copy's divergence on",
            TrainResult(r.params, r.losses), e, lr)
    return TrainResult(r.params, r.losses)


def cross_validate(params: Params, X: Any, *, folds: int = 5, **train_kw: Any) -> dict[str, Any]:
    """k-fold cross-validation in one compiled loop: fold i is a member of ``train_many``.

    The rows of X (N, D) or a ``Batch`` (rows of weight 0 take no part) are cut into
    ``folds`` contiguous folds of near-equal size, in order (shuffle X first if its order
    means something), as scikit-learn's ``KFold``. Member i trains on every fold but i
    (its row weights are 0 on fold i) and is evaluated on fold i (``eval_data`` the same
    rows, weights 0 elsewhere): exactly ``train`` with those weights. ``train_kw`` as in
    ``train_many`` (lr, epochs, optimizer, patience, eval_every, ...; not eval_data).

    Returns a dict: "held_out_loss" (k,) each fold's held-out loss (at its best
    evaluation with patience, else at the end), "mean" and "std" of it (std with
    ddof=1, as a spread over folds), "fold" (N,) each row's fold (-1: weight 0), and
    "result", the ``TrainManyResult``.
    """
    if "eval_data" in train_kw:
        raise TypeError("cross_validate makes each fold's held-out data itself: no eval_data")
    k = edge.check_int(folds, "folds", minimum=2)
    p = edge.params(edge.params_input(params))
    batch = edge.batch(edge.data_input(X), p.A.shape[1], p.C.shape[0], p.A.dtype)
    r = np.ones(batch.X.shape[0]) if batch.weights is None else np.asarray(batch.weights)
    rows = np.flatnonzero(r > 0)
    if len(rows) < k:
        raise ValueError(f"folds = {k} needs at least {k} rows of non-zero weight, got "
                         f"{len(rows)}")
    fold = np.full(len(r), -1)
    for i, part in enumerate(np.array_split(rows, k)):
        fold[part] = i
    mask = fold[None, :] == np.arange(k)[:, None]  # (k, N): row in fold i
    train_w, eval_w = jnp.asarray(r * ~mask, p.A.dtype), jnp.asarray(r * mask, p.A.dtype)
    result = train_many(p, Batch(batch.X, train_w, batch.T), members=k,
                        eval_data=Batch(batch.X, eval_w, batch.T), **train_kw)
    L = np.asarray(result.eval_losses)
    if train_kw.get("patience") is not None:
        held = np.nanmin(L, axis=1)
    else:
        held = L[:, -1]
    return {"held_out_loss": held, "mean": float(np.mean(held)),
            "std": float(np.std(held, ddof=1)), "fold": fold, "result": result}
