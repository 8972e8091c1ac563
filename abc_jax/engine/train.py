"""The public training functions: one front end, M members; ``train`` is M = 1.

Every function goes through ``fit``: the arguments checked once (``engine.arguments``,
the step's own constructor), the members' state stacked, the run resumed from its
checkpoint if any and handed to the pipeline (``engine.pipeline.fit``). ``train_many``
returns every member; ``train`` is one member with everything shared, and raises
``DivergenceError``; ``train_per_sample`` is one member per row; ``cross_validate``
(``engine.validation``) one member per fold.

The training method is a ``Step`` (``engine.steps``): ``step=`` takes one built by
its constructors; ``lr``, ``optimizer``, ``grad``, ``batch_size``, ``chunk_size`` and
``privacy`` are the short form that builds it (``make_step``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import checkpoint, edge, parallel
from abc_jax.core import backward
from abc_jax.core.model import Batch, Params
from abc_jax.engine import arguments, loop, pipeline, steps
from abc_jax.engine import privacy as dp
from abc_jax.engine.loop import State
from abc_jax.engine.steps import Step, gradient_step, minibatches

EVERY = 100  # the default epochs per chunk and between checkpoints


class TrainResult(NamedTuple):
    """What ``train`` returns: the params on the device, the histories (losses,
    evaluations, epochs) as NumPy arrays, where the host read them during the run."""

    params: Params  # A (H, D), B (H, D), C (O, H); train_per_sample: leading N axis
    losses: np.ndarray  # (E,) losses[e] before update e (E < epochs after an early stop);
    # train_per_sample: (N, epochs); in the params' dtype
    eval_losses: np.ndarray | None = None  # (k,) held-out loss at eval_epochs; no eval_data: None
    eval_epochs: np.ndarray | None = None  # (k,) int, epochs done when each was measured
    best_epoch: int | None = None  # the eval epoch of the lowest held-out loss
    metrics: dict[str, np.ndarray] | None = None  # callbacks' metrics, each (c,) at metric_epochs
    epsilon: float | None = None  # privacy=DPSGD(...): epsilon spent at delta; else None
    delta: float | None = None  # the delta of epsilon (the given one, else 1 / n)
    sampling_rate: float | None = None  # q, each row's probability to be in a step
    metric_epochs: np.ndarray | None = None  # (c,) the epochs the callbacks ran at


class TrainManyResult(NamedTuple):
    """What ``train_many`` returns; M members, E epochs, k evaluations, c callback calls.
    The params on the device, the rest as NumPy arrays (as ``TrainResult``)."""

    params: Params  # A (M, H, D), ...: each member's last (finite) params, its best with patience
    losses: np.ndarray  # (M, E): losses[m, e] before update e; NaN once a member stopped
    diverged: np.ndarray  # (M,) bool
    diverged_at: np.ndarray  # (M,) int: the first epoch with a non-finite loss, -1 if none
    eval_losses: np.ndarray | None = None  # (M, k) held-out losses, NaN where none was made
    eval_epochs: np.ndarray | None = None  # (k,)
    best_epoch: np.ndarray | None = None  # (M,) the eval epoch of each member's lowest
    stopped_at: np.ndarray | None = None  # (M,) the epoch patience or a callback stopped it, -1
    metrics: dict[str, np.ndarray] | None = None  # callbacks' metrics, each (M, c)
    epsilon: np.ndarray | None = None  # (M,) privacy=DPSGD(...): epsilon spent at delta
    delta: np.ndarray | None = None  # (M,) the delta of epsilon (given, else 1 / n)
    sampling_rate: float | None = None  # q, each row's probability to be in a step
    metric_epochs: np.ndarray | None = None  # (c,) the epochs the callbacks ran at


class DivergenceError(RuntimeError):
    """The loss became NaN or inf.

    ``.result``: for ``train``, the ``TrainResult`` of the params at the start of the last
    epoch with a finite loss and the losses before the first non-finite one; for
    ``train_per_sample`` and ``cross_validate``, every member's result. ``.epoch``: the
    first non-finite epoch; ``.lr``: the run's (None with an optimizer); ``.members`` and
    ``.epochs``: the members (samples, folds) that diverged and their epochs;
    ``.column_scales``: (min, max) of the inputs' column standard deviations where they
    differ by more than 100x or lie far from 1 (standardise first), else None.
    """

    def __init__(self, message: str, result: Any, epoch: int, lr: Any,
                 members: Sequence[int] = (0,), epochs: Sequence[int] | None = None,
                 column_scales: tuple[float, float] | None = None):
        super().__init__(message)
        self.result, self.epoch, self.lr = result, epoch, lr
        self.members = list(members)
        self.epochs = [epoch] if epochs is None else list(epochs)
        self.column_scales = column_scales

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the extra arguments
        return type(self), (str(self), self.result, self.epoch, self.lr, self.members,
                            self.epochs, self.column_scales)


# --- the step of the short form --------------------------------------------------------


def make_step(step: Step | None = None, *, optimizer: Any = None, lr: Any = None,
              grad: str = "manual", batch_size: int | None = None,
              chunk_size: int | str | None = "auto", privacy: dp.DPSGD | None = None) -> Step:
    """``step``, or the step the short form's arguments describe::

        gradient_step(optimizer, lr=lr, grad=grad, chunk_size=chunk_size)
        private(privacy, optimizer, lr=lr, chunk_size=chunk_size)         with privacy
        minibatches(that step, batch_size)                                with batch_size
    """
    if step is not None:
        if not isinstance(step, Step):
            raise TypeError(f"step must be an abc_jax Step (gradient_step(...), "
                            f"minibatches(...), private(...)), got {type(step).__name__}")
        given = [n for n, v in (("optimizer", optimizer), ("lr", lr), ("batch_size", batch_size),
                                ("privacy", privacy)) if v is not None]
        given += ["grad"] if grad != "manual" else []
        given += ["chunk_size"] if chunk_size != "auto" else []
        if given:
            raise ValueError(f"step and {', '.join(given)} contradict: the step carries its "
                             "method; build it with them (e.g. minibatches(gradient_step("
                             "optax.adam(1e-3)), 32)) or drop step")
        return step
    if privacy is not None:
        if grad != "manual":
            raise ValueError(f"grad: privacy clips the manual per-row gradients, so grad must "
                             f"be 'manual', got {grad!r}")
        step = dp.private(privacy, optimizer, lr=lr, chunk_size=chunk_size)
    else:
        step = gradient_step(optimizer, lr=lr, grad=grad, chunk_size=chunk_size)
    return step if batch_size is None else minibatches(step, batch_size)


# --- the one front end --------------------------------------------------------------------


class Run(NamedTuple):
    """A finished (or stopped) run, what the result builders read."""

    record: pipeline.Record
    final: loop.Final  # the result params and best epochs, read off the state at the end
    step: Step
    params: Params  # the initial params (one member's, or stacked)
    batch: Batch
    held: bool
    patience: int | None
    dtype: Any


def _callbacks(callbacks: Any, one: bool) -> tuple[Callable[..., Any], ...]:
    callbacks = tuple(callbacks or ())
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be functions (epoch, params, metrics) -> dict or "
                            f"None, got {type(cb).__name__}")
    return tuple(_one_member(cb) for cb in callbacks) if one else callbacks


def _one_member(callback: Any) -> Any:
    """A user's callback for ``train``: params and metrics without the member axis."""
    def call(epoch: int, params: Params, metrics: dict[str, Any]) -> Any:
        return callback(epoch, jax.tree.map(lambda a: a[0], params),
                        {k: float(v[0]) for k, v in metrics.items()})

    return call


