"""The compiled training loop: epochs in a ``lax.while_loop``, vmapped over members.

One epoch on the full batch (``abc_jax.core.update`` has the rule)::

    L_e, g_e       = batch_loss(p_e, X), d batch_loss / dp (p_e)
    u_e, s_{e+1}   = optimizer.update(g_e, s_e, p_e)
    p_{e+1}        = p_e + u_e

With ``batch_size = b`` an epoch is a pass over a fresh permutation (key
``fold_in(key, e)``) of the rows with a non-zero weight, cut into ceil(n / b)
mini-batches, the last holding the n mod b rows left over; one update per
mini-batch, and the epoch's loss is the weighted mean of its batch losses
(each weighted by the sum of its rows' weights), each at the parameters
before its own update. The permutation is over the real rows in their global
order, so padding, devices and processes do not change which rows a batch holds.

``run_chunk`` runs epochs ``start`` .. ``stop`` - 1 (at most ``length``) for M
members at once: the state, keys and any per-member data carry a leading member
axis. A member stops where its loss is not finite (``bad``: that update is not
applied) or where the host stopped it (``stopped``: patience spent, a callback
asked); under vmap the loop goes on while any member runs, and a stopped member
keeps its carry.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from abc_jax.core import backward, model
from abc_jax.core.model import Batch, Params
from abc_jax.engine import privacy as dp


class State(NamedTuple):
    """The loop's carry, for one member (a leading member axis on every leaf in a run)."""

    params: Params  # parameters before the next epoch
    opt_state: Any
    last_good: Params  # parameters at the start of the last epoch with a finite loss
    bad: jax.Array  # () bool: an epoch's loss was not finite; the member has stopped
    stopped: jax.Array  # () bool: stopped by the host (patience, a callback)


def _step(update: Any, extra: bool, grad: str, chunk_size: int | None, params: Params,
          opt_state: Any, batch: Batch) -> tuple[jax.Array, Params, Any]:
    """Loss and gradient on ``batch``, then p, s <- p + u, s' with (u, s') = update(g, s, p)."""
    if grad == "manual":
        loss, grads = backward.value_and_grad(params, batch, chunk_size)
    else:
        loss, grads = jax.value_and_grad(model.batch_loss)(params, batch)
    if extra:  # optax.GradientTransformationExtraArgs: value, grad and value_fn (L-BFGS)
        updates, opt_state = update(grads, opt_state, params, value=loss, grad=grads,
                                    value_fn=lambda p: model.batch_loss(p, batch))
    else:
        updates, opt_state = update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state


def _minibatch_epoch(step: Any, batch_size: int, n_rows: int, params: Params, opt_state: Any,
                     batch: Batch, key: jax.Array) -> tuple[jax.Array, Params, Any]:
    """One pass over a permutation of the n_rows rows of non-zero weight, b rows a step."""
    r = batch.weights
    rows = jnp.arange(batch.X.shape[0]) if r is None else jnp.nonzero(r > 0, size=n_rows)[0]
    perm = rows[jax.random.permutation(key, n_rows)]  # (n_rows,) positions in X
    n_full, rem = divmod(n_rows, batch_size)

    def one_batch(carry: Any, idx: jax.Array) -> tuple[Any, jax.Array]:
        sub = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), batch)  # X, weights, T rows
        loss, p, s = step(*carry, sub)
        weight = len(idx) if r is None else jnp.sum(sub.weights)
        return (p, s), jnp.stack([loss * weight, weight])

    carry, total = (params, opt_state), jnp.zeros(2, batch.X.dtype)
    if n_full:
        idx = perm[: n_full * batch_size].reshape(n_full, batch_size)
        carry, sums = lax.scan(one_batch, carry, idx)
        total = jnp.sum(sums, axis=0)
    if rem:
        carry, last = one_batch(carry, perm[n_full * batch_size:])
        total = total + last
    return total[0] / total[1], *carry


