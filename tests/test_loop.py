"""The compiled epoch loop (``engine.loop.run_chunk``): a chunk of epochs of any step is one
while_loop with a traced trip count, compiled once for every chunk, length and learning
rate, doing exactly its epochs of work and stopping at the first non-finite loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def test_a_run_the_host_does_not_act_in_is_one_program(monkeypatch):
    """A run of one chunk without callbacks or a checkpoint is one compiled call (the state
    built, the epochs, the held-out evaluations, patience, the result params and the inputs'
    check inside) and returns what the chunked host loop returns (to 1e-12: another
    program, compiled on its own, may round a last bit otherwise)."""
    from abc_jax.engine import pipeline

    params, X = make_problem()
    T = jnp.sin(X[:, :O] * 1.7)
    held = abc_jax.Batch(X[:6] * 0.8 + 0.3, T=-T[:6])  # worse as training fits T
    calls = []
    whole = pipeline.run_whole

    def counted(*args, **kwargs):
        calls.append(1)
        return whole(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_whole", counted)
    batch = abc_jax.Batch(X, T=T)
    for kw in (dict(lr=LR, epochs=23), dict(lr=0.1, epochs=40, eval_data=held, patience=2,
                                              eval_every=3)):
        with compilations() as seen:
            one = train(params, batch, progress=False, **kw)
        assert len(calls) == 1 and not {"run_chunk", "start_state", "final"} & {
            s.split("(")[-1].rstrip(")") for s in seen}
        chunked = train(params, batch, progress=False, epochs_per_chunk=4, **kw)
        assert len(calls) == 1  # many chunks: the host's loop
        calls.clear()
        for a, b in zip(one, chunked, strict=True):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
    assert one.eval_epochs[-1] < 40  # patience stopped it, in the one program too
    errors = []
    for every in (100, 4):  # a divergence: the same error and result
        with pytest.raises(DivergenceError) as info:
            train(params, batch, lr=40.0, epochs=30, progress=False, epochs_per_chunk=every)
        errors.append(info.value)
    assert len(calls) == 1 and errors[0].epoch == errors[1].epoch > 0
    for x, y in zip(jax.tree.leaves(errors[0].result), jax.tree.leaves(errors[1].result),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)


def test_members_start_in_one_program_and_go_on_compacted(monkeypatch):
    """train_many's first chunk is the one program too; once no more than half its members
    run it ends, and the survivors go on alone in the host's loop: every member as in a
    run of many short chunks."""
    from abc_jax.engine import pipeline

    params, X = make_problem()
    lrs = [0.05, 3e3, 4e3, 0.02, 5e3, 6e3, 7e3, 0.04]  # five diverge within a few epochs
    calls, sizes = [], []
    whole, run_chunk = pipeline.run_whole, pipeline.run_chunk
    monkeypatch.setattr(pipeline, "run_whole", lambda *a, **k: calls.append(1) or whole(*a, **k))
    monkeypatch.setattr(pipeline, "run_chunk", lambda s, *a, **k: sizes.append(
        s.bad.shape[0]) or run_chunk(s, *a, **k))
    r = abc_jax.train_many(params, X, lr=lrs, epochs=50, progress=False)
    assert calls == [1] and sizes and set(sizes) == {3}  # the 3 survivors, alone
    monkeypatch.undo()
    short = abc_jax.train_many(params, X, lr=lrs, epochs=50, progress=False, epochs_per_chunk=6)
    np.testing.assert_array_equal(r.diverged_at, short.diverged_at)
    assert np.asarray(r.diverged).sum() == 5
    np.testing.assert_allclose(r.losses, short.losses, rtol=1e-12)
    for a, b in zip(r.params, short.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