def _checkpoint_dir(path: Any) -> Any:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"checkpoint_dir must be a folder (it is created if missing), got "
                         f"{str(path)!r}, an existing file")
    return path


def _settings(params: Params, batch: Batch, held: Any, state: State, step: Step, keys: Any,
              rows: int, schedule: pipeline.Schedule) -> dict[str, Any]:
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
        "M": int(state.bad.shape[0]), "N": rows, "D": params.A.shape[-1],
        "H": params.A.shape[-2], "O": params.C.shape[-2], "dtype": str(params.A.dtype),
        **dict(step.settings), "hyper": {k: arguments.jsonable(v) for k, v in step.hyper.items()
                                          if k != "lr"},  # lr: in the rule's settings
        "key": None if keys is None else np.asarray(keys).tolist(),
        "opt_state": str(jax.tree.structure(state.opt_state)),
        "data_shapes": [None if a is None else list(a.shape) for a in batch],
        "data_fingerprint": prints(batch),
        "params_fingerprint": [v for p in params for v in checkpoint.fingerprint(
            p.reshape(-1, p.shape[-1]))],
        "evaluation": None if held is None else {
            "every": schedule.eval_every, "patience": schedule.patience,
            "fingerprint": prints(held)},
    }


def _data(params: Any, X: Any, eval_data: Any, one: bool) -> tuple[Any, ...]:
    """(params, batch, its member axes, held-out batch, its axes, {argument: M}) checked
    against each other: ``one`` member (every argument shared; rows may be sharded), or each
    argument shared or with a leading member axis."""
    sizes: dict[str, int] = {}
    if one:
        params = edge.params(edge.params_input(params))
        D, O, dtype = params.A.shape[1], params.C.shape[0], params.A.dtype
        batch = edge.batch(edge.data_input(X), D, O, dtype)
        axes = Batch(None, None, None)
    else:
        params, m_params = arguments.member_params(params)
        D, O, dtype = params.A.shape[-1], params.C.shape[-2], params.A.dtype
        batch, axes, sizes = arguments.member_data(X, D, O, dtype)
        arguments.not_sharded(batch)
        sizes |= {} if m_params is None else {"params": m_params}
    held, held_axes = None, None
    if eval_data is not None:
        if one:
            held = edge.batch(edge.data_input(eval_data, "eval_data"), D, O, dtype, "eval_data")
            held, held_axes = parallel.replicate_like(held, batch.X), Batch(None, None, None)
        else:
            held, held_axes, held_sizes = arguments.member_data(eval_data, D, O, dtype,
                                                                "eval_data")
            sizes |= held_sizes
        if (held.T is None) != (batch.T is None):
            has, lacks = ("the training batch", "eval_data") if held.T is None else \
                ("eval_data", "the training batch")
            raise ValueError(f"eval_data: {has} has targets T and {lacks} has none, so the "
                             "held-out loss would score other outputs than training does: give "
                             "both targets (Batch(X, T=T)) or neither")
    return params, batch, axes, held, held_axes, sizes


