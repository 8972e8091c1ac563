"""Training: minimise batch_loss by gradient descent, epochs compiled into a lax.while_loop.

One epoch on the full batch (``batch_size=None``, the homework's way), with
p_e the parameters before epoch e and s_e the optimizer state::

    L_e, g_e       = batch_loss(p_e, X), d batch_loss / dp (p_e)
    u_e, s_{e+1}   = optimizer.update(g_e, s_e, p_e)
    p_{e+1}        = p_e + u_e

The homework's rule p <- p - lr * g is the transformation ``gradient_descent(lr)``
(u_e = -lr g_e) with the same ``(grads, state, params)`` signature as any
``optax.GradientTransformation``, so both go through one step function.
``losses[e] = L_e``, the loss at the parameters BEFORE update e.

With ``batch_size = b`` an epoch is a pass over a fresh permutation of the N
rows (key ``fold_in(key, e)``), cut into ceil(N / b) mini-batches: the last
one holds the N mod b rows left over, so every sample is used exactly once per
epoch. One update per mini-batch, each on that batch's mean loss, and
``losses[e]`` is the sample-weighted mean of the epoch's batch losses,
(1/N) sum_k n_k L(batch k), each at the parameters before that batch's update.

Epochs run on the device: one compiled function runs up to
``epochs_per_chunk`` epochs in a ``lax.while_loop`` whose trip count is a
traced argument, so a run of E epochs does exactly E epochs of work, and the
last partial chunk reuses the same compiled code. Each epoch writes its loss
into a preallocated (epochs_per_chunk,) buffer; the loop stops after the
first non-finite loss. Between chunks the host updates the progress bar,
checks the losses for NaN/inf and writes the checkpoint.

With several processes (X from ``parallel.shard_local_batch``) every process
runs the same loop on its own rows; XLA all-reduces the gradient sums, so the
losses and params are the same everywhere. The host never holds X: the
finite check and the data fingerprint are reductions on the devices. Process
0 alone shows the progress bar and writes checkpoints, and on a resume sends
what it read to the others.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm import tqdm

from abc_jax import parallel, validation
from abc_jax.backward import _value_and_grad
from abc_jax.checkpoint import restore, run_settings, save_checkpoint
from abc_jax.model import Params, _batch_loss, describe_overflow, prepare_batch
from abc_jax.parallel import replicate_like

GRADS = ("manual", "oracle")
EPOCHS_PER_CHUNK = 100


class TrainResult(NamedTuple):
    """What ``train`` returns."""

    params: Params  # A (H, D), B (H, D), C (O, H); train_per_sample: leading N axis
    losses: jax.Array  # (epochs,); train_per_sample: (N, epochs)


class DivergenceError(RuntimeError):
    """The loss became NaN or inf. ``.result`` is the ``TrainResult`` up to the last finite epoch.

    Attributes:
      result: params at the start of the last epoch whose loss was finite
        (for full-batch training, ``result.losses[-1]`` is exactly their
        loss), and the losses of the epochs before the first non-finite one.
      epoch: the first epoch whose loss is not finite.
      lr: the learning rate of the run.
    """

    def __init__(self, message: str, result: TrainResult, epoch: int, lr: float):
        super().__init__(message)
        self.result = result
        self.epoch = epoch
        self.lr = lr

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the extra arguments
        return type(self), (str(self), self.result, self.epoch, self.lr)


@functools.lru_cache(maxsize=128)
def gradient_descent(lr: float) -> optax.GradientTransformation:
    """The homework's rule p <- p - lr * g, as an Optax transformation.

    ``update(grads, state, params) -> (-lr * grads, state)``; the state is
    empty. Applied with ``optax.apply_updates`` it gives p - lr * g, the
    same arithmetic as ``optax.sgd(lr)``. Cached per lr, so repeated calls
    with the same lr share one compiled training loop.
    """

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda g: -lr * g, grads), state

    return optax.GradientTransformation(init, update)


# --- one epoch --------------------------------------------------------------


def _loss_and_grad_fn(grad: str, chunk_size: int | None, n_valid: int | None) -> Any:
    """(params, X) -> (mean loss, Params grads) by the manual rule or by jax.grad.

    ``chunk_size`` bounds the memory of the manual gradient; ``jax.grad``
    runs on the whole batch and ignores it.
    """
    if grad == "manual":
        return functools.partial(_value_and_grad, chunk_size=chunk_size, n_valid=n_valid)
    if n_valid is None:
        return jax.value_and_grad(_batch_loss)
    return jax.value_and_grad(functools.partial(_batch_loss, n_valid=n_valid))


def _step(
    optimizer: Any, params: Params, opt_state: Any, grads: Params, loss: jax.Array
) -> tuple[Params, Any]:
    """p, s <- p + u, s' with (u, s') = optimizer.update(g, s, p): the one update rule."""
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _minibatch_epoch(
    loss_and_grad: Any,
    optimizer: Any,
    batch_size: int,
    n: int,
    params: Params,
    opt_state: Any,
    X: jax.Array,
    key: jax.Array,
) -> tuple[jax.Array, Params, Any]:
    """One pass over a permutation of the first n rows of X in batches of batch_size.

    The n // batch_size full batches run in a ``lax.scan``; the n % batch_size
    rows left over form one last, smaller batch (its own static shape).
    Returns (sample-weighted mean batch loss, params, opt_state).
    """
    perm = jax.random.permutation(key, n)  # (n,)
    n_full, rem = divmod(n, batch_size)

    def one_batch(carry: Any, idx: jax.Array) -> tuple[Any, jax.Array]:
        p, s = carry
        loss, grads = loss_and_grad(p, jnp.take(X, idx, axis=0))  # X[idx]: (len(idx), D)
        return _step(optimizer, p, s, grads, loss), loss

    carry = (params, opt_state)
    total = jnp.zeros((), X.dtype)
    if n_full:
        idx = perm[: n_full * batch_size].reshape(n_full, batch_size)
        carry, batch_losses = lax.scan(one_batch, carry, idx)
        total = jnp.sum(batch_losses) * batch_size
    if rem:
        carry, loss = one_batch(carry, perm[n_full * batch_size :])
        total = total + loss * rem
    return total / n, *carry


# --- a chunk of epochs, compiled --------------------------------------------


class _Carry(NamedTuple):
    params: Params  # parameters before the next epoch
    opt_state: Any
    last_good: Params  # parameters at the start of the last epoch with a finite loss
    bad: jax.Array  # () bool: an epoch's loss was not finite; the loop has stopped


def _chunk(
    carry: _Carry,
    X: jax.Array,
    key: jax.Array | None,
    start: jax.Array,
    epochs: jax.Array,
    *,
    optimizer: Any,
    grad: str,
    length: int,
    batch_size: int | None,
    chunk_size: int | None,
    n_valid: int | None,
    precision: str,
) -> tuple[_Carry, jax.Array]:
    """Epochs start, ..., min(start + length, epochs) - 1 in one ``lax.while_loop``.

    The trip count is traced, so any number of epochs up to ``length`` runs
    the same compiled code and does only that many epochs of work. The loop
    stops after the first epoch whose loss is not finite (that epoch's update
    is not applied). Returns the carry and the (length,) losses; entries of
    epochs not run are NaN. Traced under ``jax.default_matmul_precision``, so
    the precision reaches every product, autodiff's included.
    """
    with jax.default_matmul_precision(precision):
        return _chunk_loop(carry, X, key, start, epochs, optimizer=optimizer, grad=grad,
                           length=length, batch_size=batch_size, chunk_size=chunk_size,
                           n_valid=n_valid)


def _chunk_loop(
    carry: _Carry, X: jax.Array, key: jax.Array | None, start: jax.Array, epochs: jax.Array,
    *, optimizer: Any, grad: str, length: int, batch_size: int | None,
    chunk_size: int | None, n_valid: int | None,
) -> tuple[_Carry, jax.Array]:
    n = X.shape[0] if n_valid is None else n_valid
    dtype = carry.params.A.dtype
    if batch_size is None:
        loss_and_grad = _loss_and_grad_fn(grad, chunk_size, n_valid)
    else:  # mini-batches are gathered from the valid rows only
        loss_and_grad = _loss_and_grad_fn(grad, chunk_size, None)

    def epoch(c: _Carry, e: jax.Array) -> tuple[_Carry, jax.Array]:
        if batch_size is None:
            loss, grads = loss_and_grad(c.params, X)
            params, opt_state = _step(optimizer, c.params, c.opt_state, grads, loss)
        else:
            loss, params, opt_state = _minibatch_epoch(
                loss_and_grad, optimizer, batch_size, n, c.params, c.opt_state, X,
                jax.random.fold_in(key, e),
            )
        ok = jnp.isfinite(loss)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new = _Carry(keep(params, c.params), keep(opt_state, c.opt_state),
                     keep(c.params, c.last_good), ~ok)
        return new, loss.astype(dtype)

    count = jnp.clip(epochs - start, 0, length)  # epochs to run in this chunk

    def cond(state: tuple[jax.Array, _Carry, jax.Array]) -> jax.Array:
        i, c, _ = state
        return (i < count) & ~c.bad

    def body(state: tuple[jax.Array, _Carry, jax.Array]) -> tuple[jax.Array, _Carry, jax.Array]:
        i, c, losses = state
        c, loss = epoch(c, start + i)
        return i + 1, c, losses.at[i].set(loss)

    losses = jnp.full((length,), jnp.nan, dtype)
    _, carry, losses = lax.while_loop(cond, body, (jnp.zeros((), start.dtype), carry, losses))
    return carry, losses


_STATIC = ("optimizer", "grad", "length", "batch_size", "chunk_size", "n_valid",
           "precision")
_run_chunk = jax.jit(_chunk, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _run_chunk_per_sample(
    carry: _Carry, X: jax.Array, start: jax.Array, epochs: jax.Array, **static: Any
) -> tuple[_Carry, jax.Array]:
    """``_chunk`` vmapped over samples: carry leaves and X (N, 1, D) have a leading N axis."""
    return jax.vmap(lambda c, x: _chunk(c, x, None, start, epochs, **static))(carry, X)


# --- validation -------------------------------------------------------------


def _check_epochs(epochs: Any) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)):
        raise TypeError(f"epochs must be an int, got {type(epochs).__name__}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    return int(epochs)


def _check_grad(grad: Any) -> str:
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    return grad


def _check_optimizer(optimizer: Any) -> Any:
    if not all(callable(getattr(optimizer, f, None)) for f in ("init", "update")):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (init and update), "
            f"got {type(optimizer).__name__}"
        )
    try:
        hash(optimizer)
    except TypeError:
        raise TypeError(
            "optimizer must be hashable, like optax's NamedTuple transformations"
        ) from None
    return optimizer


_all_finite = jax.jit(validation.all_finite)


def _check_finite_values(params: Params, X: jax.Array) -> None:
    """One fused device check; only on failure the scan that names the entry."""
    if not bool(_all_finite((params, X))):
        for name, p in zip("ABC", params, strict=True):
            validation.raise_if_nonfinite(p, f"params.{name}")
        validation.raise_if_nonfinite(X, "X")


@jax.jit
def _strong(tree: Any) -> Any:
    """Leaves as committed, strongly typed arrays, as the compiled chunk returns them.

    The first chunk then sees the same input types as every later one, so
    it compiles once. One dispatch for the whole tree.
    """
    return jax.tree.map(lambda a: jnp.array(a, dtype=a.dtype), tree)


def _select_rows(mask: jax.Array, a: Params, b: Params) -> Params:
    """Row i of each leaf from ``a`` where mask[i] (N,), else from ``b``."""
    return jax.tree.map(
        lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b
    )


def _initial_values(
    params: Params, X: jax.Array, *, grad: str, chunk_size: int | None, n_valid: int | None,
    precision: str,
) -> tuple[jax.Array, jax.Array]:
    """(loss, all-finite flag of loss and gradient) at ``params``, on the full batch."""
    with jax.default_matmul_precision(precision):
        loss, grads = _loss_and_grad_fn(grad, chunk_size, n_valid)(params, X)
    return loss, validation.all_finite((loss, grads))


_initial_values_jit = jax.jit(
    _initial_values, static_argnames=("grad", "chunk_size", "n_valid", "precision")
)


def _raise_if_initial_overflow(params: Params, X: jax.Array, **static: Any) -> None:
    """FloatingPointError if the loss or gradient at the initial params is not finite.

    X and the params are finite (checked before training), so a non-finite
    value there is an overflow of the dtype: no learning rate can help.
    """
    loss, ok = _initial_values_jit(params, X, **static)
    if bool(ok):
        return
    dtype = np.dtype(params.A.dtype)
    what = "loss" if not np.isfinite(float(loss)) else "gradient"
    raise FloatingPointError(
        f"the {what} at the initial parameters is not finite (loss {float(loss)}), although X "
        f"and the params are: it overflows {dtype} (largest finite value "
        f"{np.finfo(dtype).max:.3g}); {describe_overflow(params, X)}. This is not a "
        "divergence, no update was made yet: rescale X (or the params), or use float64 "
        "(jax.config.update('jax_enable_x64', True) and float64 params)"
    )


class _NoBar:
    """Stands for a disabled progress bar, without the cost of building one."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        del n

    def set_postfix(self, **kwargs: Any) -> None:
        del kwargs


