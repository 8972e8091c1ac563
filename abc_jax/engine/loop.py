"""The compiled training loop: any step's epochs in a ``lax.while_loop``, vmapped over members.

``run_chunk`` runs epochs ``start`` .. ``stop`` - 1 (at most ``length``) of M members
at once. Each iteration, for every member still running::

    if e % eval_every == 0:    held-out loss of p_e (a forward pass), best params kept,
                               patience counted; patience spent: the member stops
    L_e, p_{e+1}, s_{e+1} = step.epoch(p_e, s_e, batch, fold_in(key, e), rows)
    L_e not finite:            the member stops at p_e (``bad``; the update is dropped)

and at the chunk's end, if due there (at ``total``, the run's last params, always). The
step (``engine.steps``) is the only thing that knows the training method; the loop
knows no modes. The trip count is traced (E epochs do E epochs of work), the
evaluation and the stop are decided on the device, and every knob that is data
(learning rates, DP noise, keys) shares one compilation.

A chunk's results come back ``pack``ed in two arrays, so the host reads them in two
transfers. ``run_whole`` is a run's first chunk with what surrounds it (the state built
from the params, the inputs' values check, the result params) in the same program: a
short run the host does not act in costs one call.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from abc_jax.core import model
from abc_jax.core.model import Batch, Params


class State(NamedTuple):
    """The loop's carry for one member (a leading member axis on every leaf in a run)."""

    params: Params  # p_e, the parameters before the next epoch
    opt_state: Any  # the step's state (optimizer, hyperparameters as data)
    last_good: Params  # parameters at the start of the last epoch with a finite loss
    bad: jax.Array  # () bool: an epoch's loss was not finite; the member has stopped
    stopped: jax.Array  # () bool: stopped by patience or by the host (a callback)
    best: Params  # parameters of the lowest held-out loss so far (p_0 before any)
    best_loss: jax.Array  # () that loss, inf before any evaluation
    best_epoch: jax.Array  # () int, its epoch
    since: jax.Array  # () int, evaluations since it