def fit(params: Any, X: Any, *, step: Step, epochs: int, key: Any, members: Any,
        progress: bool, checkpoint_dir: Any, epochs_per_chunk: int, precision: Any,
        mesh: Any, eval_data: Any, patience: Any, eval_every: int, checkpoint_every: int,
        callbacks: Any, one: bool, desc: str) -> Run:
    """The one front end: check every argument, build the state, resume, train.

    ``one``: ``train``'s case, one member and every argument shared (rows may be sharded
    over devices and processes); else ``train_many``'s, each argument shared or with a
    leading member axis.
    """
    if edge.is_traced(params, X, key, eval_data):
        raise TypeError(f"{desc.split()[0]} runs its own compiled loop: call it outside "
                        "jax.jit/vmap/grad")
    schedule = pipeline.Schedule(
        edge.check_int(epochs, "epochs", minimum=0),
        *(edge.check_positive_int(v, n) for v, n in (
            (epochs_per_chunk, "epochs_per_chunk"), (eval_every, "eval_every"),
            (checkpoint_every, "checkpoint_every"))),
        edge.check_positive_int(patience, "patience", allow_none=True),
        edge.check_precision(precision))
    stacked_keys = arguments.key_members(key)
    if key is not None and (one or stacked_keys is None):
        key = edge.check_key(key)
    arguments.check_together(key, step.draws, patience, eval_data)
    callbacks = _callbacks(callbacks, one)
    checkpoint_dir = _checkpoint_dir(checkpoint_dir)
    params, batch, axes, held, held_axes, sizes = _data(params, X, eval_data, one)
    sizes |= {} if stacked_keys is None or one else {"key": stacked_keys}
    if one:
        per_member = steps.members(step)
        if per_member:
            raise ValueError(f"train takes one value of each hyperparameter (arrays (M,) are "
                             f"for train_many), got {per_member}")
        M = 1
    else:
        M = arguments.count_members(sizes | steps.members(step), members)
        mesh = arguments.check_mesh(mesh, M)
        if jax.process_count() > 1:
            raise ValueError("train_many runs in one process: call it in each with its own "
                             "members (rows over processes: train)")
    rows = arguments.rows_per_member(batch) if step.counts_rows else 0
    keys = None if key is None else key[None] if one else arguments.member_keys(key, M)
    hyper = {k: np.asarray(v) for k, v in step.hyper.items()}
    best = schedule.patience is not None
    plan = pipeline.Plan(
        arguments.on_devices(mesh, batch, axes), axes,
        arguments.on_devices(mesh, held, held_axes), held_axes,
        parallel.replicate_like(arguments.on_devices(mesh, keys), batch.X), step.epoch, rows,
        schedule, callbacks, checkpoint_dir, None,
        lambda s: loop.final(s, best=best).params)
    final = None
    if mesh is None and pipeline.one_program(plan):  # nothing for the host till the end
        rec, final, ok = pipeline.fit_whole(plan, params, hyper, step.init, M, one,
                                            arguments.values_ok)
        if not ok:
            arguments.explain_values(params, batch, held)
    else:
        check = arguments.values_pending(params, batch, held)  # raised with the 1st losses
        state = loop.start_state(params, hyper, init=step.init, M=M)
        if checkpoint_dir is not None or jax.process_count() > 1:  # before any collective
            settings = _settings(params, batch, held, state, step, keys, rows, schedule)
            parallel.check_same_on_all_processes(
                settings | {"epochs": schedule.epochs, "checkpoint": checkpoint_dir is not None},
                desc)
            plan = plan._replace(settings=settings)
        state = arguments.on_devices(mesh, parallel.replicate_like(state, batch.X))
        plan = plan._replace(check=check)
        rec = pipeline.resume(pipeline.Record.start(state, M), plan)
        rec = rec._replace(state=arguments.on_devices(mesh, rec.state))
    if final is None:
        with pipeline.progress_bar(progress, schedule.epochs, rec.epoch, desc) as bar:
            rec = pipeline.fit(rec, plan, pipeline.show(bar))
        final = loop.final(rec.state, best=best, one=one)
    return Run(rec, final, step, params, batch, held is not None, schedule.patience,
               params.A.dtype)


