"""Training methods as functions: what the compiled loop runs for one member, one epoch.

A method is a ``Step``, a NamedTuple of functions as Optax's
``GradientTransformation`` is::

    state               = init(params, hyper)                member m's own state
    loss, params, state = epoch(params, state, batch, key, rows)

``epoch`` runs one member's epoch: batch X (N, D), weights (N,) or None, T (N, O)
or None; key the epoch's key (``fold_in(member's key, e)``, None if the method
draws nothing); rows the static count of rows of non-zero weight (0 unless the
method ``counts_rows``). The loss is ``batch_loss`` at the params before the
epoch's first update. Hyperparameters are data: ``Step.hyper`` holds each as a
number, shared by every member, or an array (M,), one value per member (the member
axis declared there, never read off a shape elsewhere); ``init`` gets member m's, as
scalars, and puts them in the state, so one compilation serves every value. The
compiled loop
(``engine.loop``) runs any step and knows none of them; a new method is one
constructor, here or beside its mathematics (``engine.privacy.private``).

The methods::

    gradient_step(optimizer, lr=, grad=)  one update on the whole batch
    minibatches(step, batch_size)         a shuffled pass, one ``step`` per mini-batch
    engine.privacy.private(DPSGD(...))    DP-SGD: S = round(1 / q) private updates
    engine.second_order.levenberg_marquardt()   one damped Gauss-Newton step, its damping adapted
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from abc_jax import edge
from abc_jax.core import backward, model
from abc_jax.core.model import Batch, Params
from abc_jax.core.update import GDState, gd_update
from abc_jax.engine import arguments

GRADS = ("manual", "oracle")


class Step(NamedTuple):
    """A training method for one member (module docstring).

    init: (params, hyper) -> state, hyper one member's hyperparameters (name -> scalar).
    epoch: (params, state, batch, key, rows) -> (loss, params, state).
    hyper: name -> a number (every member's) or a tuple (M,) (one per member).
    draws: what ``epoch`` draws from its key (named in messages), None: it needs none.
    counts_rows: ``epoch`` needs ``rows``, the static count of non-zero-weight rows.
    settings: what identifies the method (JSON), for checkpoints.
    report: (epochs run (M,), rows (M,)) -> extra result fields (privacy's epsilon), or None.
    """

    init: Callable[[Params, dict[str, jax.Array]], Any]
    epoch: Callable[..., tuple[jax.Array, Params, Any]]
    hyper: Mapping[str, Any] = {}  # never mutated: constructors build new dicts
    draws: str | None = None
    counts_rows: bool = False
    settings: Mapping[str, Any] = {}  # never mutated: constructors build new dicts
    report: Callable[[Any, Any], dict[str, Any]] | None = None


def members(step: Step) -> dict[str, int]:
    """{name: M} of the step's hyperparameters given one per member."""
    return dict(arguments.sizes_of(dict(step.hyper)))


def check_optimizer(optimizer: Any, name: str = "optimizer") -> Any:
    """None or an ``optax.GradientTransformation`` (init and update)."""
    if optimizer is not None and not all(callable(getattr(optimizer, f, None))
                                         for f in ("init", "update")):
        raise TypeError(f"{name} must be an optax.GradientTransformation (init and update) or "
                        f"None for the hand-rolled rule, got {type(optimizer).__name__}")
    return optimizer


def init_gd(params: Params, hyper: dict[str, jax.Array]) -> GDState:
    """The hand-rolled rule's state: its learning rate, in the params' dtype."""
    return GDState(jnp.asarray(hyper["lr"], params.A.dtype))


@functools.cache
def optax_init(optimizer: Any) -> Callable[[Params, dict[str, jax.Array]], Any]:
    """``optimizer.init``, with an ``optax.inject_hyperparams`` optimizer's hyperparameters
    replaced by the member's (``hyper["optimizer.NAME"]``)."""
    def init(params: Params, hyper: dict[str, jax.Array]) -> Any:
        state = optimizer.init(params)
        mine = {k[len("optimizer."):]: v for k, v in hyper.items() if k.startswith("optimizer.")}
        if mine:
            state = state._replace(hyperparams={
                k: jnp.asarray(mine.get(k, v), jnp.asarray(v).dtype)
                for k, v in state.hyperparams.items()})
        return state

    return init


def rule(optimizer: Any, lr: Any) -> tuple[Callable[..., Any], Any, dict[str, Any],
                                           dict[str, Any]]:
    """(init, update, hyper, settings) of the update rule: ``optimizer``, or the hand-rolled
    p <- p - lr g (``gradient_descent``) with lr a number or (M,) as data.

    An ``optax.inject_hyperparams`` optimizer's hyperparameters are each a number or an
    array (M,), one value per member (its state's ``hyperparams``, where Optax keeps them).
    """
    check_optimizer(optimizer)
    if optimizer is None:
        if lr is None:
            raise TypeError("lr is required without an optimizer (the rule p <- p - lr * g): "
                            "pass lr=0.1, or optimizer=optax.adam(1e-3)")
        lr = arguments.per_member(lr, "lr", 0.0, strict=True)
        return init_gd, gd_update, {"lr": lr}, {"optimizer": "gradient_descent",
                                                "lr": arguments.jsonable(lr)}
    if lr is not None:
        raise TypeError("lr goes with the hand-rolled rule (optimizer=None); an optimizer "
                        "carries its own rate, e.g. optimizer=optax.adam(1e-3); one rate per "
                        "member: optax.inject_hyperparams(optax.adam)(learning_rate=rates), "
                        "rates an array (M,)")
    return optax_init(optimizer), optimizer.update, optax_hyper(optimizer), {"optimizer": "optax"}


@functools.cache
def optax_hyper(optimizer: Any) -> dict[str, Any]:
    """An ``optax.inject_hyperparams`` optimizer's hyperparameters as given (numbers or
    (M,)), named "optimizer.NAME"; {} for others. Read once per optimizer from its state."""
    probe = Params(*(jnp.zeros((1, 1)) for _ in range(3)))  # JAX's widest float: no rounding
    hyper = getattr(optimizer.init(probe), "hyperparams", None)
    return {f"optimizer.{k}": arguments.per_member(np.asarray(v), f"optimizer's {k}",
                                                   -np.inf, strict=True)
            for k, v in (hyper if isinstance(hyper, dict) else {}).items()}


def takes_extra(optimizer: Any) -> bool:
    """Whether ``optimizer.update`` gets value, grad and value_fn (``optax.lbfgs()``)."""
    return isinstance(optimizer, optax.GradientTransformationExtraArgs)


def needs_value(optimizer: Any) -> bool:
    """Whether ``optimizer.update`` cannot run on a gradient alone (it needs value, grad,
    value_fn, as ``optax.lbfgs()``'s line search does): traced abstractly, nothing runs."""
    if optimizer is None or not takes_extra(optimizer):
        return False
    g = jax.ShapeDtypeStruct((2,), jnp.float32)
    try:
        jax.eval_shape(lambda g: optimizer.update(g, optimizer.init(g), g), g)
    except TypeError as e:
        return "value" in str(e)
    return False


# --- one update on the whole batch ---------------------------------------------------


@functools.cache
def full_batch_epoch(update: Any, extra: bool, grad: str,
                     chunk_size: int | None) -> Callable[..., Any]:
    """The epoch of ``gradient_step`` (one function per setting, so one compilation)::

        L, g   = batch_loss(p, batch), d batch_loss / dp (p)   by hand or by jax.grad
        u, s'  = update(g, s, p)                               (+ value, grad, value_fn)
        p'     = p + u
    """
    def epoch(params: Params, state: Any, batch: Batch, key: Any,
              rows: int) -> tuple[jax.Array, Params, Any]:
        del key, rows
        if grad == "manual":
            loss, g = backward.value_and_grad(params, batch, chunk_size)
        else:
            loss, g = jax.value_and_grad(model.batch_loss)(params, batch)
        if extra:
            updates, state = update(g, state, params, value=loss, grad=g,
                                    value_fn=lambda p: model.batch_loss(p, batch))
        else:
            updates, state = update(g, state, params)
        return loss, optax.apply_updates(params, updates), state

    return epoch


def gradient_step(optimizer: Any = None, *, lr: Any = None, grad: str = "manual",
                  chunk_size: int | str | None = "auto") -> Step:
    """One update per epoch on the whole batch: u, s' = optimizer.update(g, s, p); p += u.

    optimizer: an ``optax.GradientTransformation`` (``GradientTransformationExtraArgs``
      such as ``optax.lbfgs()`` also get value, grad and value_fn), or None for the
      hand-rolled rule p <- p - lr g with ``lr`` a number > 0 or an array (M,).
    grad: "manual" (the hand derivation, ``batch_value_and_grad``) or "oracle" (``jax.grad``).
    chunk_size: rows per step of the gradient's contraction (memory; None: all at once).
    """
    if not isinstance(grad, str) or grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    chunk_size = edge.check_chunk_size(chunk_size)
    init, update, hyper, settings = rule(optimizer, lr)
    return Step(init, full_batch_epoch(update, takes_extra(optimizer), grad, chunk_size),
                hyper=hyper, settings={**settings, "grad": grad})


# --- mini-batches -------------------------------------------------------------------


@functools.cache
def minibatch_epoch(inner: Callable[..., Any], batch_size: int) -> Callable[..., Any]:
    """The epoch of ``minibatches(step, batch_size)`` for a step whose epoch is ``inner``."""
    def epoch(params: Params, state: Any, batch: Batch, key: jax.Array,
              rows: int) -> tuple[jax.Array, Params, Any]:
        r = batch.weights
        real = jnp.arange(batch.X.shape[0]) if r is None else jnp.nonzero(r > 0, size=rows)[0]
        perm = real[jax.random.permutation(key, rows)]  # (rows,) positions in X
        n_full, rem = divmod(rows, batch_size)

        def one_batch(carry: Any, idx: jax.Array) -> tuple[Any, jax.Array]:
            sub = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), batch)  # X, weights, T
            loss, p, s = inner(*carry, sub, None, len(idx))
            weight = len(idx) if r is None else jnp.sum(sub.weights)
            return (p, s), jnp.stack([loss * weight, jnp.asarray(weight, loss.dtype)])

        carry, total = (params, state), jnp.zeros(2, batch.X.dtype)
        if n_full:
            idx = perm[: n_full * batch_size].reshape(n_full, batch_size)
            carry, sums = lax.scan(one_batch, carry, idx)
            total = jnp.sum(sums, axis=0)
        if rem:
            carry, last = one_batch(carry, perm[n_full * batch_size:])
            total = total + last
        return total[0] / total[1], *carry

    return epoch


def minibatches(step: Step, batch_size: int) -> Step:
    """Each epoch a pass over a fresh permutation of the rows of non-zero weight (n of
    them, drawn from the epoch's key), cut into ceil(n / b) mini-batches, the last holding
    the n mod b left over; one ``step`` epoch (one update) per mini-batch. The epoch's
    loss is the mean of its batch losses weighted by their rows' weights, each at the
    params before its own update. Needs a key; the same n for every member.
    """
    if not isinstance(step, Step):
        raise TypeError(f"step must be an abc_jax Step (e.g. gradient_step(...)), got "
                        f"{type(step).__name__}")
    b = edge.check_positive_int(batch_size, "batch_size")
    if step.draws is not None or step.counts_rows:
        raise ValueError(f"batch_size: the step already draws its own {step.draws or 'rows'} "
                         "each epoch; mini-batches go with a plain gradient step: drop "
                         "batch_size (or build the step from gradient_step)")
    return step._replace(epoch=minibatch_epoch(step.epoch, b), draws="mini-batches",
                         counts_rows=True, settings={**step.settings, "batch_size": b})
