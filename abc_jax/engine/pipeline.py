"""The host pipeline: M members through compiled chunks, evaluations and checkpoints.

Data flows one way::

    arguments -> edge (engine.arguments) -> TrainConfig -> Run (state, history)
      -> compiled chunks (engine.loop.run_chunk) -> at each evaluation: callbacks
      -> at each checkpoint: the file -> the result

Everything the host does between compiled chunks is a callback
``(epoch, params, metrics) -> dict | None`` with a cadence (``Plan.callbacks``):

- ``CHUNK``, after every compiled chunk: the divergence guard (``divergence_guard``:
  the epoch each member's loss stopped being finite; the compiled loop has frozen
  it at that epoch) and the progress bar (``progress``);
- ``EVALUATION``, every ``eval_every`` epochs, at epoch 0 and at the last epoch: the
  held-out loss (``held_out_loss``), early stopping (``EarlyStopping``) and the
  user's callbacks; their metrics are recorded, one (M,) value per evaluation;
- ``CHECKPOINT``, every ``checkpoint_every`` epochs, at the end of the run and on
  Ctrl-C: the checkpoint writer (``checkpoint_writer``).

``fit`` runs chunks of at most ``epochs_per_chunk`` epochs up to the next
evaluation or checkpoint. Any callback may return ``{"stop": (M,) bool}``; the run
ends at ``epochs`` or once every member has stopped (diverged, patience spent, or
asked to).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from abc_jax import checkpoint, parallel
from abc_jax.core.model import Batch, Params
from abc_jax.engine.config import TrainConfig
from abc_jax.engine.loop import State, member_losses, run_chunk

Callback = Callable[[int, Params, dict[str, Any]], "dict[str, Any] | None"]
STOP = "stop"  # the key of a callback's result that asks members to stop
CHUNK, EVALUATION, CHECKPOINT = "chunk", "evaluation", "checkpoint"  # callback cadences


@dataclasses.dataclass
class Run:
    """A run in progress: the device state and the host's record of it.

    ``losses``: chunks of (M, n) training losses; ``eval_epochs``: the epochs of
    the evaluations; ``metrics``: name -> list of (M,) values, one per
    evaluation (NaN for a member already stopped); ``best``: params of the
    lowest held-out loss so far (the initial params until one is measured),
    ``best_loss``/``best_epoch``/``since`` (M,): that loss, its epoch and the
    evaluations since; ``stopped_at`` (M,): the epoch a member stopped early, -1;
    ``diverged_at`` (M,): its first epoch with a non-finite loss, -1.
    """

    state: State
    epoch: int
    losses: list[np.ndarray]
    eval_epochs: list[int]
    metrics: dict[str, list[np.ndarray]]
    best: Params
    best_loss: np.ndarray
    best_epoch: np.ndarray
    since: np.ndarray
    stopped_at: np.ndarray
    diverged_at: np.ndarray

    @classmethod
    def start(cls, state: State) -> Run:
        M = state.bad.shape[0]
        return cls(state, 0, [], [], {}, state.params, np.full(M, np.inf), np.zeros(M, int),
                   np.zeros(M, int), np.full(M, -1), np.full(M, -1))

    def done(self) -> np.ndarray:
        """(M,) bool: members that run no more."""
        return np.asarray(self.state.bad) | np.asarray(self.state.stopped)

    def stop(self, members: np.ndarray) -> None:
        """Freeze ``members`` (M,) bool from the next epoch on."""
        new = members & ~self.done()
        if new.any():
            self.stopped_at = np.where(new, self.epoch, self.stopped_at)
            self.state = self.state._replace(stopped=self.state.stopped | jnp.asarray(new))

    def loss_table(self) -> np.ndarray:
        """(M, epochs run) training losses."""
        M = self.best_loss.shape[0]
        return np.concatenate([np.zeros((M, 0)), *self.losses], axis=1)

    # --- a checkpoint: the state, the best params and the history as arrays ---------

    def saved(self) -> tuple[Any, ...]:
        return tuple(self.state), self.best

    def history(self) -> dict[str, np.ndarray]:
        out = {"eval_epochs": np.asarray(self.eval_epochs, np.int64),
               "best_loss": self.best_loss, "best_epoch": self.best_epoch, "since": self.since,
               "stopped_at": self.stopped_at}
        M = self.best_loss.shape[0]
        return out | {f"metric_{k}": np.stack(v, axis=1) if v else np.zeros((M, 0))
                      for k, v in self.metrics.items()}

    def restore(self, stored: Any, epoch: int, losses: np.ndarray,
                history: dict[str, np.ndarray]) -> None:
        state, self.best = stored
        self.state, self.epoch, self.losses = State(*state), epoch, [losses]
        self.eval_epochs = history["eval_epochs"].tolist()
        self.best_loss, self.best_epoch = history["best_loss"], history["best_epoch"]
        self.since, self.stopped_at = history["since"], history["stopped_at"]
        self.metrics = {k[7:]: list(v.T) for k, v in history.items() if k.startswith("metric_")}
        self.diverged_at = np.where(np.asarray(self.state.bad), first_nonfinite(losses), -1)


def first_nonfinite(losses: np.ndarray) -> np.ndarray:
    """(M,) the first column of ``losses`` (M, n) that is not finite; n if none."""
    return np.argmax(np.pad(~np.isfinite(losses), ((0, 0), (0, 1)), constant_values=True),
                     axis=1)


# --- the built-in callbacks ------------------------------------------------------------


def divergence_guard(run: Run) -> Callback:
    """A CHUNK callback: records ``run.diverged_at`` for the members whose loss stopped
    being finite in the chunk (the compiled loop froze each at that epoch, keeping its
    last finite params in ``state.last_good``), and asks that they stop."""
    def guard(epoch: int, params: Params, metrics: dict[str, Any]) -> dict[str, Any]:
        new = np.asarray(run.state.bad) & (run.diverged_at < 0)
        if new.any():
            chunk = run.losses[-1]
            run.diverged_at = np.where(new, epoch - chunk.shape[1] + first_nonfinite(chunk),
                                       run.diverged_at)
        return {STOP: new}

    return guard


def progress(bar: Any) -> Callback:
    """A CHUNK callback: moves the tqdm ``bar`` to the epoch, showing the lowest loss."""
    def show(epoch: int, params: Params, metrics: dict[str, Any]) -> None:
        bar.update(epoch - bar.n)
        if np.isfinite(metrics["loss"]).any():
            bar.set_postfix(loss=f"{np.nanmin(metrics['loss']):.6g}")

    return show


def checkpoint_writer(run: Run, directory: str | os.PathLike[str] | None,
                      settings: dict[str, Any] | None) -> Callback:
    """A CHECKPOINT callback: writes the run (state, best params, history) under
    ``directory`` in process 0; nothing if ``directory`` is None."""
    def save(epoch: int, params: Params, metrics: dict[str, Any]) -> None:
        if directory is not None and parallel.is_main_process():
            checkpoint.save_checkpoint(directory, state=run.saved(), epoch=run.epoch,
                                       losses=run.loss_table(), settings=settings,
                                       extra=run.history())

    return save


def held_out_loss(batch: Batch, axes: Batch, precision: str) -> Callback:
    """A callback giving ``{"eval_loss": (M,)}``: each member's loss on held-out data."""
    def evaluate(epoch: int, params: Params, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"eval_loss": np.asarray(member_losses(params, batch, batch_axes=axes,
                                                      precision=precision))}

    return evaluate