def _report(run: Run, one: bool) -> dict[str, Any]:
    """The step's own result fields (privacy's epsilon, delta and q) for each member's
    epochs with a finite loss; floats for ``one`` member."""
    if run.step.report is None:
        return {}
    M = run.record.reached.shape[0]
    rows = np.broadcast_to(arguments.row_counts(run.batch), (M,))
    out = run.step.report(run.record.reached, rows)
    return {k: float(v[0]) if one and np.ndim(v) else v for k, v in out.items()}


def _evaluations(rec: pipeline.Record) -> tuple[np.ndarray, np.ndarray]:
    """(epochs (k,) where any member was evaluated, losses (M, k), NaN where not)."""
    cols = np.flatnonzero(rec.evaluated.any(axis=0))
    return cols, np.where(rec.evaluated[:, cols], rec.evals[:, cols], np.nan)


def many_result(run: Run, epochs: int) -> TrainManyResult:
    """The run's members: params (a diverged member's last finite; the best with patience),
    losses NaN-padded to ``epochs``, where members diverged or stopped."""
    rec, dtype = run.record, run.dtype
    L = np.pad(rec.losses, ((0, 0), (0, epochs - rec.losses.shape[1])),
               constant_values=np.nan)
    out = TrainManyResult(
        run.final.params, L.astype(dtype), rec.bad.copy(), rec.diverged_at(),
        stopped_at=rec.stopped_at(), metrics=rec.metrics or None,
        metric_epochs=rec.metric_epochs if len(rec.metric_epochs) else None,
        **_report(run, one=False))
    if not run.held:
        return out
    at, held = _evaluations(rec)
    return out._replace(eval_losses=held.astype(dtype), eval_epochs=at,
                        best_epoch=np.asarray(run.final.best_epoch))


