"""Training on the host: check, build the state, restore, run compiled chunks, call hooks.

``train`` runs compiled chunks of up to ``epochs_per_chunk`` epochs
(``loop.run_chunk``: the update rule and the epochs) and after each calls the
hooks (divergence guard, held-out evaluation, checkpoint, progress); a hook
that returns True stops the run (early stopping). ``population`` vmaps the
same chunk over many members.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from abc_jax import parallel, validation
from abc_jax.backward import batch_value_and_grad
from abc_jax.checkpoint import fingerprint, restore, save_checkpoint
from abc_jax.loop import State, gd_update, gradient_descent, run_chunk
from abc_jax.model import Batch, Params, _batch_loss, prepare, replicate_like

GRADS = ("manual", "oracle")
EPOCHS_PER_CHUNK = 100


class TrainResult(NamedTuple):
    """What ``train`` returns."""

    params: Params  # A (H, D), B (H, D), C (O, H); train_per_sample: leading N axis
    losses: jax.Array  # (epochs,); train_per_sample: (N, epochs)
    eval_losses: jax.Array | None = None  # (k,) held-out loss at eval_epochs; no eval_data: None
    eval_epochs: jax.Array | None = None  # (k,) int, epochs done when each was measured
    best_epoch: int | None = None  # the eval epoch of the lowest held-out loss


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


# --- the host side: configuration, state, hooks -------------------------------


def chunk_static(optimizer: Any, epochs: Any, grad: Any, batch_size: Any, key: Any,
                 epochs_per_chunk: Any, precision: Any, chunk_size: Any) -> dict[str, Any]:
    """Check the knobs ``train`` and ``train_many`` share; return the chunk's static
    arguments (``optimizer`` None: the hand-rolled rule's update)."""
    if optimizer is not None and not all(callable(getattr(optimizer, f, None))
                                         for f in ("init", "update")):
        raise TypeError("optimizer must be an optax.GradientTransformation (init and update), "
                        f"got {type(optimizer).__name__}")
    validation.check_int(epochs, "epochs", minimum=0)
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    batch_size = validation.check_positive_int(batch_size, "batch_size", allow_none=True)
    if batch_size is not None and key is None:
        raise ValueError("key is required with batch_size: mini-batches are shuffled from it")
    return dict(
        update=gd_update if optimizer is None else optimizer.update,
        extra=isinstance(optimizer, optax.GradientTransformationExtraArgs), grad=grad,
        batch_size=batch_size,
        length=validation.check_positive_int(epochs_per_chunk, "epochs_per_chunk"),
        precision=validation.check_precision(precision),
        chunk_size=validation.check_positive_int(chunk_size, "chunk_size", allow_none=True))


def _configure(lr: Any, epochs: Any, optimizer: Any, grad: Any, batch_size: Any, key: Any,
               epochs_per_chunk: Any, precision: Any,
               chunk_size: Any = None) -> tuple[Any, dict[str, Any]]:
    """Check train's arguments; return (optimizer, the chunk's static arguments)."""
    if optimizer is None and lr is None:
        raise TypeError("lr is required without an optimizer (the rule p <- p - lr * g)")
    if optimizer is not None and lr is not None:
        validation.check_finite_float(lr, "lr", positive=True)
    static = chunk_static(optimizer, epochs, grad, batch_size, key, epochs_per_chunk,
                          precision, chunk_size)
    if batch_size is not None:
        validation.check_key(key)
    return gradient_descent(lr) if optimizer is None else optimizer, static


@jax.jit
def _strong(tree: Any) -> Any:
    """Leaves as committed, strongly typed arrays, as the compiled chunk returns them, so
    the first chunk sees the input types of every later one and compiles once."""
    return jax.tree.map(lambda a: jnp.array(a, dtype=a.dtype), tree)


@jax.jit
def _data_summary(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(rows of non-zero weight, params and X finite and weights valid), on the devices."""
    r = batch.weights
    n = batch.X.shape[0] if r is None else jnp.sum(r > 0)
    return n, validation.all_finite((params, batch.X, batch.T)) & validation.weights_ok(r)


def _settings(params: Params, batch: Batch, opt_state: Any, n_rows: int, lr: Any, grad: str,
              batch_size: Any, key: Any, custom: bool, held: HeldOut | None = None,
              every: int | None = None) -> dict[str, Any]:
    """What identifies a run, for its checkpoint and the processes' agreement.

    Speed and memory knobs (chunk_size, precision, devices, processes, and
    epochs_per_chunk unless it sets when to evaluate) may change across a resume
    and are left out.
    """
    evaluation = None if held is None else {
        "every": every, "patience": held.patience,
        "fingerprint": [v for a in held.batch if a is not None for v in fingerprint(a)]}
    if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {
        "N": n_rows, "D": params.A.shape[1], "H": params.A.shape[0], "O": params.C.shape[0],
        "dtype": str(params.A.dtype), "lr": lr, "grad": grad, "batch_size": batch_size,
        "key": None if key is None else np.asarray(key).tolist(),
        "optimizer": "optax" if custom else "gradient_descent",
        "opt_state": str(jax.tree.structure(opt_state)),
        "data_fingerprint": fingerprint(batch.X, batch.weights),
        "targets_fingerprint": None if batch.T is None else fingerprint(batch.T, batch.weights),
        "params_fingerprint": [v for p in params for v in fingerprint(p)],
        "evaluation": evaluation,
    }


def _progress_bar(progress: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal or in a notebook, in process 0; none in a redirected log."""
    ipython = sys.modules.get("IPython")  # a notebook: IPython's kernel shell is running
    notebook = type(ipython and ipython.get_ipython()).__name__ == "ZMQInteractiveShell"
    shown = progress and parallel.is_main_process() and (sys.stderr.isatty() or notebook)
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", leave=False,
                disable=not shown)


def _run_chunks(run: Any, state: State, batch: Batch, key: Any, start: int, stop: int,
                losses: list[np.ndarray], static: dict[str, Any],
                hooks: list[Any]) -> tuple[State, list[np.ndarray]]:
    """Compiled chunks from epoch ``start`` to ``stop``; after each, every ``hook(state,
    epochs done, losses so far as a list of chunks)`` in order; stops early after a chunk
    where a hook returned True (early stopping)."""
    while start < stop:
        state, chunk = run(state, batch, key, np.int32(start), np.int32(stop), **static)
        done = min(static["length"], stop - start)
        losses.append(np.asarray(chunk)[..., :done])
        start += done
        if True in [hook(state, start, losses) is True for hook in hooks]:  # every hook runs
            break
    return state, losses


@dataclasses.dataclass
class HeldOut:
    """The held-out loss ``batch_loss(params, batch)`` after every chunk (a hook).

    ``epochs[k]``, ``losses[k]``: epochs done and the loss there; ``best``: the
    params of the lowest loss (the first, on ties). With ``patience`` = p the
    hook asks to stop once p evaluations in a row did not improve on the best.
    """

    batch: Batch
    patience: int | None
    precision: str
    best: Params
    epochs: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)

    def record(self, params: Params, epoch: int) -> None:
        loss = float(validation.run(_batch_loss, params, self.batch, name="eval_data",
                                    precision=self.precision))
        if not self.losses or loss < min(self.losses):
            self.best = params
        self.epochs.append(epoch)
        self.losses.append(loss)

    def done(self) -> bool:
        """Patience is spent: ``patience`` evaluations since the best one."""
        return (self.patience is not None and
                len(self.losses) - 1 - int(np.argmin(self.losses)) >= self.patience)

    def __call__(self, state: State, epoch: int, losses: list[np.ndarray]) -> bool:
        self.record(state.params, epoch)
        return self.done()

    def history(self) -> dict[str, np.ndarray]:
        return {"eval_epochs": np.asarray(self.epochs, np.int64),
                "eval_losses": np.asarray(self.losses, np.float64)}