def _chunk(state: State, batch: Batch, key: jax.Array | None, start: jax.Array,
           stop: jax.Array, privacy: dp.PrivacyArrays | None, *, update: Any, extra: bool,
           grad: str, length: int, batch_size: int | None, n_rows: int,
           chunk_size: int | None, precision: str,
           private_steps: int = 0) -> tuple[State, jax.Array]:
    """One member's epochs start .. min(start + length, stop) - 1 in one ``lax.while_loop``.

    The trip count is traced (E epochs do E epochs of work). Returns the state
    and the (length,) losses, NaN for epochs not run. Traced at ``precision``,
    so it reaches autodiff's products. ``private_steps`` > 0: each epoch is that many
    DP-SGD steps (``engine.privacy``) with the member's knobs ``privacy`` (scalars).
    """
    step = functools.partial(_step, update, extra, grad, chunk_size)

    def epoch(s: State, e: jax.Array) -> tuple[State, jax.Array]:
        if private_steps:
            loss, params, opt_state = dp.private_epoch(
                update, chunk_size, private_steps, s.params, s.opt_state, batch, privacy,
                jax.random.fold_in(key, e))
        elif batch_size is None:
            loss, params, opt_state = step(s.params, s.opt_state, batch)
        else:
            loss, params, opt_state = _minibatch_epoch(
                step, batch_size, n_rows, s.params, s.opt_state, batch, jax.random.fold_in(key, e))
        ok = jnp.isfinite(loss)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        return State(keep(params, s.params), keep(opt_state, s.opt_state),
                     keep(s.params, s.last_good), ~ok, s.stopped), loss

    def body(carry: tuple[jax.Array, State, jax.Array]) -> tuple[jax.Array, State, jax.Array]:
        i, s, losses = carry
        s, loss = epoch(s, start + i)
        return i + 1, s, losses.at[i].set(loss.astype(losses.dtype))

    def running(carry: tuple[jax.Array, State, jax.Array]) -> jax.Array:
        i, s, _ = carry
        return (i < count) & ~s.bad & ~s.stopped

    count = jnp.clip(stop - start, 0, length)
    losses = jnp.full((length,), jnp.nan, state.params.A.dtype)
    with jax.default_matmul_precision(precision):
        _, state, losses = lax.while_loop(running, body,
                                          (jnp.zeros((), start.dtype), state, losses))
    return state, losses


@functools.partial(jax.jit, static_argnames=("update", "extra", "grad", "length", "batch_size",
                                             "n_rows", "chunk_size", "precision", "batch_axes",
                                             "private_steps"))
def run_chunk(state: State, batch: Batch, keys: Any, start: jax.Array, stop: jax.Array, *,
              batch_axes: Batch, privacy: dp.PrivacyArrays | None = None,
              **static: Any) -> tuple[State, jax.Array]:
    """``_chunk`` vmapped over M members: (state (M, ...), losses (M, length)).

    ``batch_axes`` says which batch fields carry the member axis (a ``Batch`` of
    0 for a field per member, None for one shared, e.g. ``Batch(None, 0, None)``:
    one X, weights per member); ``keys`` (M,) or None; ``privacy`` the DP-SGD knobs,
    each (M,) (data, not static), or None.
    """
    def one(s: State, b: Batch, k: Any, p: Any) -> tuple[State, jax.Array]:
        return _chunk(s, b, k, start, stop, p, **static)

    axes = (0, batch_axes, None if keys is None else 0, None if privacy is None else 0)
    return jax.vmap(one, in_axes=axes)(state, batch, keys, privacy)


@functools.partial(jax.jit, static_argnames=("batch_axes", "precision"))
def member_losses(params: Params, batch: Batch, *, batch_axes: Batch,
                  precision: str) -> jax.Array:
    """(M,) ``batch_loss`` of each member's params on its (or the shared) batch."""
    with jax.default_matmul_precision(precision):
        return jax.vmap(model.batch_loss, in_axes=(0, batch_axes))(params, batch)