def one_result(run: Run) -> TrainResult:
    """Member 0 as ``train``'s result: its losses up to where it stopped (and the
    non-finite one where it diverged), its evaluations."""
    rec, dtype = run.record, run.dtype
    bad = bool(rec.bad[0])
    losses = rec.losses[0, :rec.reached[0] + bad].astype(dtype)
    params = run.final.params
    metrics = {k: v[0] for k, v in rec.metrics.items()} or None
    result = TrainResult(params, losses, metrics=metrics,
                         metric_epochs=rec.metric_epochs if len(rec.metric_epochs) else None,
                         **_report(run, one=True))
    if not run.held:
        return result
    made = np.flatnonzero(rec.evaluated[0])
    return result._replace(eval_losses=rec.evals[0, made].astype(dtype), eval_epochs=made,
                           best_epoch=int(np.asarray(run.final.best_epoch)[0]))


@jax.jit
def _finite_at(params: Params, batch: Batch) -> jax.Array:
    return edge.all_finite(backward.value_and_grad(params, batch))


def column_scales(batch: Batch) -> tuple[float, float] | None:
    """(min, max) of the standard deviations of X's columns over the rows of non-zero
    weight, where they differ by more than 100x or the largest is outside [0.01, 100]; None
    where the scales are unremarkable."""
    if not getattr(batch.X, "is_fully_addressable", True):  # rows over processes: not here
        return None
    X = np.asarray(batch.X, np.float64)
    if batch.weights is not None:
        X = X[np.asarray(batch.weights) > 0]
    scale = X.std(axis=0) if len(X) else np.zeros(0)
    scale = scale[np.isfinite(scale) & (scale > 0)]
    if not len(scale) or (scale.max() / scale.min() <= 100 and 0.01 <= scale.max() <= 100):
        return None
    return float(scale.min()), float(scale.max())


def _raise_diverged(run: Run, lr: Any) -> None:
    """Raise DivergenceError at the first non-finite loss (FloatingPointError at the start)."""
    result = one_result(run)
    L = np.asarray(result.losses)
    e = len(L) - 1
    if e <= 1 and not bool(_finite_at(run.params, run.batch)):  # an overflow, no divergence
        try:
            edge.raise_overflow(run.params, run.batch.X, "X", "the loss or its gradient")
        except FloatingPointError as err:
            raise FloatingPointError(f"at the initial parameters, before any update: {err}. "
                                     "No learning rate fixes this") from None
    holds = (f"the params and losses up to epoch {e - 1}, the last finite one" if e else
             "the initial params: no epoch had a finite loss")
    custom = lr is None
    advice = ("lower the optimizer's own learning rate (e.g. optax.adam(1e-3) -> "
              "optax.adam(1e-4))" if custom else f"try a smaller learning rate, e.g. "
              f"lr={lr / 10:g}")
    scales = column_scales(run.batch)
    if scales is not None:
        advice = (f"the columns of X have scales from {scales[0]:.3g} to {scales[1]:.3g}: "
                  "standardise them first (fit_preprocessing(..., standardize=True) on the "
                  f"training rows, then apply_preprocessing), or {advice}")
    raise DivergenceError(
        f"training diverged: the loss is {L[e]} at epoch {e}{'' if custom else f' (lr={lr:g})'};"
        f" {advice}. The error's .result holds {holds}",
        result._replace(losses=result.losses[:e]), e, lr, column_scales=scales)


# --- the public functions ---------------------------------------------------------------