@dataclasses.dataclass
class EarlyStopping:
    """Track each member's best held-out loss and stop it after ``patience`` evaluations
    without a new best (the first of equal losses counts). Acts on the ``Run`` directly:
    it keeps the best params, which the result returns when patience is set."""

    run: Run
    patience: int | None

    def __call__(self, epoch: int, params: Params, metrics: dict[str, Any]) -> dict[str, Any]:
        loss, r = np.asarray(metrics["eval_loss"]), self.run
        better = (loss < r.best_loss) & ~r.done()
        r.best = jax.tree.map(lambda b, p: jnp.where(_expand(better, p), p, b), r.best, params)
        r.best_loss = np.where(better, loss, r.best_loss)
        r.best_epoch = np.where(better, epoch, r.best_epoch)
        r.since = np.where(better, 0, r.since + ~r.done())
        if self.patience is None:
            return {}
        return {STOP: r.since >= self.patience}


def _expand(mask: np.ndarray, like: jax.Array) -> jax.Array:
    return jnp.asarray(mask).reshape(mask.shape + (1,) * (like.ndim - 1))


def evaluate(run: Run, callbacks: Sequence[Callback], record: bool = True) -> None:
    """Call every callback at ``run.epoch`` in order, each seeing the metrics so far
    (``loss``: each member's last training loss, NaN once stopped); stop who asks to;
    with ``record`` (evaluations), keep the metrics and the epoch."""
    M = run.best_loss.shape[0]
    last = run.losses[-1][:, -1] if run.epoch else np.full(M, np.nan)
    done = run.done()
    metrics: dict[str, Any] = {"loss": np.where(done & (run.epoch > 0), np.nan, last)}
    stop = np.zeros(M, bool)
    for callback in callbacks:
        out = callback(run.epoch, run.state.params, dict(metrics)) or {}
        if not isinstance(out, dict):
            raise TypeError(f"a callback must return a dict of metrics or None, got "
                            f"{type(out).__name__} from {callback!r}")
        stop |= np.broadcast_to(np.asarray(out.pop(STOP, False), bool), (M,))
        metrics |= {k: np.broadcast_to(np.asarray(v, np.float64), (M,)) for k, v in out.items()}
    if record:
        for k, v in metrics.items():
            if k != "loss":
                run.metrics.setdefault(k, []).append(np.where(done, np.nan, v))
        run.eval_epochs.append(run.epoch)
    run.stop(stop)