def _divergence_message(epoch: int, loss: float, lr: float, custom: bool) -> str:
    carries = " (the optimizer carries its own learning rate)" if custom else ""
    kept = (
        f"the parameters and losses up to epoch {epoch - 1}, the last finite one"
        if epoch > 0 else "the initial parameters: no epoch had a finite loss"
    )
    return (
        f"training diverged: the loss is {loss} at epoch {epoch} with lr={lr:g}{carries}; "
        f"try a smaller learning rate, e.g. lr={lr / 10:g}. The error's .result holds {kept}."
    )


# --- the public loops -------------------------------------------------------


def train(
    params: Params,
    X: Any,
    *,
    lr: float,
    epochs: int,
    optimizer: Any = None,
    grad: str = "manual",
    batch_size: int | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    epochs_per_chunk: int = EPOCHS_PER_CHUNK,
    precision: str | None = None,
) -> TrainResult:
    """Minimise ``batch_loss(params, X)`` for ``epochs`` epochs.

    Each epoch: L_e, g_e = batch_loss and its gradient at p_e, then
    (u_e, s_{e+1}) = optimizer.update(g_e, s_e, p_e) and p_{e+1} = p_e + u_e.
    The default optimizer is the homework's p <- p - lr * g, bit for bit the
    same trajectory as ``optax.sgd(lr)``.

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``; their dtype is the
        dtype of the result and of the losses (X is cast to it).
      X: samples, shape (N, D), finite; may be sharded across devices
        (``shard_batch``) or across processes (``parallel.shard_local_batch``:
        then every process calls train with the same arguments, which is
        checked, and gets the same result). It is validated once here, never
        per epoch.
      lr: learning rate, finite and > 0. With ``optimizer`` given, the
        optimizer carries its own learning rate; lr is still validated,
        recorded in the checkpoint and named in a divergence message.
      epochs: number of epochs, >= 0 (0 returns params unchanged, no losses).
      optimizer: None for ``gradient_descent(lr)``, or any
        ``optax.GradientTransformation`` (sgd, momentum, adam, chains,
        schedules). ``GradientTransformationExtraArgs`` also receive
        ``value=`` the loss.
      grad: "manual" (the hand-derived batch gradient) or "oracle"
        (``jax.value_and_grad`` of the batch loss; a padded sharded batch is
        masked the same way).
      batch_size: None trains on the full batch; an int b >= 1 on ceil(N / b)
        mini-batches per epoch from a permutation drawn with
        ``fold_in(key, epoch)``, the last batch holding the N mod b rows left.
      key: ``jax.random.key``; required with ``batch_size``, ignored without.
      chunk_size: rows per step of the manual gradient's accumulation, so
        memory stays constant in N ("oracle" ignores it). A pure memory knob:
        it may change across a resume (only rounding changes).
      progress: show a tqdm bar with the loss, updated once per chunk.
      checkpoint_dir: if given, ``checkpoint.npz`` there is written after
        every chunk, and a call with a checkpoint continues from it (a
        finished run returns at once). A checkpoint written for other data,
        initial params, shapes, dtype, lr, grad, batch_size, key or optimizer
        state structure is refused with ValueError. Optimizer
        hyperparameters that are not in its state (e.g. adam's learning rate)
        cannot be checked. With several processes only process 0 reads and
        writes it (its path on the other processes is not used), and a resume
        sends process 0's checkpoint to all.
      epochs_per_chunk: epochs per compiled loop (>= 1): how often the host
        shows progress, checks for divergence and checkpoints. A chunk runs
        only the epochs left, so it costs nothing to make it large.
      precision: matmul precision of every product in training, None for
        abc_jax's default ``"highest"`` (see ``validation.check_precision``);
        ``"default"`` lets a GPU use TF32. A speed knob like chunk_size: it
        may change across a resume.

    Returns:
      ``TrainResult(params, losses)``: params after the last epoch and losses
      of shape (epochs,), where losses[e] is the batch loss at the parameters
      before update e (with mini-batches: the sample-weighted mean of epoch
      e's batch losses, each before its own update).

    Raises:
      DivergenceError: a loss became NaN or inf after updates; names the
        epoch and lr.
      FloatingPointError: the loss (or gradient) at the initial params is
        not finite although X and the params are: the data or params
        overflow the dtype, which no learning rate fixes. The message gives
        max |X|, max |param| and the dtype's largest value, and suggests
        rescaling X or float64. Not a DivergenceError, so code that retries
        with a smaller lr on divergence does not retry this.
      ValueError, TypeError: a bad argument, named, before any tracing; or a
        checkpoint that does not match this call.
    """
    lr = validation.check_finite_float(lr, "lr", positive=True)
    precision = validation.check_precision(precision)
    epochs = _check_epochs(epochs)
    grad = _check_grad(grad)
    batch_size = validation.check_positive_int(batch_size, "batch_size", allow_none=True)
    epochs_per_chunk = validation.check_positive_int(epochs_per_chunk, "epochs_per_chunk")
    if batch_size is not None and key is None:
        raise ValueError("key is required with batch_size: mini-batches are shuffled from it")
    key = validation.check_key(key) if batch_size is not None else None
    custom = optimizer is not None
    optimizer = _check_optimizer(optimizer) if custom else gradient_descent(lr)
    if validation.is_traced(params, X, key):
        raise TypeError("train runs its own compiled loop: call it outside jax.jit/vmap/grad")
    params, X, n_valid, chunk_size = prepare_batch(params, X, chunk_size)
    static = dict(optimizer=optimizer, grad=grad, length=epochs_per_chunk,
                  batch_size=batch_size, chunk_size=chunk_size, n_valid=n_valid,
                  precision=precision)
    params = replicate_like(_strong(params), X)
    opt_state, not_finite = replicate_like(
        _strong((optimizer.init(params), np.zeros((), bool))), X)
    if jax.process_count() > 1:  # first: what follows must run on all processes alike
        parallel.check_same_on_all_processes(
            _call_summary(params, X, key, opt_state, static, lr=lr, epochs=epochs,
                          checkpointing=checkpoint_dir is not None),
            "train",
        )
    _check_finite_values(params, X)  # padding rows, if any, are zeros

    initial, start, losses, save = params, 0, [], None
    if checkpoint_dir is not None:
        settings = run_settings(params, X, n_valid, opt_state, lr=lr, grad=grad,
                                batch_size=batch_size, key=key, custom_optimizer=custom)
        ckpt = restore(checkpoint_dir, params_like=params, opt_state_like=opt_state,
                       settings=settings)
        if ckpt is not None:
            if ckpt.epoch > epochs:
                raise ValueError(
                    f"epochs = {epochs} is fewer than the {ckpt.epoch} epochs the checkpoint in "
                    "checkpoint_dir already ran; ask for at least that many or use another "
                    "checkpoint_dir"
                )
            start, losses = ckpt.epoch, [ckpt.losses]
            params, opt_state = replicate_like(_strong((ckpt.params, ckpt.opt_state)), X)
        if parallel.is_main_process():  # one writer; the others get it through restore
            save = functools.partial(save_checkpoint, checkpoint_dir, settings=settings)

    # After a resume the epoch before the checkpoint is gone: should the very first
    # epoch diverge, .result falls back to the checkpointed params.
    carry = _Carry(params, opt_state, params, not_finite)
    return _run_epochs(
        carry, X, replicate_like(key, X), start, epochs, losses, static, initial=initial,
        lr=lr, custom=custom, progress=progress and parallel.is_main_process(), save=save,
    )