def train(params: Params, X: Any, *, lr: float | None = None, epochs: int,
          optimizer: Any = None, grad: str = "manual", batch_size: int | None = None,
          key: jax.Array | None = None, chunk_size: int | str | None = "auto",
          progress: bool = True,
          checkpoint_dir: str | os.PathLike[str] | None = None,
          epochs_per_chunk: int = EVERY, precision: str | None = None,
          eval_data: Any = None, patience: int | None = None, eval_every: int = 1,
          checkpoint_every: int = EVERY, callbacks: Sequence[Any] = (),
          privacy: dp.DPSGD | None = None, step: Step | None = None) -> TrainResult:
    """Minimise ``batch_loss(params, X)`` with a training step, one epoch at a time.

    params: ``Params(A (H, D), B (H, D), C (O, H))``, whose dtype the result and X take.
    X: samples (N, D) or a ``Batch`` (row weights, targets T (N, O) or (N,) for O = 1;
    from ``shard_batch`` or, with every process calling alike, ``shard_local_batch``).
    step: the training method (``gradient_step``, ``minibatches``, ``private``, ...); or its
    short form: lr (the hand-rolled rule p <- p - lr g, without ``optimizer``), optimizer
    (an ``optax.GradientTransformation``; ``GradientTransformationExtraArgs`` such as
    ``optax.lbfgs()`` also get value, grad and value_fn), grad ("manual" or "oracle"),
    batch_size (shuffled mini-batches, needs ``key``), chunk_size (rows per step of the
    gradient's contraction; "auto": from the shapes and the backend, as ``batch_grad``;
    None: all rows at once), privacy (``DPSGD(...)``: DP-SGD from ``key``, its cost in
    ``result.epsilon``, ``.delta``, ``.sampling_rate``). epochs >= 0.
    eval_data: held-out X (N', D) or ``Batch`` (with targets exactly when X has them): its
    loss at epoch 0, every ``eval_every`` epochs and at the end, computed in the compiled
    loop. patience: the number of evaluations (epochs, with the default eval_every=1) in a
    row without a new lowest held-out loss after which training stops, returning the
    params of the lowest.
    epochs_per_chunk: epochs per compiled call; between them the host calls ``callbacks``
    ``(epoch, params, metrics) -> dict | None`` (metrics "loss", the last epoch's, and
    "eval_loss", the last evaluation's; a returned dict adds metrics to
    ``result.metrics`` at ``result.metric_epochs``; ``{"stop": True}`` ends the run).
    checkpoint_dir: process 0 writes ``checkpoint.npz`` every ``checkpoint_every`` epochs, at
    the end and on Ctrl-C; a later call continues from it; one of another run is refused,
    naming each setting that differs. precision: matmul precision (None: "highest").

    Returns ``TrainResult(params, losses, eval_losses, eval_epochs, best_epoch, metrics,
    ...)``: losses (E,), losses[e] the batch loss before update e (mini-batches: the mean
    of epoch e's batch losses weighted by their rows' weights), E = epochs unless stopped.

    Raises DivergenceError (a non-finite loss; names the epoch and the knob to turn),
    FloatingPointError (the loss or gradient overflows at the initial params: no lr helps),
    ValueError or TypeError (a bad argument, before any tracing; a checkpoint of another run).
    """
    step = make_step(step, optimizer=optimizer, lr=lr, grad=grad, batch_size=batch_size,
                     chunk_size=chunk_size, privacy=privacy)
    run = fit(params, X, step=step, epochs=epochs, key=key, members=None, progress=progress,
              checkpoint_dir=checkpoint_dir, epochs_per_chunk=epochs_per_chunk,
              precision=precision, mesh=None, eval_data=eval_data, patience=patience,
              eval_every=eval_every, checkpoint_every=checkpoint_every, callbacks=callbacks,
              one=True, desc="train")
    if bool(run.record.bad[0]):
        _raise_diverged(run, None if lr is None else float(lr))
    return one_result(run)


