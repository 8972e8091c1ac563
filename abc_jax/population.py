"""Many models in one compiled loop: seeds, learning rates, per-member data.

``train_many`` trains M members at once: ``train``'s compiled chunk vmapped over a
leading member axis of the loop's state, the mini-batch keys and any per-member
data. Member m follows ``train(params[m], data[m], lr=lr[m], key=keys[m], ...)``:
the same mini-batches and updates, to rounding. Per member, the rest shared:

    params   Params with a leading M axis (e.g. one ``init_params`` per seed), or one
             Params broadcast to every member
    lr       an array (M,) or one number (the hand-rolled rule keeps lr in its state
             as data, so per-member lr is a stacked ``GDState``); with an Optax
             optimizer, lr sets ``optax.inject_hyperparams``'s learning_rate per member
    key      one key, member m shuffling with ``fold_in(key, m)``, or keys (M,)
    data     X (M, N, D), weights (M, N), targets T (M, N, O) in a ``Batch``; each
             field shared or per member on its own

A member whose loss becomes NaN or inf is frozen there (the vmapped ``while_loop``
goes on while any member runs; a stopped member keeps its carry and still costs
its share of each epoch) and reported in ``diverged``/``diverged_at``. Several
devices split the MEMBERS (``mesh=``): each computes its share, shared data on
every device; a member's rows stay on its device (a sharded X is refused).
``train_per_sample`` is the case of one member per row.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import validation
from abc_jax.checkpoint import fingerprint, restore, save_checkpoint
from abc_jax.loop import GDState, State, run_chunk_members
from abc_jax.members import (
    check_mesh,
    check_values,
    count_members,
    key_members,
    member_data,
    member_keys,
    member_lr,
    member_params,
    on_devices,
    rows_per_member,
)
from abc_jax.model import Batch, Params, prepare
from abc_jax.training import (
    EPOCHS_PER_CHUNK,
    DivergenceError,
    TrainResult,
    _advice,
    _progress_bar,
    _raise_if_overflow,
    _run_chunks,
    _strong,
    chunk_static,
)


class TrainManyResult(NamedTuple):
    """What ``train_many`` returns; M members, E epochs."""

    params: Params  # A (M, H, D), B (M, H, D), C (M, O, H); a diverged member's last finite
    losses: jax.Array  # (M, E): losses[m, e] before update e; NaN/inf from a divergence on
    diverged: jax.Array  # (M,) bool
    diverged_at: jax.Array  # (M,) int: the first epoch with a non-finite loss, -1 if none


def _initial(optimizer: Any, params: Params, lr: Any, M: int) -> State:
    """The loop's carry before epoch 0 for every member: stacked params and optimizer state."""
    dtype = params.A.dtype
    P = Params(*(jnp.broadcast_to(a, (M, *a.shape[-2:])) for a in params))
    if optimizer is None:
        opt = GDState(jnp.broadcast_to(jnp.asarray(lr, dtype), (M,)))
    else:
        opt = jax.vmap(optimizer.init)(P)
        if lr is not None:
            hyper = getattr(opt, "hyperparams", None)
            if not isinstance(hyper, dict) or "learning_rate" not in hyper:
                raise TypeError("lr with an optimizer sets its learning rate per member: give "
                                "an optax.inject_hyperparams optimizer, e.g. optax."
                                "inject_hyperparams(optax.adam)(learning_rate=1e-3), or lr=None")
            rate = jnp.broadcast_to(jnp.asarray(lr, hyper["learning_rate"].dtype), (M,))
            opt = opt._replace(hyperparams=hyper | {"learning_rate": rate})
    return _strong(State(P, opt, P, np.zeros((M,), bool)))


def _settings(params: Params, batch: Batch, opt_state: Any, lr: Any, grad: str,
              batch_size: Any, keys: Any, M: int) -> dict[str, Any]:
    """What identifies a run of members, for its checkpoint (speed knobs left out)."""
    if keys is not None and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)

    def rows(a: Any) -> list[float]:  # moments of the rows of every member
        return fingerprint(a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a[:, None])

    return {"M": M, "D": params.A.shape[-1], "H": params.A.shape[-2], "O": params.C.shape[-2],
            "dtype": str(params.A.dtype), "lr": None if lr is None else np.asarray(lr).tolist(),
            "grad": grad, "batch_size": batch_size,
            "key": None if keys is None else np.asarray(keys).tolist(),
            "opt_state": str(jax.tree.structure(opt_state)),
            "data_shapes": [None if a is None else list(a.shape) for a in batch],
            "data_fingerprint": [v for a in batch if a is not None for v in rows(a)],
            "params_fingerprint": [v for p in params for v in rows(p)]}