def initial_state(params: Params, opt_state: Any) -> State:
    """The carry before epoch 0 (no leading axis: vmap it, or stack members' params)."""
    false = jnp.zeros(params.A.shape[:-2], bool)
    return State(params, opt_state, params, false, false, params,
                 jnp.full(false.shape, jnp.inf, params.A.dtype),
                 jnp.zeros(false.shape, jnp.int32), jnp.zeros(false.shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("init", "M"))
def start_state(params: Params, hyper: dict[str, Any], *, init: Any, M: int) -> State:
    """The carry before epoch 0 for M members: params (M, ...) stacked or broadcast, each
    member's step state ``init(params, hyper)`` from its hyperparameters (a number
    broadcast, an array (M,) one each)."""
    P = Params(*(jnp.broadcast_to(a, (M, *a.shape[-2:])) for a in params))
    H = {k: jnp.broadcast_to(v, (M,)) for k, v in hyper.items()}
    return initial_state(P, jax.vmap(init)(P, H))


class Final(NamedTuple):
    """What a result reads off the state at a run's end (M members)."""

    params: Params  # (M, ...) each member's result params, or (...) member 0's (``one``)
    best_epoch: jax.Array  # (M,) the epoch of each member's lowest held-out loss


@functools.partial(jax.jit, static_argnames=("best", "one"))
def final(state: State, *, best: bool, one: bool = False) -> Final:
    """Each member's result params: the best held-out ones with patience (``best``), else
    the last with a finite loss; ``one`` (``train``'s member 0, alone): the last finite
    ones once it diverged, the params its ``DivergenceError`` holds."""
    out = state.best if best else state.params
    if one or not best:  # a diverged member's last finite params
        out = _where(state.bad, state.last_good, out)
    if one:
        out = jax.tree.map(lambda a: a[0], out)
    return Final(out, state.best_epoch)


class Chunk(NamedTuple):
    """What a chunk returns besides the state, for M members and ``length`` epochs."""

    losses: jax.Array  # (M, length) L_e, NaN for epochs a member did not run
    evals: jax.Array  # (M, length + 1) held-out loss at epoch start + j, NaN if none
    evaluated: jax.Array  # (M, length + 1) bool: an evaluation was made there
    reached: jax.Array  # (M,) int: the epoch each member's params are at
    ran: jax.Array  # () int: the epochs the chunk ran (fewer than asked when ``floor`` hit)
    bad: jax.Array  # (M,) bool: state.bad at the chunk's end, read with the losses
    stopped: jax.Array  # (M,) bool: state.stopped at the chunk's end


class Packed(NamedTuple):
    """A ``Chunk`` in two arrays, which the host reads in two transfers instead of seven
    (with length L): values (M, 2L + 1) = [losses | evals]; counts (M, L + 6) int32 =
    [evaluated | reached | bad | stopped | ran | ok], ok a flag the program adds (True in
    a chunk, the inputs' values check in a whole run)."""

    values: jax.Array
    counts: jax.Array


def pack(out: Chunk, ok: Any = True) -> Packed:
    """``out`` and the () bool ``ok`` as a ``Packed``."""
    M = out.losses.shape[0]
    column = [out.reached, out.bad, out.stopped, jnp.broadcast_to(out.ran, (M,)),
              jnp.broadcast_to(ok, (M,))]
    return Packed(jnp.concatenate([out.losses, out.evals], axis=1),
                  jnp.concatenate([out.evaluated.astype(jnp.int32),
                                   *(c.astype(jnp.int32)[:, None] for c in column)], axis=1))


def unpack(packed: Packed) -> tuple[Chunk, bool]:
    """The host's ``Chunk`` (numpy) and ``ok`` from ``packed``, read in two transfers."""
    values, counts = (np.asarray(a) for a in packed)  # faster than jax.device_get here
    L = values.shape[1] // 2
    reached, bad, stopped, ran, ok = counts[:, L + 1:].T
    return Chunk(values[:, :L], values[:, L:], counts[:, :L + 1].astype(bool),
                 reached.astype(np.int64), int(ran[0]), bad.astype(bool),
                 stopped.astype(bool)), bool(ok[0])


def _where(mask: jax.Array, new: Any, old: Any) -> Any:
    """Leafwise ``new`` where ``mask`` (M,), else ``old``."""
    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _evaluate(s: State, held: Batch, held_axes: Batch, e: jax.Array, patience: int | None,
              skip: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    """Each running member's held-out loss at its params (one forward pass), the best kept,
    patience counted: (state, losses (M,) NaN where none was made, made (M,)); members in
    ``skip`` (M,) are not evaluated."""
    live = ~s.bad & ~s.stopped & ~skip
    L = jax.vmap(model.batch_loss, in_axes=(0, held_axes))(s.params, held)
    better = live & (L < s.best_loss)
    since = jnp.where(better, 0, s.since + live)
    stopped = s.stopped if patience is None else s.stopped | (live & (since >= patience))
    s = s._replace(best=_where(better, s.params, s.best),
                   best_loss=jnp.where(better, L, s.best_loss),
                   best_epoch=jnp.where(better, e, s.best_epoch).astype(s.best_epoch.dtype),
                   since=since.astype(s.since.dtype), stopped=stopped)
    return s, jnp.where(live, L, jnp.nan).astype(L.dtype), live


def chunk(state: State, batch: Batch, held: Batch | None, keys: Any, start: jax.Array,
          stop: jax.Array, total: jax.Array, seen: jax.Array, floor: jax.Array, *,
          epoch: Any, axes: Batch,
          held_axes: Batch | None, length: int, rows: int, eval_every: int,
          patience: int | None) -> tuple[State, Chunk]:
    """M members' epochs start .. min(start + length, stop) - 1 (module docstring).

    state: every leaf with a leading member axis M; batch and held: each field shared
    or per member as ``axes``/``held_axes`` say (``Batch`` of 0 or None); keys (M,) or
    None; total: the run's epochs (the last held-out evaluation is at ``total``); seen (M,)
    bool: members already evaluated at ``start`` (a run resumed or extended there); floor:
    the chunk ends early once no more than this many members run (the host then runs the
    rest on fewer members; -1: never).
    """
    M = state.bad.shape[0]
    dtype = state.params.A.dtype
    count = jnp.clip(stop - start, 0, length)
    step = jax.vmap(epoch, in_axes=(0, 0, axes, None if keys is None else 0, None))

    def evaluate(s: State, e: jax.Array, evals: jax.Array, done: jax.Array,
                 j: jax.Array) -> tuple[State, jax.Array, jax.Array]:
        if held is None:
            return s, evals, done

        def measure(s: State) -> tuple[State, jax.Array, jax.Array]:
            return _evaluate(s, held, held_axes, e, patience, seen & (e == start))

        def skip(s: State) -> tuple[State, jax.Array, jax.Array]:
            return s, jnp.full((M,), jnp.nan, dtype), jnp.zeros((M,), bool)

        due = (e % eval_every == 0) | (e == total)
        s, L, live = lax.cond(due, measure, skip, s)
        return s, evals.at[:, j].set(L), done.at[:, j].set(live)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, s, losses, evals, done, applied = carry
        e = start + i
        s, evals, done = evaluate(s, e, evals, done, i)
        run = ~s.bad & ~s.stopped
        k = None if keys is None else jax.vmap(jax.random.fold_in, (0, None))(keys, e)
        loss, params, opt_state = step(s.params, s.opt_state, batch, k, rows)
        ok = run & jnp.isfinite(loss)
        s = s._replace(params=_where(ok, params, s.params),
                       opt_state=_where(ok, opt_state, s.opt_state),
                       last_good=_where(ok, s.params, s.last_good),
                       bad=s.bad | (run & ~jnp.isfinite(loss)))
        losses = losses.at[:, i].set(jnp.where(run, loss, jnp.nan).astype(dtype))
        return i + 1, s, losses, evals, done, applied + ok

    def running(carry: tuple[Any, ...]) -> jax.Array:
        i, s = carry[:2]
        return (i < count) & (jnp.sum(~s.bad & ~s.stopped) > jnp.maximum(floor, 0))

    losses = jnp.full((M, length), jnp.nan, dtype)
    evals = jnp.full((M, length + 1), jnp.nan, dtype)
    done = jnp.zeros((M, length + 1), bool)
    zero = jnp.zeros((), jnp.asarray(start).dtype)
    applied = jnp.zeros((M,), jnp.int32)
    i, state, losses, evals, done, applied = lax.while_loop(
        running, body, (zero, state, losses, evals, done, applied))
    # the params the chunk ends at, if due (so the host's callbacks see that evaluation; the
    # next chunk, given ``seen``, does not repeat it)
    state, evals, done = evaluate(state, start + i, evals, done, i)
    return state, Chunk(losses, evals, done, (start + applied).astype(jnp.int32), i, state.bad,
                        state.stopped)


@functools.partial(jax.jit, static_argnames=("epoch", "axes", "held_axes", "length", "rows",
                                             "eval_every", "patience", "precision"))
def run_chunk(state: State, batch: Batch, held: Batch | None, keys: Any, start: jax.Array,
              stop: jax.Array, total: jax.Array, seen: jax.Array, floor: jax.Array, *,
              precision: str, **static: Any) -> tuple[State, Packed]:
    """``chunk``, compiled, traced at matmul ``precision`` (so it reaches autodiff's
    products): one compilation per step and shapes, whatever the data and the epochs. The
    chunk's results come packed (``unpack`` reads them)."""
    with jax.default_matmul_precision(precision):
        state, out = chunk(state, batch, held, keys, start, stop, total, seen, floor, **static)
    return state, pack(out)


@functools.partial(jax.jit, static_argnames=("axes", "precision"))
def member_losses(params: Params, batch: Batch, *, axes: Batch, precision: str) -> jax.Array:
    """(M,) ``batch_loss`` of each member's params on its (or the shared) batch."""
    with jax.default_matmul_precision(precision):
        return jax.vmap(model.batch_loss, in_axes=(0, axes))(params, batch)


@functools.partial(jax.jit, static_argnames=("init", "M", "best", "one", "keep", "check",
                                             "epoch", "axes", "held_axes", "length", "rows",
                                             "eval_every", "patience", "precision"))
def run_whole(params: Params, hyper: dict[str, Any], batch: Batch, held: Batch | None,
              keys: Any, total: jax.Array, floor: jax.Array, *, init: Any, M: int, best: bool,
              one: bool, keep: bool, check: Any, precision: str,
              **static: Any) -> tuple[Packed, Final, State | None]:
    """A run of ``total`` <= ``length`` epochs as one program: ``start_state``, the chunk
    from epoch 0 and ``final``; the packed chunk's ``ok`` is ``check(params, batch,
    held)``, the inputs' () bool values flag. ``keep``: the state too, for a run that may
    go on where the chunk ended early (``floor``); else it stays on the device, and a run
    the host does not act on before its end costs one call."""
    with jax.default_matmul_precision(precision):
        state = start_state(params, hyper, init=init, M=M)
        zero = jnp.zeros((), jnp.int32)
        state, out = chunk(state, batch, held, keys, zero, total, total, jnp.zeros(M, bool),
                           floor, **static)
    return (pack(out, check(params, batch, held)), final(state, best=best, one=one),
            state if keep else None)
