"""The host side of a run: compiled chunks, and between them callbacks, checkpoints, a bar.

Data flows one way::

    Plan (the data, the step, the schedule) + Record (the run so far)
      -> compiled chunk (engine.loop.run_chunk): epochs, held-out evaluation, patience
      -> a new Record -> the user's callbacks -> a checkpoint -> ... -> the result

A run the host does not act in before its end (one chunk's epochs, no callbacks, no
checkpoint) starts as one compiled program instead (``fit_whole``, ``loop.run_whole``).

The host acts only between chunks, at most ``epochs_per_chunk`` epochs apart and at
every ``checkpoint_every`` epochs: the user's callbacks ``(epoch, params, metrics) ->
dict | None`` (metrics: each member's last training loss "loss" and last held-out
loss "eval_loss"; a returned dict adds metrics, ``{"stop": mask}`` stops members),
the checkpoint and the progress bar. A ``Record`` is never changed in place: each
chunk makes a new one, assigned at once, so a Ctrl-C leaves the last whole one,
which is what the checkpoint written on Ctrl-C holds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from abc_jax import checkpoint, parallel
from abc_jax.core.model import Batch, Params
from abc_jax.engine.loop import Chunk, Final, State, run_chunk, run_whole, unpack

Callback = Callable[[int, Params, dict[str, Any]], "dict[str, Any] | None"]
STOP = "stop"  # the key of a callback's result that asks members to stop


class Schedule(NamedTuple):
    """When the loop evaluates and when the host acts, in epochs."""

    epochs: int  # the run's total
    epochs_per_chunk: int  # at most this many epochs between two returns to the host
    eval_every: int  # held-out evaluations at multiples of it, and at ``epochs``
    checkpoint_every: int  # checkpoints at multiples of it, at the end and on Ctrl-C
    patience: int | None  # evaluations without a new best before a member stops
    precision: str  # matmul precision the chunk is traced at


class Plan(NamedTuple):
    """What ``fit`` needs besides the record: the data, the step, the schedule, the host's
    callbacks and where to save."""

    batch: Batch
    axes: Batch  # per field: 0 (a member axis) or None (shared)
    held: Batch | None
    held_axes: Batch | None
    keys: Any  # (M,) or None
    epoch: Any  # the step's epoch function (engine.steps.Step.epoch)
    rows: int  # static rows of non-zero weight (0 unless the step counts them)
    schedule: Schedule
    callbacks: Sequence[Callback] = ()
    checkpoint_dir: str | os.PathLike[str] | None = None
    settings: dict[str, Any] | None = None
    model: Callable[[State], Params] | None = None  # the params a checkpoint offers to load
    check: Callable[[], None] | None = None  # the inputs' value check, raised before the
    # host acts on the first chunk (its result is read with the chunk's)


class Record(NamedTuple):
    """A run so far: the device state and the host's arrays (M members, E = epoch)."""

    state: State
    epoch: int  # epochs done (the furthest member)
    losses: np.ndarray  # (M, E) training losses, NaN where a member did not run
    evals: np.ndarray  # (M, E + 1) held-out losses by epoch, NaN where none was made
    evaluated: np.ndarray  # (M, E + 1) bool: an evaluation was made there
    reached: np.ndarray  # (M,) the epoch each member's params are at
    metrics: dict[str, np.ndarray]  # the callbacks' metrics, each (M, k)
    metric_epochs: np.ndarray  # (k,) the epochs the callbacks were called at
    bad: np.ndarray  # (M,) bool: the host's copy of state.bad (read with each chunk's losses)
    stopped: np.ndarray  # (M,) bool: the host's copy of state.stopped

    @classmethod
    def start(cls, state: State | None, M: int) -> Record:
        """Before epoch 0 (``state`` None: it is built in the run's one program)."""
        return cls(state, 0, np.zeros((M, 0)), np.full((M, 1), np.nan), np.zeros((M, 1), bool),
                   np.zeros(M, np.int64), {}, np.zeros(0, np.int64), np.zeros(M, bool),
                   np.zeros(M, bool))

    def done(self) -> np.ndarray:
        """(M,) bool: members that run no more (diverged or stopped)."""
        return self.bad | self.stopped

    def diverged_at(self) -> np.ndarray:
        """(M,) the first epoch with a non-finite loss, -1 if none."""
        return np.where(self.bad, self.reached, -1)

    def stopped_at(self) -> np.ndarray:
        """(M,) the epoch patience or a callback stopped a member at, -1 if none."""
        return np.where(self.stopped & ~self.bad, self.reached, -1)

    def history(self) -> dict[str, np.ndarray]:
        """The host's arrays, for a checkpoint."""
        return {"evals": self.evals, "evaluated": self.evaluated, "reached": self.reached,
                "metric_epochs": self.metric_epochs,
                **{f"metric_{k}": v for k, v in self.metrics.items()}}

    @classmethod
    def restored(cls, state: State, epoch: int, losses: np.ndarray,
                 history: dict[str, np.ndarray]) -> Record:
        return cls(state, epoch, losses, history["evals"], history["evaluated"].astype(bool),
                   history["reached"], {k[7:]: v for k, v in history.items()
                                        if k.startswith("metric_") and k != "metric_epochs"},
                   history["metric_epochs"], np.asarray(state.bad), np.asarray(state.stopped))