def _checkpointed(checkpoint_dir: Any, state: State, settings: dict[str, Any], epochs: int,
                  hooks: list[Any]) -> tuple[State, int, list[np.ndarray]]:
    """(state, epoch, [losses (M, epoch)]) from the checkpoint (all of State), or the start;
    a hook that writes the checkpoint after every chunk."""
    hooks.append(lambda s, e, ls: save_checkpoint(
        checkpoint_dir, state=tuple(s), epoch=e, losses=np.concatenate(ls, axis=1),
        settings=settings))
    found = restore(checkpoint_dir, like=tuple(state), settings=settings, epochs=epochs)
    if found is None:
        return state, 0, []
    stored, start, old, _ = found
    return State(*_strong(stored)), start, [old]


def _all_diverged(state: State, epoch: int, losses: list[np.ndarray]) -> bool:
    """A hook: stop once every member has diverged."""
    return bool(np.all(np.asarray(state.bad)))


def _advance(state: State, epoch: int, losses: list[np.ndarray], *, bar: Any) -> None:
    """The progress hook (returns None: never stops the run)."""
    bar.update(losses[-1].shape[-1])


def _result(state: State, losses: list[np.ndarray], M: int, epochs: int) -> TrainManyResult:
    """Params (a diverged member's last finite), losses NaN-padded to ``epochs``, where."""
    L = np.concatenate([np.zeros((M, 0)), *losses], axis=1)
    L = np.pad(L, ((0, 0), (0, epochs - L.shape[1])), constant_values=np.nan)
    bad = ~np.isfinite(L)
    at = np.where(bad.any(axis=1), np.argmax(np.pad(bad, ((0, 0), (0, 1))), axis=1), -1)
    frozen = jnp.asarray(at >= 0)
    params = jax.tree.map(lambda g, p: jnp.where(frozen[:, None, None], g, p),
                          state.last_good, state.params)
    return TrainManyResult(params, jnp.asarray(L, state.params.A.dtype), frozen, jnp.asarray(at))


def train_many(params: Params, X: Any, *, lr: Any = None, epochs: int, optimizer: Any = None,
               grad: str = "manual", batch_size: int | None = None, key: Any = None,
               members: int | None = None, chunk_size: int | None = None,
               progress: bool = True, checkpoint_dir: str | os.PathLike[str] | None = None,
               epochs_per_chunk: int = EPOCHS_PER_CHUNK, precision: str | None = None,
               mesh: Any = None) -> TrainManyResult:
    """Train M members in one compiled loop; member m is ``train`` on its own arguments.

    params: ``Params`` A (M, H, D), B (M, H, D), C (M, O, H), or (H, D), (H, D), (O, H)
    shared. X: (N, D) shared, (M, N, D), or a ``Batch`` whose X, weights ((N,) or
    (M, N)) and T ((N, O) or (M, N, O)) are each shared or per member. lr: a number or
    (M,); with ``optimizer`` None, or the per-member learning_rate of an
    ``optax.inject_hyperparams`` optimizer. key: one key (member m: ``fold_in(key, m)``)
    or keys (M,). members: M, needed only when no argument carries it. The rest as in
    ``train``: epochs, grad, batch_size (with per-member weights, every member needs the
    same count of non-zero weights), chunk_size, precision (speed knobs), progress,
    epochs_per_chunk; checkpoint_dir holds every member's state after each chunk, a later
    call continues from it (another run's is refused). mesh: a ``data_mesh()`` whose
    devices split the members evenly (the same results as on one device), None: one device.

    Returns ``TrainManyResult(params, losses (M, epochs), diverged (M,), diverged_at (M,))``:
    a member whose loss became NaN/inf at epoch e is frozen there: its params are those
    before epoch e - 1's update (as ``DivergenceError.result``), losses[m, e] the
    non-finite loss, NaN after. A loss that overflows at the initial params is a
    divergence at epoch 0 here (``train`` raises FloatingPointError).

    Raises ValueError or TypeError (a bad argument, named, before any tracing; sizes of
    member axes that disagree; a sharded X: devices split members, not rows).
    """
    if validation.is_traced(params, X, lr, key):
        raise TypeError("train_many runs its own compiled loop: call it outside jax.jit/vmap")
    static = chunk_static(optimizer, epochs, grad, batch_size, key, epochs_per_chunk,
                          precision, chunk_size)
    if key is not None and key_members(key) is None:
        validation.check_key(key)
    params, m_params = member_params(params)
    batch, axes, sizes = member_data(X, params.A.shape[-1], params.C.shape[-2],
                                      params.A.dtype)
    lr, m_lr = member_lr(lr, optimizer)
    sizes |= {k: v for k, v in (("params", m_params), ("lr", m_lr), ("key", key_members(key)))
              if v is not None}
    M = count_members(sizes, members)
    mesh = check_mesh(mesh, M)
    if jax.process_count() > 1:
        raise ValueError("train_many runs in one process: call it in each with its own members")
    check_values(params, batch)
    static["n_rows"] = rows_per_member(batch) if batch_size else 0
    state, keys = _initial(optimizer, params, lr, M), member_keys(key, M)
    start, losses, hooks = 0, [], [_all_diverged]
    if checkpoint_dir is not None:
        settings = _settings(params, batch, state.opt_state, lr, grad, batch_size, keys, M)
        state, start, losses = _checkpointed(checkpoint_dir, state, settings, epochs, hooks)
    state, keys, batch = on_devices(mesh, state, keys, batch, axes)
    run = functools.partial(run_chunk_members, batch_axes=axes)
    with _progress_bar(progress, epochs, start, f"train_many ({M} members)") as bar:
        hooks.append(functools.partial(_advance, bar=bar))
        stop = start if _all_diverged(state, start, losses) else epochs  # a resumed run
        state, losses = _run_chunks(run, state, batch, keys, start, stop, losses, static, hooks)
    return _result(state, losses, M, epochs)