def _call_summary(
    params: Params, X: jax.Array, key: jax.Array | None, opt_state: Any,
    static: dict[str, Any], **values: Any,
) -> dict[str, Any]:
    """What must be the same on every process of a job, for ``check_same_on_all_processes``."""
    if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    digest = hashlib.sha256()
    for p in params:  # this process's copy of the replicated params
        digest.update(np.ascontiguousarray(np.asarray(p)).tobytes())
    return values | {k: v for k, v in static.items() if k != "optimizer"} | {
        "params": digest.hexdigest(),
        "X": (X.shape, str(X.dtype)),
        "key": None if key is None else np.asarray(key).tolist(),
        "optimizer state": (str(jax.tree.structure(opt_state)),
                            [(a.shape, str(a.dtype)) for a in jax.tree.leaves(opt_state)]),
    }


def _run_epochs(
    carry: _Carry,
    X: jax.Array,
    key: jax.Array | None,
    start: int,
    epochs: int,
    losses: list[np.ndarray],
    static: dict[str, Any],
    *,
    initial: Params,
    lr: float,
    custom: bool,
    progress: bool,
    save: Any,
) -> TrainResult:
    """Chunks of epochs from ``start`` until ``epochs``; between chunks the host checks the
    losses, writes the checkpoint (``save``, if any) and updates the progress bar."""
    dtype = carry.params.A.dtype
    length = static["length"]
    show = progress and start < epochs
    with (tqdm(total=epochs, initial=start, desc="train", unit="epoch", leave=False) if show
          else _NoBar()) as bar:
        while start < epochs:
            carry, chunk_losses = _run_chunk(
                carry, X, key, np.int32(start), np.int32(epochs), **static
            )
            done = min(length, epochs - start)
            L = np.asarray(chunk_losses)[:done]
            bad = ~np.isfinite(L)
            if bad.any():
                j = int(np.argmax(bad))
                if start + j <= 1:  # the loss after at most one update: was it the start?
                    _raise_if_initial_overflow(
                        initial, X, **{k: static[k] for k in (
                            "grad", "chunk_size", "n_valid", "precision")}
                    )
                kept = np.concatenate([*losses, L[:j]]).astype(dtype)
                raise DivergenceError(
                    _divergence_message(start + j, float(L[j]), lr, custom),
                    TrainResult(carry.last_good, jnp.asarray(kept)), start + j, lr,
                )
            losses.append(L)
            start += done
            if save is not None:
                save(params=carry.params, opt_state=carry.opt_state, epoch=start,
                     losses=np.concatenate(losses))
            bar.update(done)
            bar.set_postfix(loss=f"{float(L[-1]):.6g}")
    all_losses = np.concatenate(losses) if losses else np.zeros((0,), dtype)
    return TrainResult(carry.params, jax.device_put(all_losses.astype(dtype)))