def advance(rec: Record, state: State, out: Chunk, n: int) -> Record:
    """The record after a chunk of ``n`` epochs (the device's results read once)."""
    losses, evals, done = (np.asarray(a) for a in (out.losses, out.evals, out.evaluated))
    first = np.where(done[:, 0], evals[:, 0], rec.evals[:, -1])  # epoch rec.epoch
    return rec._replace(
        state=state, epoch=rec.epoch + n,
        losses=np.concatenate([rec.losses, losses[:, :n]], axis=1),
        evals=np.concatenate([rec.evals[:, :-1], first[:, None], evals[:, 1:n + 1]], axis=1),
        evaluated=np.concatenate([rec.evaluated[:, :-1], (done[:, 0] | rec.evaluated[:, -1])
                                  [:, None], done[:, 1:n + 1]], axis=1),
        reached=np.where(rec.done(), rec.reached, np.asarray(out.reached, np.int64)),
        bad=np.asarray(out.bad), stopped=np.asarray(out.stopped))


def last_evaluation(rec: Record) -> np.ndarray:
    """(M,) each member's latest held-out loss, NaN if none."""
    made = rec.evaluated
    last = made.shape[1] - 1 - np.argmax(made[:, ::-1], axis=1)
    return np.where(made.any(axis=1), rec.evals[np.arange(len(last)), last], np.nan)


def call_back(rec: Record, callbacks: Sequence[Callback]) -> Record:
    """Call the user's callbacks at ``rec.epoch``; record their metrics, stop who asks."""
    if not callbacks:
        return rec
    M = rec.reached.shape[0]
    done = rec.done()
    last = rec.losses[:, -1] if rec.epoch else np.full(M, np.nan)
    metrics: dict[str, Any] = {"loss": np.where(rec.reached < rec.epoch, np.nan, last),
                               "eval_loss": last_evaluation(rec)}
    stop, added = np.zeros(M, bool), {}
    for callback in callbacks:
        out = callback(rec.epoch, rec.state.params, dict(metrics)) or {}
        if not isinstance(out, dict):
            raise TypeError(f"callbacks must return a dict of metrics or None, got "
                            f"{type(out).__name__} from {callback!r}")
        stop |= np.broadcast_to(np.asarray(out.pop(STOP, False), bool), (M,))
        new = {k: np.broadcast_to(np.asarray(v, np.float64), (M,)) for k, v in out.items()}
        metrics |= new
        added |= new
    k = len(rec.metric_epochs)
    table = {name: np.concatenate([rec.metrics.get(name, np.full((M, k), np.nan)),
                                   np.where(done, np.nan, v)[:, None]], axis=1)
             for name, v in added.items()}
    table |= {name: np.pad(v, ((0, 0), (0, 1)), constant_values=np.nan)
              for name, v in rec.metrics.items() if name not in added}
    state, stopped = rec.state, rec.stopped
    if (stop & ~done).any():
        stopped = stopped | (stop & ~done)
        state = state._replace(stopped=state.stopped | jnp.asarray(stop & ~done))
    return rec._replace(state=state, stopped=stopped, metrics=table,
                        metric_epochs=np.append(rec.metric_epochs, rec.epoch))


def boundary(epoch: int, s: Schedule) -> int:
    """The next epoch after ``epoch`` at which the host acts: a chunk's end, a checkpoint or
    the end of the run."""
    return min(s.epochs, *((epoch // k + 1) * k for k in (s.epochs_per_chunk,
                                                           s.checkpoint_every)))


def save(rec: Record, plan: Plan) -> None:
    """The checkpoint of ``rec`` under ``plan.checkpoint_dir``, by process 0."""
    if plan.checkpoint_dir is not None and parallel.is_main_process():
        checkpoint.save_checkpoint(plan.checkpoint_dir, state=rec.state, epoch=rec.epoch,
                                   losses=rec.losses, settings=plan.settings,
                                   extra=rec.history(), model=plan.model(rec.state),
                                   diverged_at=rec.diverged_at())