def train_per_sample(params: Params, X: Any, *, lr: float, epochs: int, progress: bool = True,
                     epochs_per_chunk: int = EPOCHS_PER_CHUNK,
                     precision: str | None = None) -> TrainResult:
    """The homework's first experiment: one copy of the params trained on each sample.

    Copy i follows p <- p - lr * dL(p, X[i])/dp for ``epochs`` epochs, exactly
    ``train(params, X[i:i+1], lr=lr, epochs=epochs)``: ``train_many`` with one member per
    row. The homework then averaged the matrices::

        jax.tree.map(lambda p: p.mean(0), result.params)

    ``params`` is the common start; X (N, D) or a ``Batch`` (rows of weight 0 are dropped;
    copy i learns its row's target T[i]); the other arguments as in ``train``.

    Returns:
      ``TrainResult`` with params A (N, H, D), B (N, H, D), C (N, O, H) and
      losses (N, epochs): losses[i, e] = L(p_i,e, X[i]), before update e.

    Raises:
      DivergenceError: a copy's loss became NaN or inf; names the sample that diverged
        first. Every other copy has run all epochs: ``.result`` holds every copy's last
        finite params and all losses, NaN/inf from a copy's divergence on.
    """
    if validation.is_traced(params, X):
        raise TypeError("train_per_sample runs its own compiled loop: call it outside jax.jit")
    if lr is None:
        raise TypeError("lr is required without an optimizer (the rule p <- p - lr * g)")
    lr = validation.check_finite_float(lr, "lr", positive=True)  # one lr for every copy
    chunk_static(None, epochs, "manual", None, None, epochs_per_chunk, precision, None)
    params, batch = prepare(params, X)
    check_values(params, batch)
    keep = slice(None) if batch.weights is None else np.asarray(batch.weights) > 0
    rows = Batch(jnp.asarray(batch.X)[keep], None, None if batch.T is None else batch.T[keep])
    r = train_many(params, Batch(*(None if a is None else a[:, None] for a in rows)), lr=lr,
                   epochs=epochs, progress=progress, epochs_per_chunk=epochs_per_chunk,
                   precision=precision)  # member i: the one row X[i] and its target T[i]
    at = np.asarray(r.diverged_at)
    if (at >= 0).any():
        e = int(at[at >= 0].min())
        i = int(np.flatnonzero(at == e)[0])
        if e <= 1:  # a sample's loss or gradient overflows at the initial params
            _raise_if_overflow(params, rows)
        raise DivergenceError(
            f"training diverged: sample {i}'s loss is {r.losses[i, e]} at epoch {e} "
            f"(lr={lr:g}); {int((at >= 0).sum())} of {len(at)} copies diverged; "
            f"{_advice(lr, False)}. The error's .result holds every copy's last finite params "
            "and all losses, NaN from a copy's divergence on",
            TrainResult(r.params, r.losses), e, lr)
    return TrainResult(r.params, r.losses)