def _held_out(eval_data: Any, patience: Any, params: Params, batch: Batch,
              precision: str) -> HeldOut | None:
    """``eval_data`` (X or a ``Batch`` with targets) checked, on the training's devices."""
    patience = validation.check_int(patience, "patience", minimum=1, allow_none=True)
    if eval_data is None:
        if patience is not None:
            raise ValueError("patience needs eval_data: early stopping watches the held-out loss")
        return None
    _, held = prepare(params, eval_data, "eval_data")
    return HeldOut(replicate_like(held, batch.X), patience, precision, params)


def _show(state: State, epoch: int, losses: list[np.ndarray], *, bar: Any,
          held: HeldOut | None) -> None:
    """The progress hook: the bar moves by the chunk's epochs and shows the last losses."""
    shown = {"loss": f"{losses[-1][-1]:.6g}"}
    bar.update(losses[-1].shape[-1])
    bar.set_postfix(shown if held is None else shown | {"held_out": f"{held.losses[-1]:.6g}"})


def _advice(lr: Any, custom: bool) -> str:
    if custom:
        return "lower the optimizer's own learning rate (e.g. optax.adam(1e-3) -> optax.adam(1e-4))"
    return f"try a smaller learning rate, e.g. lr={lr / 10:g}"


def _raise_if_overflow(initial: Params, data: Any) -> None:
    """FloatingPointError if the loss or gradient overflows at the initial params."""
    try:
        batch_value_and_grad(initial, data)
    except FloatingPointError as err:
        raise FloatingPointError(f"at the initial parameters, before any update: {err}. "
                                 "No learning rate fixes this") from None