def bucket(n: int, M: int) -> int:
    """Members a chunk runs for ``n`` running ones, at most M: n rounded up to a multiple of
    2^(b - 3), b = n.bit_length(), i.e. to one of four sizes per doubling (..., 32, 40, 48,
    56, 64, 80, ...): at most a quarter of a bucket is padding, and a run compiles at most
    four sizes per halving of its members."""
    grain = 1 << max(n.bit_length() - 3, 0)
    return min(M, -(-n // grain) * grain)


@functools.partial(jax.jit, static_argnames=("axes",))
def take(tree: Any, idx: jax.Array, axes: Any = 0) -> Any:
    """The members ``idx`` (B,) of ``tree``: leaves with a member axis (``axes`` 0; a
    ``Batch`` of 0/None per field) indexed, shared ones as they are."""
    if tree is None:
        return None
    if isinstance(tree, Batch):
        return Batch(*(None if a is None else a if ax is None else a[idx]
                       for a, ax in zip(tree, axes, strict=True)))
    return jax.tree.map(lambda a: a[idx], tree)


@jax.jit
def put(full: State, part: State, idx: jax.Array) -> State:
    """``full`` with members ``idx`` (B,) replaced by ``part``'s rows; an index out of range
    (padding) writes nothing."""
    return jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), full, part)


def compactable(rec: Record) -> bool:
    """Whether chunks may run on the running members alone: several members, on one device
    (members split over a mesh keep their places)."""
    bad = rec.state.bad
    return bad.shape[0] > 1 and len(getattr(getattr(bad, "sharding", None), "device_set",
                                            ())) <= 1