def train_per_sample(
    params: Params,
    X: Any,
    *,
    lr: float,
    epochs: int,
    progress: bool = True,
    epochs_per_chunk: int = EPOCHS_PER_CHUNK,
    precision: str | None = None,
) -> TrainResult:
    """The homework's first experiment: one copy of the params trained on each sample.

    Copy i follows p <- p - lr * dL(p, X[i])/dp for ``epochs`` epochs, the
    same as ``train(params, X[i:i+1], lr=lr, epochs=epochs)``; all N copies
    train at once (``vmap`` of the compiled loop), not in a Python loop.
    The homework then averaged the per-sample matrices::

        jax.tree.map(lambda p: p.mean(0), result.params)

    Args:
      params: ``Params(A (H, D), B (H, D), C (O, H))``, the common start.
      X: samples, shape (N, D), finite.
      lr: finite learning rate > 0.
      epochs: >= 0.
      progress: tqdm bar, updated once per chunk of ``epochs_per_chunk``.
      precision: matmul precision, as in ``train``.

    Returns:
      ``TrainResult`` with params A (N, H, D), B (N, H, D), C (N, O, H) and
      losses (N, epochs): losses[i, e] = L(p_i,e, X[i]), before update e.

    Raises:
      DivergenceError: some sample's loss became NaN or inf. Its message
        names the first such epoch, the sample and lr; its ``.result`` has,
        for each diverged copy, the params at the start of its last finite
        epoch (the others run to the end of that chunk), and losses that are
        NaN from each copy's divergence on.
    """
    lr = validation.check_finite_float(lr, "lr", positive=True)
    epochs = _check_epochs(epochs)
    epochs_per_chunk = validation.check_positive_int(epochs_per_chunk, "epochs_per_chunk")
    precision = validation.check_precision(precision)
    if validation.is_traced(params, X):
        raise TypeError("train_per_sample runs its own compiled loop: call it outside jax.jit")
    params, X, n_valid, _ = prepare_batch(params, X)
    X = X if n_valid is None else X[:n_valid]
    _check_finite_values(params, X)
    N, dtype = X.shape[0], params.A.dtype
    optimizer = gradient_descent(lr)
    copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (N, *p.shape)), _strong(params))
    copies = _strong(copies)
    carry = _Carry(copies, optimizer.init(params), copies, jnp.zeros((N,), bool))
    static = dict(optimizer=optimizer, grad="manual", length=epochs_per_chunk,
                  batch_size=None, chunk_size=None, n_valid=None, precision=precision)
    total = jnp.asarray(epochs, jnp.int32)
    losses: list[np.ndarray] = []
    start = 0
    with (tqdm(total=epochs, desc="train_per_sample", unit="epoch", leave=False) if progress
          else _NoBar()) as bar:
        while start < epochs:
            carry, chunk_losses = _run_chunk_per_sample(
                carry, X[:, None, :], jnp.asarray(start, jnp.int32), total, **static
            )
            done = min(epochs_per_chunk, epochs - start)
            losses.append(np.asarray(chunk_losses)[:, :done])
            bad = ~np.isfinite(losses[-1])
            if bad.any():
                j = int(np.argmax(bad.any(axis=0)))  # first epoch of the chunk with a bad loss
                i = int(np.argmax(bad[:, j]))  # first sample with a bad loss there
                diverged = np.asarray(carry.bad)  # (N,)
                result_params = _select_rows(carry.bad, carry.last_good, carry.params)
                result = TrainResult(result_params, jnp.asarray(np.concatenate(losses, axis=1)))
                raise DivergenceError(
                    f"sample {i} (of {int(diverged.sum())} diverged): "
                    + _divergence_message(start + j, float(losses[-1][i, j]), lr, False),
                    result, start + j, lr,
                )
            start += done
            bar.update(done)
            bar.set_postfix(mean_loss=f"{float(losses[-1][:, -1].mean()):.6g}")
    all_losses = np.concatenate(losses, axis=1) if losses else np.zeros((N, 0), dtype)
    return TrainResult(carry.params, jax.device_put(all_losses.astype(dtype)))
