"""The compiled training loop: the update rule and epochs in a ``lax.while_loop``.

One epoch on the full batch, with p_e the parameters before epoch e and s_e
the optimizer state::

    L_e, g_e       = batch_loss(p_e, X), d batch_loss / dp (p_e)
    u_e, s_{e+1}   = optimizer.update(g_e, s_e, p_e)
    p_{e+1}        = p_e + u_e

The homework's rule p <- p - lr * g is ``gradient_descent(lr)``, an Optax
transformation whose state holds lr, so both go through one step and the
learning rate is data: one compiled loop serves every lr.

With ``batch_size = b`` an epoch is a pass over a fresh permutation (key
``fold_in(key, e)``) of the rows with a non-zero weight, cut into ceil(n / b)
mini-batches, the last holding the n mod b rows left over; one update per
mini-batch, and the epoch's loss is the weighted mean of its batch losses,
each at the parameters before its own update. The permutation is over the real
rows in their global order, so padding, devices and processes do not change
which rows a batch holds.

``run_chunk`` runs up to ``length`` epochs (``_chunk``); ``run_chunk_members``
vmaps it over members (copies of the state, keys, data). The host side is in
``training`` and ``population``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from abc_jax import validation
from abc_jax.backward import _value_and_grad
from abc_jax.model import Batch, Params, _batch_loss


class GDState(NamedTuple):
    """State of ``gradient_descent``: the learning rate, as data."""

    lr: jax.Array  # ()


def gd_update(grads: Any, state: GDState, params: Any = None) -> tuple[Any, GDState]:
    del params
    return jax.tree.map(lambda g: -state.lr * g, grads), state


def gradient_descent(lr: float) -> optax.GradientTransformation:
    """The homework's rule p <- p - lr * g, as an Optax transformation.

    ``init(params)`` puts lr into the state, in the params' dtype;
    ``update(grads, state, params) -> (-lr * grads, state)``: the arithmetic of
    ``optax.sgd(lr)``. Every lr shares one ``update``, so one compiled loop.
    """
    lr = validation.check_finite_float(lr, "lr", positive=True)

    def init(params: Any) -> GDState:
        return GDState(jnp.asarray(lr, jax.tree.leaves(params)[0].dtype))

    return optax.GradientTransformation(init, gd_update)


class State(NamedTuple):
    """The loop's carry."""

    params: Params  # parameters before the next epoch
    opt_state: Any
    last_good: Params  # parameters at the start of the last epoch with a finite loss
    bad: jax.Array  # () bool: an epoch's loss was not finite; the loop has stopped


def _step(update: Any, extra: bool, grad: str, chunk_size: int | None, params: Params,
          opt_state: Any, batch: Batch) -> tuple[jax.Array, Params, Any]:
    """Loss and gradient on ``batch``, then p, s <- p + u, s' with (u, s') = update(g, s, p)."""
    if grad == "manual":
        loss, grads = _value_and_grad(params, batch, chunk_size)
    else:
        loss, grads = jax.value_and_grad(_batch_loss)(params, batch)
    if extra:  # optax.GradientTransformationExtraArgs: value, grad and value_fn (L-BFGS)
        updates, opt_state = update(grads, opt_state, params, value=loss, grad=grads,
                                    value_fn=lambda p: _batch_loss(p, batch))
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
           stop: jax.Array, *, update: Any, extra: bool, grad: str, length: int,
           batch_size: int | None, n_rows: int, chunk_size: int | None,
           precision: str) -> tuple[State, jax.Array]:
    """Epochs start .. min(start + length, stop) - 1 in one ``lax.while_loop``.

    The trip count is traced (E epochs do E epochs of work). Stops after the
    first epoch whose loss is not finite (its update is not applied). Returns
    the state and the (length,) losses, NaN for epochs not run. Traced at
    ``precision``, so it reaches autodiff's products.
    """
    step = functools.partial(_step, update, extra, grad, chunk_size)

    def epoch(s: State, e: jax.Array) -> tuple[State, jax.Array]:
        if batch_size is None:
            loss, params, opt_state = step(s.params, s.opt_state, batch)
        else:
            loss, params, opt_state = _minibatch_epoch(
                step, batch_size, n_rows, s.params, s.opt_state, batch, jax.random.fold_in(key, e))
        ok = jnp.isfinite(loss)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        return State(keep(params, s.params), keep(opt_state, s.opt_state),
                      keep(s.params, s.last_good), ~ok), loss

    def body(carry: tuple[jax.Array, State, jax.Array]) -> tuple[jax.Array, State, jax.Array]:
        i, s, losses = carry
        s, loss = epoch(s, start + i)
        return i + 1, s, losses.at[i].set(loss.astype(losses.dtype))

    count = jnp.clip(stop - start, 0, length)
    losses = jnp.full((length,), jnp.nan, state.params.A.dtype)
    with jax.default_matmul_precision(precision):
        _, state, losses = lax.while_loop(lambda c: (c[0] < count) & ~c[1].bad, body,
                                          (jnp.zeros((), start.dtype), state, losses))
    return state, losses


_STATIC = ("update", "extra", "grad", "length", "batch_size", "n_rows", "chunk_size",
           "precision")
run_chunk = jax.jit(_chunk, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "batch_axes"))
def run_chunk_members(state: State, batch: Batch, keys: Any, start: jax.Array, stop: jax.Array,
                      *, batch_axes: Any = 0, **static: Any) -> tuple[State, jax.Array]:
    """``_chunk`` vmapped over M members: (state (M, ...), losses (M, length)).

    The state's leaves and ``keys`` (M,) (or None) carry a leading member axis;
    ``batch_axes`` says which batch fields do (a ``Batch`` of 0 for a field per
    member, None for one shared, e.g. ``Batch(None, 0, None)``: one X, weights
    per member; or 0: all). Under vmap the ``while_loop`` goes on while any
    member runs, and a member that stopped (its loss was not finite) keeps its
    carry: its state is frozen, its later losses stay NaN.
    """
    def one(s: State, b: Batch, k: Any) -> tuple[State, jax.Array]:
        return _chunk(s, b, k, start, stop, **static)

    return jax.vmap(one, in_axes=(0, batch_axes, None if keys is None else 0))(state, batch, keys)
