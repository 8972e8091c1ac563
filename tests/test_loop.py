"""The compiled epoch loop (``engine.loop.run_chunk``): a chunk of epochs of any step is one
while_loop with a traced trip count, compiled once for every chunk, length and learning
rate, doing exactly its epochs of work and stopping at the first non-finite loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from _reference import TRAIN_DIMS, TRAIN_LR, compilations, train_problem

import abc_jax
from abc_jax import DivergenceError, train
from abc_jax.engine import loop

D, H, O, N = TRAIN_DIMS  # all different: a transposed gradient cannot hide
LR = TRAIN_LR


make_problem = train_problem  # shared with the other training tests' files


def counting(optimizer, calls):
    """``optimizer`` whose update also counts, from inside the compiled loop, its calls."""

    def update(grads, state, params=None):
        jax.debug.callback(lambda: calls.append(1))
        return optimizer.update(grads, state, params)

    return optax.GradientTransformation(optimizer.init, update)


def test_a_run_does_exactly_its_epochs_of_work():
    params, X = make_problem()
    calls = []
    optimizer = counting(optax.sgd(LR), calls)
    r = train(params, X, epochs=10, optimizer=optimizer, progress=False,
              epochs_per_chunk=100)
    assert r.losses.shape == (10,) and len(calls) == 10  # not 100
    calls.clear()
    train(params, X, epochs=230, optimizer=optimizer, progress=False,
          epochs_per_chunk=100)
    assert len(calls) == 230
    calls.clear()  # a divergence stops the loop at the first non-finite loss
    with pytest.raises(DivergenceError) as info:
        train(params, X, epochs=100, optimizer=counting(optax.sgd(1e3), calls),
              progress=False, epochs_per_chunk=100)
    assert len(calls) == info.value.epoch + 1  # the epochs up to and with the bad one
    # the epochs of a chunk are one while_loop with a traced trip count, not a scan
    step = abc_jax.gradient_step(optax.sgd(LR))
    P = jax.tree.map(lambda a: a[None], params)
    state = loop.initial_state(P, jax.vmap(step.init)(P, {}))  # optax.sgd: no hyperparameters
    static = dict(epoch=step.epoch, axes=abc_jax.Batch(None, None, None), held_axes=None,
                  length=100, rows=0, eval_every=1, patience=None, precision="highest")
    jaxpr = str(jax.make_jaxpr(lambda c, b, s, e: loop.run_chunk(
        c, b, None, None, s, e, e, jnp.zeros(1, bool), -1, **static))(
        state, abc_jax.Batch(jnp.asarray(X)), jnp.int32(0), jnp.int32(10)))
    assert "while[" in jaxpr and "scan[" not in jaxpr


def test_one_compilation_serves_every_chunk():
    params, X = make_problem()
    optimizer = optax.sgd(0.01)  # a fresh transformation: a fresh cache entry
    with compilations() as seen:
        train(params, X, epochs=85, optimizer=optimizer, progress=False, epochs_per_chunk=20)
    assert seen.count("jit(run_chunk)") == 1  # 5 chunks, last one partial
    with compilations() as seen:  # another length, another start: the same compiled chunk
        train(params, X, epochs=33, optimizer=optimizer, progress=False, epochs_per_chunk=20)
    assert "jit(run_chunk)" not in seen
    # the learning rate of the default rule is data: every lr shares one compilation
    train(params, X, lr=0.0123, epochs=25, progress=False, epochs_per_chunk=20)
    with compilations() as seen:
        for lr in (0.0123, 0.02, 0.1):
            train(params, X, lr=lr, epochs=45, progress=False, epochs_per_chunk=20)
    assert "jit(run_chunk)" not in seen