# --- the loop ----------------------------------------------------------------------


def progress_bar(progress: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal or in a notebook, in process 0; none in a redirected log."""
    ipython = sys.modules.get("IPython")  # a notebook: IPython's kernel shell is running
    notebook = type(ipython and ipython.get_ipython()).__name__ == "ZMQInteractiveShell"
    shown = progress and parallel.is_main_process() and (sys.stderr.isatty() or notebook)
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", leave=False,
                disable=not shown)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``fit`` needs besides the run: the data, the schedule and where to save."""

    batch: Batch
    axes: Batch
    keys: Any
    config: TrainConfig
    n_rows: int
    epochs: int
    callbacks: Sequence[tuple[str, Callback]]  # (cadence, callback); with a member axis:
    # (epoch, params (M, ...), {k: (M,)})
    checkpoint_dir: str | os.PathLike[str] | None = None
    settings: dict[str, Any] | None = None
    privacy: Any = None  # engine.privacy.PrivacyArrays, each (M,), with config.privacy

    def at(self, cadence: str) -> list[Callback]:
        return [fn for when, fn in self.callbacks if when == cadence]


def fit(run: Run, plan: Plan) -> Run:
    """Train until ``plan.epochs`` or until every member has stopped, calling each
    callback at its cadence (module docstring).

    On Ctrl-C the CHECKPOINT callbacks run for the last finished chunk before the
    KeyboardInterrupt goes on, so the same call resumes from there.
    """
    config, static = plan.config, plan.config.static(plan.n_rows)
    evaluations = plan.at(EVALUATION)
    if evaluations and not run.eval_epochs:
        evaluate(run, evaluations)  # epoch 0: the initial params
    saved_at = run.epoch
    try:
        while run.epoch < plan.epochs and not run.done().all():
            stop = config.boundary(run.epoch, plan.epochs)
            while run.epoch < stop and not run.done().all():
                # Ctrl-C waits for the chunk to end (it would anyway: the host blocks on
                # its losses), so the state, its losses and its epoch change together.
                with parallel.interrupts_held():
                    state, chunk = run_chunk(run.state, plan.batch, plan.keys,
                                             np.int32(run.epoch), np.int32(stop),
                                             batch_axes=plan.axes, privacy=plan.privacy,
                                             **static)
                    n = min(config.epochs_per_chunk, stop - run.epoch)
                    run.losses.append(np.asarray(chunk)[:, :n])
                    run.state, run.epoch = state, run.epoch + n
                if parallel.interrupted():  # a Ctrl-C that Python dropped (parallel.run_job)
                    raise KeyboardInterrupt
                evaluate(run, plan.at(CHUNK), record=False)
            if evaluations and (run.epoch % config.eval_every == 0 or run.epoch == plan.epochs):
                evaluate(run, evaluations)
            if run.epoch % config.checkpoint_every == 0:
                with parallel.interrupts_held():  # a checkpoint is written whole, once
                    evaluate(run, plan.at(CHECKPOINT), record=False)
                    saved_at = run.epoch
    except KeyboardInterrupt:
        if run.epoch != saved_at:
            evaluate(run, plan.at(CHECKPOINT), record=False)
        raise
    if run.epoch != saved_at or run.epoch == 0:
        evaluate(run, plan.at(CHECKPOINT), record=False)
    return run


def resume(run: Run, plan: Plan) -> Run:
    """``run`` continued from the checkpoint in ``plan.checkpoint_dir``, if there is one
    (another run's is refused: ``checkpoint.restore``)."""
    if plan.checkpoint_dir is None:
        return run
    found = checkpoint.restore(plan.checkpoint_dir, like=run.saved(), settings=plan.settings,
                               epochs=plan.epochs)
    if found is not None:
        stored, epoch, losses, history = found
        run.restore(parallel.replicate_like(strong(stored), plan.batch.X), epoch, losses,
                    history)
    return run


@jax.jit
def strong(tree: Any) -> Any:
    """Leaves as committed, strongly typed arrays, as the compiled chunk returns them, so
    the first chunk sees the input types of every later one and compiles once."""
    return jax.tree.map(lambda a: jnp.array(a, dtype=a.dtype), tree)