def run(rec: Record, plan: Plan, stop: int) -> Record:
    """One chunk from ``rec.epoch`` towards ``stop``: on every member, or, once some have
    stopped, on the running ones gathered into a bucket (``bucket``; padded with a stopped
    member, whose rows are dropped); the chunk ends early when no more than half its bucket
    still runs, so stopped members soon stop costing. Each member computes as it would
    alone: the results are those of every member in one batch."""
    s, M = plan.schedule, rec.reached.shape[0]
    done = rec.done()
    live = np.flatnonzero(~done)
    B = bucket(len(live), M) if compactable(rec) else M
    static = dict(epoch=plan.epoch, axes=plan.axes, held_axes=plan.held_axes,
                  length=s.epochs_per_chunk, rows=plan.rows, eval_every=s.eval_every,
                  patience=s.patience, precision=s.precision)
    times = (np.int32(rec.epoch), np.int32(stop), np.int32(s.epochs))
    if B == M:
        floor = np.int32(M // 2 if compactable(rec) else -1)
        state, out = run_chunk(rec.state, plan.batch, plan.held, plan.keys, *times,
                               rec.evaluated[:, -1], floor, **static)
        out = unpack(out)[0]
        return advance(rec, state, out, out.ran)
    idx = np.concatenate([live, np.full(B - len(live), np.flatnonzero(done)[0])])
    keys = None if plan.keys is None else take(plan.keys, idx)
    part, out = run_chunk(take(rec.state, idx), take(plan.batch, idx, plan.axes),
                          take(plan.held, idx, plan.held_axes), keys, *times,
                          rec.evaluated[idx, -1], np.int32(B // 2), **static)
    out = unpack(out)[0]
    n = out.ran
    rows = np.where(np.arange(B) < len(live), idx, M)  # padding: out of range, dropped
    state = put(rec.state, part, rows)
    L = s.epochs_per_chunk

    def spread(a: Any, fill: Any, width: int) -> np.ndarray:  # (B, width) -> (M, width)
        full = np.full((M, width), fill, np.asarray(a).dtype)
        full[live] = np.asarray(a)[:len(live)]
        return full

    def keep(a: Any, old: np.ndarray) -> np.ndarray:  # (B,) -> (M,), the others as they were
        full = old.copy()
        full[live] = np.asarray(a)[:len(live)]
        return full

    return advance(rec, state, Chunk(spread(out.losses, np.nan, L),
                                     spread(out.evals, np.nan, L + 1),
                                     spread(out.evaluated, False, L + 1),
                                     keep(out.reached, rec.reached), n,
                                     keep(out.bad, rec.bad), keep(out.stopped, rec.stopped)), n)


def fit(rec: Record, plan: Plan, progress: Any = None) -> Record:
    """Train until ``schedule.epochs`` or until every member has stopped.

    On Ctrl-C the checkpoint of the last whole record is written before the
    KeyboardInterrupt goes on, so the same call resumes from there.
    """
    s, check = plan.schedule, plan.check or (lambda: None)
    saved_at = rec.epoch
    try:
        while not finished(rec, s):
            rec = run(rec, plan, boundary(rec.epoch, s))
            check()  # bad inputs: their named error, before any callback or checkpoint
            check = lambda: None  # noqa: E731  (checked once)
            if progress is not None:
                progress(rec)
            rec = call_back(rec, plan.callbacks)
            if rec.epoch % s.checkpoint_every == 0:
                save(rec, plan)
                saved_at = rec.epoch
    except KeyboardInterrupt:
        if rec.epoch != saved_at:
            save(rec, plan)
        raise
    check()
    if rec.epoch != saved_at or rec.epoch == 0:
        save(rec, plan)
    return rec


def one_program(plan: Plan) -> bool:
    """Whether the run starts as one compiled program (``fit_whole``): one chunk's epochs,
    nothing for the host to do before the end (no callbacks, no checkpoint), one process
    and one device."""
    X = plan.batch.X
    return (plan.schedule.epochs <= plan.schedule.epochs_per_chunk
            and not plan.callbacks and plan.checkpoint_dir is None
            and jax.process_count() == 1
            and len(getattr(getattr(X, "sharding", None), "device_set", ())) <= 1)


def fit_whole(plan: Plan, params: Params, hyper: dict[str, Any], init: Any, M: int,
              one: bool, check: Callable[..., jax.Array]) -> tuple[Record, Final | None, bool]:
    """The run as one compiled call (``loop.run_whole``) and one read of its results:
    (the record; the result params, None where the run goes on; whether ``check(params,
    batch, held)``, the inputs' values flag, held). One member: the whole run, its state
    left on the device. Several: the chunk ends early once no more than half of them run,
    and the record (with the state) goes on in ``fit``, the running members compacted."""
    s = plan.schedule
    packed, fin, state = run_whole(
        params, hyper, plan.batch, plan.held, plan.keys, np.int32(s.epochs),
        np.int32(M // 2 if M > 1 else -1), init=init, M=M, best=s.patience is not None,
        one=one, keep=M > 1, check=check, epoch=plan.epoch, axes=plan.axes,
        held_axes=plan.held_axes, length=s.epochs_per_chunk, rows=plan.rows,
        eval_every=s.eval_every, patience=s.patience, precision=s.precision)
    out, ok = unpack(packed)
    rec = advance(Record.start(state, M), state, out, out.ran)
    return rec, fin if finished(rec, s) else None, ok


def finished(rec: Record, s: Schedule) -> bool:
    """Whether the run is over: every epoch done, or every member stopped."""
    return rec.epoch >= s.epochs or bool(rec.done().all())


def resume(rec: Record, plan: Plan) -> Record:
    """``rec`` continued from the checkpoint in ``plan.checkpoint_dir``, if there is one
    (another run's is refused: ``checkpoint.restore``)."""
    if plan.checkpoint_dir is None:
        return rec
    found = checkpoint.restore(plan.checkpoint_dir, like=rec.state, settings=plan.settings,
                               epochs=plan.schedule.epochs)
    if found is None:
        return rec
    stored, epoch, losses, history = found
    return Record.restored(parallel.replicate_like(strong(stored), plan.batch.X), epoch,
                           losses, history)


def progress_bar(progress: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal or in a notebook, in process 0; none (None) in a redirected
    log or with ``progress`` False."""
    if not progress:
        return contextlib.nullcontext()
    ipython = sys.modules.get("IPython")  # a notebook: IPython's kernel shell is running
    notebook = type(ipython and ipython.get_ipython()).__name__ == "ZMQInteractiveShell"
    if not (parallel.is_main_process() and (sys.stderr.isatty() or notebook)):
        return contextlib.nullcontext()
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", leave=False)


def show(bar: Any) -> Callable[[Record], None] | None:
    """Moves the tqdm ``bar`` (None: no bar) to the record's epoch, showing the lowest loss."""
    if bar is None:
        return None

    def update(rec: Record) -> None:
        bar.update(rec.epoch - bar.n)
        last = rec.losses[:, -1] if rec.epoch else np.array([np.nan])
        if np.isfinite(last).any():
            bar.set_postfix(loss=f"{np.nanmin(np.where(np.isfinite(last), last, np.nan)):.6g}")

    return update


@jax.jit
def strong(tree: Any) -> Any:
    """Leaves as committed, strongly typed arrays, as the compiled chunk returns them, so
    the first chunk sees the input types of every later one and compiles once."""
    return jax.tree.map(lambda a: jnp.array(a, dtype=a.dtype), tree)