def _guard(state: State, epoch: int, losses: list[np.ndarray], *, initial: Params,
           batch: Batch, lr: Any, custom: bool) -> None:
    """Raise DivergenceError at the first non-finite loss (FloatingPointError at the start)."""
    L = losses[-1]
    bad = ~np.isfinite(L)
    if not bad.any():
        return
    j = int(np.argmax(bad))
    e = epoch - len(L) + j
    if e <= 1:  # the loss or the gradient at the initial params: an overflow, not a divergence
        _raise_if_overflow(initial, batch)
    kept = np.concatenate([*losses[:-1], L[:j]])
    holds = (f"the params and losses up to epoch {e - 1}, the last finite one" if e else
             "the initial params: no epoch had a finite loss")
    raise DivergenceError(
        f"training diverged: the loss is {L[j]} at epoch {e}{'' if custom else f' (lr={lr:g})'};"
        f" {_advice(lr, custom)}. The error's .result holds {holds}",
        TrainResult(state.last_good, jnp.asarray(kept)), e, lr)


def _checkpointed(checkpoint_dir: Any, state: State, batch: Batch, settings: dict[str, Any],
                  epochs: int, hooks: list[Any],
                  held: HeldOut | None) -> tuple[State, int, list[np.ndarray]]:
    """(state, epoch, losses) of the checkpoint in ``checkpoint_dir`` if there is one, else
    the start; in process 0, a hook that writes the checkpoint after every chunk. With
    evaluation the checkpoint also holds the best params and the held-out history."""
    def saved(s: State) -> tuple[Any, ...]:
        return (s.params, s.opt_state) + (() if held is None else (held.best,))

    if parallel.is_main_process():
        hooks.append(lambda s, e, ls: save_checkpoint(
            checkpoint_dir, state=saved(s), epoch=e, losses=np.concatenate(ls),
            settings=settings, extra=held and held.history()))
    found = restore(checkpoint_dir, like=saved(state), settings=settings, epochs=epochs)
    if found is None:
        return state, 0, []
    stored, start, old, extra = found
    p, o, *best = replicate_like(_strong(stored), batch.X)
    if held is not None:
        held.best, held.epochs, held.losses = best[0], extra["eval_epochs"].tolist(), \
            extra["eval_losses"].tolist()
    return State(p, o, p, state.bad), start, [old]


def _start(checkpoint_dir: Any, state: State, batch: Batch, settings: Any, epochs: int,
           hooks: list[Any], held: HeldOut | None) -> tuple[State, int, list[np.ndarray], int]:
    """(state, first epoch, losses so far, last epoch): the checkpoint's, if there is one,
    else epoch 0 (with the held-out loss of the initial params); the last epoch is the
    first if the checkpoint's run had already spent its patience."""
    start, losses = 0, []
    if checkpoint_dir is not None:
        state, start, losses = _checkpointed(checkpoint_dir, state, batch, settings, epochs,
                                             hooks, held)
    if held is not None and not held.losses:
        held.record(state.params, 0)
    return state, start, losses, start if held is not None and held.done() else epochs


def _initial_state(optimizer: Any, params: Params) -> State:
    """The loop's carry before epoch 0, as committed arrays (so one compilation serves all)."""
    return _strong(State(params, optimizer.init(params), params, np.zeros((), bool)))


def _result(state: State, losses: list[np.ndarray], dtype: Any,
            held: HeldOut | None) -> TrainResult:
    """The final params (the best held-out ones with patience) and the losses of every chunk
    joined along epochs, on the device; the held-out history if there is one."""
    out = jax.device_put(np.concatenate([np.zeros(0), *losses]).astype(dtype))
    if held is None:
        return TrainResult(state.params, out)
    history = held.history()
    return TrainResult(state.params if held.patience is None else held.best, out,
                       jnp.asarray(history["eval_losses"].astype(dtype)),
                       jnp.asarray(history["eval_epochs"]),
                       held.epochs[int(np.argmin(held.losses))])