def train_many(params: Params, X: Any, *, lr: Any = None, epochs: int, optimizer: Any = None,
               grad: str = "manual", batch_size: int | None = None, key: Any = None,
               members: int | None = None, chunk_size: int | str | None = "auto",
               progress: bool = True, checkpoint_dir: str | os.PathLike[str] | None = None,
               epochs_per_chunk: int = EVERY, precision: str | None = None,
               mesh: Any = None, eval_data: Any = None, patience: int | None = None,
               eval_every: int = 1, checkpoint_every: int = EVERY,
               callbacks: Sequence[Any] = (), privacy: dp.DPSGD | None = None,
               step: Step | None = None) -> TrainManyResult:
    """Train M members in one compiled loop; member m is ``train`` on its own arguments.

    Each array argument is shared or carries a leading member axis M:
    params ``Params`` A (M, H, D), B (M, H, D), C (M, O, H) (e.g. one ``init_params`` per
    seed, stacked) or (H, D), (H, D), (O, H); X (N, D) or (M, N, D), or a ``Batch`` whose
    X, weights ((N,) or (M, N)) and T ((N, O) or (M, N, O)) are each shared or per member;
    eval_data likewise. Hyperparameters are a number or an array (M,): lr (the hand-rolled
    rule), an ``optax.inject_hyperparams`` optimizer's hyperparameters (e.g.
    ``optax.inject_hyperparams(optax.adam)(learning_rate=rates)``, rates (M,)), DPSGD's
    clip_norm and noise_multiplier. key: one key (member m: ``fold_in(key, m)``) or keys
    (M,). members: M, needed only when no argument carries it. mesh: a ``data_mesh()``
    whose devices split the members evenly (the same results as on one device), None: one
    device; rows are not split over devices or processes here (that is ``train``'s).
    The rest as in ``train``; patience and callbacks act per member: callbacks get params
    (M, ...) and metrics (M,) and may return (M,) values or ``{"stop": mask (M,)}``.

    Returns ``TrainManyResult``: a member whose loss became NaN/inf at epoch e is frozen
    there (its params those before epoch e - 1's update, as ``DivergenceError.result``),
    a member whose patience ran out (or a callback stopped) at epoch e likewise, keeping
    its best params; losses NaN after. A loss that overflows at the initial params is a
    divergence at epoch 0 here (``train`` raises FloatingPointError).
    """
    step = make_step(step, optimizer=optimizer, lr=lr, grad=grad, batch_size=batch_size,
                     chunk_size=chunk_size, privacy=privacy)
    run = fit(params, X, step=step, epochs=epochs, key=key, members=members, progress=progress,
              checkpoint_dir=checkpoint_dir, epochs_per_chunk=epochs_per_chunk,
              precision=precision, mesh=mesh, eval_data=eval_data, patience=patience,
              eval_every=eval_every, checkpoint_every=checkpoint_every, callbacks=callbacks,
              one=False, desc="train_many")
    return many_result(run, epochs)


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
    lr = arguments.per_member(lr, "lr")
    if isinstance(lr, tuple):
        raise ValueError("lr: train_per_sample takes one rate for every copy (a number)")
    p = edge.params(edge.params_input(params))
    batch = edge.batch(edge.data_input(X), p.A.shape[1], p.C.shape[0], p.A.dtype)
    arguments.check_values(p, batch)
    keep = slice(None) if batch.weights is None else np.asarray(batch.weights) > 0
    rows = Batch(jnp.asarray(batch.X)[keep], None, None if batch.T is None else batch.T[keep])
    per_row = Batch(*(None if a is None else a[:, None] for a in rows))  # member i: row i
    M = rows.X.shape[0]
    run = fit(p, per_row, step=gradient_step(lr=lr), epochs=epochs, key=None, members=M,
              progress=progress, checkpoint_dir=None, epochs_per_chunk=epochs_per_chunk,
              precision=precision, mesh=None, eval_data=None, patience=None, eval_every=1,
              checkpoint_every=EVERY, callbacks=(), one=False,
              desc=f"train_per_sample ({M} rows)")
    r = many_result(run, epochs)
    at = np.asarray(r.diverged_at)
    if (at >= 0).any():
        e = int(at[at >= 0].min())
        i = int(np.flatnonzero(at == e)[0])
        if e <= 1 and not bool(_finite_at(p, rows)):
            edge.raise_overflow(p, rows.X, "X", "at the initial parameters, before any "
                                "update, a sample's loss or gradient")
        raise DivergenceError(
            f"training diverged: sample {i}'s loss is {r.losses[i, e]} at epoch {e} "
            f"(lr={lr:g}); {int((at >= 0).sum())} of {len(at)} copies diverged; try a smaller "
            f"learning rate, e.g. lr={lr / 10:g}. The error's .result holds every copy's last "
            "finite params and all losses, NaN from a copy's divergence on",
            TrainResult(r.params, r.losses), e, lr, np.flatnonzero(at >= 0).tolist(),
            at[at >= 0].tolist())
    return TrainResult(r.params, r.losses)