def train(params: Params, X: Any, *, lr: float | None = None, epochs: int,
          optimizer: Any = None, grad: str = "manual", batch_size: int | None = None,
          key: jax.Array | None = None, chunk_size: int | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike[str] | None = None,
          epochs_per_chunk: int = EPOCHS_PER_CHUNK, precision: str | None = None,
          eval_data: Any = None, patience: int | None = None) -> TrainResult:
    """Minimise ``batch_loss(params, X)``: per epoch (u, s) = optimizer.update(g, s, p), p += u.

    params: ``Params(A (H, D), B (H, D), C (O, H))``, whose dtype the result and X take.
    X: samples (N, D) or a ``Batch`` (row weights, targets T (N, O); from ``shard_batch``
    or, with every process calling alike, ``shard_local_batch``). lr: of the default rule
    p <- p - lr g (data: every lr shares one compilation); needed only without
    ``optimizer``, any ``optax.GradientTransformation`` (``GradientTransformationExtraArgs``
    such as ``optax.lbfgs()`` also get value, grad and value_fn). epochs >= 0. grad:
    "manual" or "oracle" (``jax.grad``). batch_size: None for the full batch, else
    ceil(n / b) mini-batches per epoch shuffled with ``fold_in(key, epoch)``. chunk_size,
    precision: as in ``batch_grad`` (speed knobs, free to change across a resume).
    checkpoint_dir: process 0 writes ``checkpoint.npz`` after every chunk of
    ``epochs_per_chunk`` epochs, and a later call continues from it; one of another run
    (data, params, shapes, dtype, lr, grad, batch_size, key, optimizer, evaluation) is refused.
    eval_data: held-out X (N', D) or ``Batch``: its loss at epoch 0 and after every chunk.
    patience: stop once that many evaluations in a row did not lower the held-out loss,
    and return the params of the lowest one (needs eval_data).

    Returns ``TrainResult(params, losses, eval_losses, eval_epochs, best_epoch)``: losses
    (epochs,) (fewer after an early stop), losses[e] the batch loss before update e
    (mini-batches: the weighted mean of epoch e's); the eval fields None without eval_data.

    Raises DivergenceError (a non-finite loss; names the epoch and the knob to turn),
    FloatingPointError (the loss or gradient overflows at the initial params: no lr helps),
    ValueError or TypeError (a bad argument, before any tracing; a checkpoint of another run).
    """
    if validation.is_traced(params, X, key, eval_data):
        raise TypeError("train runs its own compiled loop: call it outside jax.jit/vmap/grad")
    optimizer, static = _configure(lr, epochs, optimizer, grad, batch_size, key,
                                   epochs_per_chunk, precision, chunk_size)
    params, batch = prepare(params, X)
    params = replicate_like(_strong(params), batch.X)
    held = _held_out(eval_data, patience, params, batch, static["precision"])
    state = replicate_like(_initial_state(optimizer, params), batch.X)
    n_rows, ok = (int(v) for v in _data_summary(params, batch))
    static["n_rows"] = n_rows if batch_size else 0
    custom = static["update"] is not gd_update
    settings = None  # what identifies the run: for a checkpoint, or for several processes
    if checkpoint_dir is not None or jax.process_count() > 1:
        settings = _settings(params, batch, state.opt_state, n_rows, lr, grad, batch_size, key,
                             custom, held, epochs_per_chunk)
        parallel.check_same_on_all_processes(
            settings | {"epochs": epochs, "checkpoint": checkpoint_dir is not None}, "train")
    if not ok:
        validation.explain_nonfinite(params, batch, "X")
    hooks = [functools.partial(_guard, initial=params, batch=batch, lr=lr, custom=custom)]
    hooks += [] if held is None else [held]
    state, start, losses, stop = _start(checkpoint_dir, state, batch, settings, epochs, hooks,
                                        held)
    with _progress_bar(progress, epochs, start, "train") as bar:
        hooks.append(functools.partial(_show, bar=bar, held=held))
        state, losses = _run_chunks(run_chunk, state, batch, replicate_like(key, batch.X),
                                    start, stop, losses, static, hooks)
    return _result(state, losses, params.A.dtype, held)

