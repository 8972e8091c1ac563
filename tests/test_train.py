"""The training engine's entry points (``engine.train``): train, train_per_sample, train_many
and cross_validate. Each run equals a plain reference (the loss before each update, weighted
mini-batches, held-out losses at the reference loss), every member of train_many its own
train call (seeds, lrs, keys, data, weights, targets, Optax, held-out data, patience,
callbacks), divergence named with the last finite epoch, mini-batches use every row once."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import _reference
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import TRAIN_DIMS, TRAIN_LR, ref_batch_loss, train_problem

import abc_jax
from abc_jax import (
    Batch,
    DivergenceError,
    Params,
    TrainManyResult,
    TrainResult,
    init_params,
    train,
    train_many,
    train_per_sample,
)
from abc_jax.checkpoint import checkpoint_epoch
from abc_jax.engine import pipeline

D, H, O, N = TRAIN_DIMS  # all different: a transposed gradient cannot hide
M = 3  # members of train_many
LR = TRAIN_LR
EVERY = 10  # eval_every (and epochs_per_chunk): the evaluation period
KW = dict(progress=False, epochs_per_chunk=EVERY)  # several chunks per run
TESTS = Path(__file__).parent


make_problem = train_problem  # shared with the other training tests' files


def loss_at(params, X):
    return float(ref_batch_loss(params, X))


def assert_results_equal(a: TrainResult, b: TrainResult):
    """Bit for bit."""
    np.testing.assert_array_equal(np.asarray(a.losses), np.asarray(b.losses))
    for x, y in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_results_close(a: TrainResult, b: TrainResult, rtol: float, atol: float = 0.0):
    np.testing.assert_allclose(a.losses, b.losses, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(a.params, b.params, rtol=rtol, atol=atol)


# --- the update rule and Optax ----------------------------------------------


def test_losses_are_the_loss_before_each_update():
    params, X = make_problem()
    r = train(params, X, lr=LR, epochs=3, progress=False)
    p1 = jax.tree.map(lambda p, g: p - LR * g, params, jax.grad(ref_batch_loss)(params, X))
    assert r.losses.shape == (3,)
    np.testing.assert_allclose(r.losses[0], loss_at(params, X), rtol=1e-14)
    np.testing.assert_allclose(r.losses[1], loss_at(p1, X), rtol=1e-12)


# One optimizer per kind of state the loop carries (a trace, moments, a chain, a step count
# for a schedule); sgd itself: test_update.py. Each is a compilation of the loop.
OPTIMIZERS = {
    "momentum": optax.sgd(0.02, momentum=0.9),
    "adam": optax.adam(0.02),
    "clipped_chain": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05)),
    "exponential_decay": optax.sgd(
        optax.exponential_decay(0.05, transition_steps=20, decay_rate=0.5)
    ),
}


@pytest.mark.integration  # L-BFGS's line search alone compiles for seconds
def test_lbfgs_gets_its_extra_arguments():
    # GradientTransformationExtraArgs: update(..., value=, grad=, value_fn=) with a line search
    params, X = make_problem()
    r = train(params, X, epochs=15, optimizer=optax.lbfgs(), progress=False)
    assert np.all(np.isfinite(r.losses)) and r.losses[-1] < 0.05 * r.losses[0]
    # it took the line search: the same run by hand, optax's own loop, agrees
    opt = optax.lbfgs()

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(ref_batch_loss)(p, X)
        updates, state = opt.update(grads, state, p, value=value, grad=grads,
                                    value_fn=lambda q: ref_batch_loss(q, X))
        return value, optax.apply_updates(p, updates), state

    p, state = params, opt.init(params)
    for e in range(15):
        value, p, state = step(p, state)
        np.testing.assert_allclose(r.losses[e], value, rtol=1e-9)


def test_lr_is_any_real_scalar_and_optional_with_an_optimizer():
    params, X = make_problem()
    ref = train(params, X, lr=0.1, epochs=5, progress=False)
    for lr in (np.float32(0.1), jnp.array(0.1), np.array(0.1), 0.1):
        got = train(params, X, lr=lr, epochs=5, progress=False)
        np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-6)
    sgd = train(params, X, epochs=5, optimizer=optax.sgd(0.1), progress=False)  # no lr
    assert_results_close(sgd, ref, rtol=1e-12)
    with pytest.raises(TypeError, match="lr is required without an optimizer"):
        train(params, X, epochs=5, progress=False)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optax_optimizers_reduce_the_loss(name):
    params, X = make_problem()
    r = train(params, X, epochs=60, optimizer=OPTIMIZERS[name], progress=False,
              epochs_per_chunk=EVERY)
    losses = np.asarray(r.losses)
    assert losses.shape == (60,)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.2 * losses[0], (name, losses[0], losses[-1])


def test_manual_and_oracle_trajectories_agree():
    params, X = make_problem()
    kw = dict(lr=LR, epochs=120, progress=False, epochs_per_chunk=EVERY)
    manual = train(params, X, grad="manual", **kw)
    oracle = train(params, X, grad="oracle", **kw)
    chunked = train(params, X, grad="manual", chunk_size=3, **kw)
    assert_results_close(manual, oracle, rtol=1e-12)
    assert_results_close(manual, chunked, rtol=1e-12)
    with pytest.raises(ValueError, match="grad"):
        train(params, X, lr=LR, epochs=1, grad="autodiff")


# --- divergence -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_divergence_raises_with_the_last_finite_epoch(dtype):
    params, X = make_problem(dtype)
    lr = 1e3
    with pytest.raises(DivergenceError) as info:
        train(params, X, lr=lr, epochs=500, progress=False, epochs_per_chunk=EVERY)
    err = info.value
    message = str(err)
    assert f"epoch {err.epoch}" in message
    assert "lr=1000" in message and "smaller learning rate" in message
    assert err.lr == lr and 0 < err.epoch < 500
    result = err.result
    assert result.losses.shape == (err.epoch,)
    assert result.losses.dtype == dtype and result.params.A.dtype == dtype
    chex.assert_tree_all_finite(result)
    # result.params are the parameters whose loss is the last recorded one
    np.testing.assert_allclose(loss_at(result.params, X), result.losses[-1], rtol=1e-5)
    # the same run stopped one epoch earlier is the finite prefix
    before = train(params, X, lr=lr, epochs=err.epoch, progress=False, epochs_per_chunk=EVERY)
    np.testing.assert_array_equal(before.losses, result.losses)


@pytest.mark.parametrize(("dtype", "scale"), [
    (jnp.float32, 1e30), pytest.param(jnp.float64, 1e160, marks=pytest.mark.integration)])
def test_an_overflow_at_the_initial_params_is_not_a_divergence(dtype, scale):
    # X is finite, but its loss overflows the dtype before any update: no lr helps
    params, X = make_problem(dtype)
    assert np.all(np.isfinite(np.asarray(X * scale)))
    with pytest.raises(FloatingPointError) as info:
        train(params, X * scale, lr=LR, epochs=20, progress=False)
    assert not isinstance(info.value, DivergenceError)
    message = str(info.value)
    assert "at the initial parameters, before any update" in message
    assert "max |X|" in message and "max |param|" in message
    assert f"{np.finfo(dtype).max:.3g}" in message and f"overflows {np.dtype(dtype)}" in message
    assert "Rescale X" in message
    assert "No learning rate fixes this" in message and "lr=" not in message
    if dtype == jnp.float64:  # mini-batches too (a loop of its own, compiled once)
        with pytest.raises(FloatingPointError, match="initial parameters"):
            train(params, X * scale, lr=LR, epochs=20, batch_size=4, key=jax.random.key(0),
                  progress=False)


def test_divergence_with_an_optax_optimizer_mentions_its_own_learning_rate():
    params, X = make_problem()
    with pytest.raises(DivergenceError, match="lower the optimizer's own learning rate") as info:
        train(params, X, epochs=400, optimizer=optax.sgd(1e3), progress=False)
    assert "lr=" not in str(info.value).split(";")[0] and info.value.lr is None


def test_per_sample_divergence_names_the_sample():
    params, X = make_problem()
    named = r"sample \d+'s loss is .* at epoch \d+ \(lr=1000\); \d+ of 10 copies"
    with pytest.raises(DivergenceError, match=named) as info:
        train_per_sample(params, X, lr=1e3, epochs=200, progress=False)
    result = info.value.result
    assert result.params.A.shape == (N, H, D)
    chex.assert_tree_all_finite(result.params)


# --- determinism, dtypes, validation -----------------------------------------


@pytest.mark.parametrize("batch_size", [None, 4])
def test_same_inputs_same_bits(batch_size):
    params, X = make_problem()
    kw = dict(epochs=70, batch_size=batch_size, key=batch_size and jax.random.key(3),
              progress=False, epochs_per_chunk=EVERY, optimizer=optax.adam(0.02))
    # adam(0.02), batches of 4, chunks of 10: the configuration of test_checkpoint.py's
    # adam-minibatch run, so the two share one compiled loop through the persistent cache
    assert_results_equal(train(params, X, **kw), train(params, X, **kw))


def test_a_key_without_randomness_to_draw_is_refused():
    params, X = make_problem()
    for fn in (train, train_many):
        with pytest.raises(ValueError, match=r"key: .*draws nothing.*drop key"):
            fn(params, X, lr=LR, epochs=2, key=jax.random.key(0), progress=False)


def test_float32_in_float32_out():
    params, X = make_problem(jnp.float32)
    r = train(params, np.asarray(X, np.float64), lr=LR, epochs=5, progress=False)
    assert r.losses.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in r.params)
    r = train(params, X, epochs=5, optimizer=optax.adam(1e-2), progress=False)
    assert r.losses.dtype == jnp.float32 and r.params.C.dtype == jnp.float32


def test_zero_epochs_returns_the_params_unchanged():
    params, X = make_problem()
    r = train(params, X, lr=LR, epochs=0)
    assert r.losses.shape == (0,)
    chex.assert_trees_all_equal(r.params, params)
    r = train_per_sample(params, X, lr=LR, epochs=0)
    assert r.losses.shape == (N, 0) and r.params.A.shape == (N, H, D)


def test_progress_bar_on_a_terminal_only(capsys, monkeypatch):
    params, X = make_problem()
    train(params, X, lr=LR, epochs=20, progress=True, epochs_per_chunk=EVERY)
    assert capsys.readouterr().err == ""  # a redirected log gets no bar residue
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(params, X, lr=LR, epochs=20, progress=True, epochs_per_chunk=EVERY)
    assert "loss=" in capsys.readouterr().err
    train(params, X, lr=LR, epochs=20, progress=False, epochs_per_chunk=EVERY)
    assert capsys.readouterr().err == ""


# --- compilation and work --------------------------------------------------


def test_precision_is_a_speed_knob_not_part_of_the_run(tmp_path):
    params, X = make_problem()
    kw = dict(lr=LR, progress=False, epochs_per_chunk=EVERY, checkpoint_dir=tmp_path)
    high = train(params, X, epochs=30, precision="highest", **kw)
    resumed = train(params, X, epochs=40, precision="default", **kw)  # not refused
    np.testing.assert_array_equal(resumed.losses[:30], high.losses)
    whole = train(params, X, lr=LR, epochs=40, progress=False, epochs_per_chunk=EVERY)
    assert_results_close(resumed, whole, rtol=1e-12)  # a CPU computes float64 alike


# --- mini-batches -----------------------------------------------------------


def reference_minibatch(params, X, lr, epochs, batch_size, key):
    """The mini-batch rule written out in Python: permutation, batches, one step each."""
    n = X.shape[0]
    grad = jax.jit(jax.value_and_grad(ref_batch_loss))
    losses = []
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
        batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))  # each sample once
        total = 0.0
        for idx in batches:
            loss, g = grad(params, X[idx])
            total += float(loss) * len(idx)
            params = jax.tree.map(lambda p, g: p - lr * g, params, g)
        losses.append(total / n)
    return TrainResult(params, jnp.asarray(losses))


def test_minibatches_use_every_sample_once_with_a_partial_last_batch():
    params, X = make_problem()  # N = 10, batch_size = 4: batches of 4, 4 and 2
    key = jax.random.key(5)
    r = train(params, X, lr=LR, epochs=12, batch_size=4, key=key, progress=False,
              epochs_per_chunk=EVERY)
    ref = reference_minibatch(params, X, LR, 12, 4, key)
    assert_results_close(r, ref, rtol=1e-12)
    # another key, another order, another trajectory
    other = train(params, X, lr=LR, epochs=12, batch_size=4, key=jax.random.key(6),
                  progress=False, epochs_per_chunk=EVERY)
    assert not np.allclose(other.losses[1:], r.losses[1:], rtol=1e-9)


@pytest.mark.parametrize("batch_size", [3 * N])  # more rows than there are: one batch
def test_one_batch_of_everything_is_full_batch_training(batch_size):
    params, X = make_problem()
    full = train(params, X, lr=LR, epochs=40, progress=False, epochs_per_chunk=EVERY)
    mini = train(params, X, lr=LR, epochs=40, batch_size=batch_size, key=jax.random.key(1),
                 progress=False, epochs_per_chunk=EVERY)
    assert_results_close(full, mini, rtol=1e-12)  # only the order of the sums differs


@pytest.mark.integration  # three settings at once: compiles its own loop
def test_minibatch_of_one_with_chunked_gradient_and_oracle():
    params, X = make_problem()
    kw = dict(lr=0.02, epochs=6, batch_size=3, key=jax.random.key(2), progress=False)
    manual = train(params, X, chunk_size=2, **kw)  # each a mini-batch loop: ~3 s to compile
    assert_results_close(manual, reference_minibatch(params, X, 0.02, 6, 3, jax.random.key(2)),
                         rtol=1e-12)
    ones = train(params, X, lr=0.02, epochs=3, batch_size=1, key=jax.random.key(2),
                 grad="oracle", progress=False)
    assert_results_close(ones, reference_minibatch(params, X, 0.02, 3, 1, jax.random.key(2)),
                         rtol=1e-12)


# --- per-sample training ----------------------------------------------------


def test_per_sample_training_equals_training_on_each_sample_alone():
    params, X = make_problem()
    r = train_per_sample(params, X, lr=0.01, epochs=45, progress=False, epochs_per_chunk=EVERY)
    assert r.params.A.shape == (N, H, D) and r.params.C.shape == (N, O, H)
    assert r.losses.shape == (N, 45)
    for i in (0, 3, N - 1):
        alone = train(params, X[i : i + 1], lr=0.01, epochs=45, progress=False,
                      epochs_per_chunk=EVERY)
        mine = TrainResult(jax.tree.map(lambda p, i=i: p[i], r.params), r.losses[i])
        assert_results_close(mine, alone, rtol=1e-12)
    averaged = jax.tree.map(lambda p: p.mean(0), r.params)  # the homework's average
    assert isinstance(averaged, Params) and averaged.A.shape == (H, D)


@pytest.mark.integration  # a per-sample loop of its own
def test_per_sample_training_with_targets_and_weights_learns_each_rows_target():
    params, X = make_problem()
    T = jnp.asarray(np.random.default_rng(5).standard_normal((N, O)))
    weights = jnp.ones(N).at[2].set(0.0)  # row 2 is dropped
    r = train_per_sample(params, abc_jax.Batch(X, weights, T), lr=0.01, epochs=30,
                         progress=False)
    assert r.losses.shape == (N - 1, 30)
    for i, row in ((0, 0), (2, 3)):  # copy 2 is row 3: row 2 weighs 0
        alone = train(params, abc_jax.Batch(X[row : row + 1], T=T[row : row + 1]), lr=0.01,
                      epochs=30, progress=False)
        mine = TrainResult(jax.tree.map(lambda p, i=i: p[i], r.params), r.losses[i])
        assert_results_close(mine, alone, rtol=1e-12)


# --- checkpoints ------------------------------------------------------------


def test_a_finished_run_returns_at_once(tmp_path, monkeypatch):
    params, X = make_problem()
    kw = dict(lr=LR, epochs=30, progress=False, checkpoint_dir=tmp_path, epochs_per_chunk=EVERY)
    done = train(params, X, **kw)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run compiled or ran epochs")

    monkeypatch.setattr(pipeline, "run_chunk", must_not_run)
    assert_results_equal(train(params, X, **kw), done)
    with pytest.raises(ValueError, match="fewer than the 30 epochs"):
        train(params, X, **kw | dict(epochs=20))




def test_train_learns_a_target():
    # A linear teacher t = M x is in the model's reach (B, C); the loss falls by 100x, and
    # the manual and jax.grad trajectories agree.
    params, X = _reference.make_problem(7, 4, 6, 2, N=64)
    T = X @ jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)))
    kw = dict(lr=0.05, epochs=400, progress=False)
    manual = abc_jax.train(params, abc_jax.Batch(X, T=T), **kw)
    oracle = abc_jax.train(params, abc_jax.Batch(X, T=T), grad="oracle", **kw)
    assert manual.losses[-1] < manual.losses[0] / 100
    _reference.assert_rel_close(manual.params, oracle.params, 1e-10)

# --- train_many and cross_validate: the engine's members, against references -----------------


def member(tree, m):
    return jax.tree.map(lambda a: a[m], tree)


def ref_minibatch_gd(params, X, T, w, lr, epochs, b, key):
    """Plain Python over the reference loss: each epoch a permutation (fold_in(key, e)) of
    the rows of non-zero weight in batches of b; the epoch's loss is the batch losses
    weighted by the sum of each batch's row weights, each before its own update."""
    rows, losses = np.flatnonzero(w > 0), []
    for e in range(epochs):
        perm = rows[np.asarray(jax.random.permutation(jax.random.fold_in(key, e), len(rows)))]
        total = weight = 0.0
        for s in range(0, len(perm), b):
            i = perm[s:s + b]
            L, g = jax.value_and_grad(ref_batch_loss)(params, X[i], T[i], w[i])
            total, weight = total + float(L) * w[i].sum(), weight + w[i].sum()
            params = jax.tree.map(lambda p, d: p - lr * d, params, g)
        losses.append(total / weight)
    return params, np.asarray(losses)


def weighted_problem(seed=0, N=11):
    params, X = _reference.make_problem(seed, D, H, O, N)
    rng = np.random.default_rng(seed)
    T = jnp.asarray(rng.standard_normal((N, O)))
    w = rng.uniform(0.2, 3.0, N) * (rng.uniform(size=N) > 0.2)  # non-uniform, some 0
    return params, X, T, w


def test_weighted_mini_batch_epochs_equal_a_plain_reference():
    # a mini-batch's loss counts by the sum of its rows' weights, not by its row count
    params, X, T, w = weighted_problem()
    key, lr, b = jax.random.key(4), 0.05, 3  # several batches, the last one short
    want_params, want_losses = ref_minibatch_gd(params, X, T, w, lr, 5, b, key)
    got = abc_jax.train(params, Batch(X, jnp.asarray(w), T), lr=lr, epochs=5, batch_size=b,
                        key=key, **KW)
    np.testing.assert_allclose(got.losses, want_losses, rtol=1e-12)
    chex.assert_trees_all_close(got.params, want_params, rtol=1e-12)
    # members of train_many: each its own weights (as many non-zero) and keys
    w2 = np.where(w > 0, 1.0 + np.arange(len(w)), 0.0)
    keys = jax.random.split(key, 2)
    many = abc_jax.train_many(params, Batch(X, jnp.asarray(np.stack([w, w2])), T), lr=lr,
                              epochs=5, batch_size=b, key=keys, **KW)
    for m, wm in enumerate((w, w2)):
        p, L = ref_minibatch_gd(params, X, T, wm, lr, 5, b, keys[m])
        np.testing.assert_allclose(many.losses[m], L, rtol=1e-12)
        chex.assert_trees_all_close(member(many.params, m), p, rtol=1e-12)


def held_out_problem():
    rng = np.random.default_rng(1)
    teacher = abc_jax.Params(*(jnp.asarray(rng.standard_normal(s)) for s in
                               [(H, D), (H, D), (O, H)]))
    X = jnp.asarray(rng.standard_normal((40, D)))
    T = abc_jax.predict(teacher, X) + jnp.asarray(rng.standard_normal((40, O)))
    params = abc_jax.init_params(jax.random.key(2), D, H, O, dtype=jnp.float64)
    return params, Batch(X[:8], T=T[:8]), Batch(X[8:], T=T[8:])


def test_members_with_held_out_data_and_patience_each_equal_their_own_train(tmp_path):
    params, fit, held = held_out_problem()
    lrs = [0.01, 0.03, 0.06]
    kw = dict(epochs=400, eval_every=10, patience=3, **KW)
    many = abc_jax.train_many(params, fit, lr=lrs, eval_data=held, **kw)
    stopped = np.asarray(many.stopped_at)
    assert (stopped > 0).any(), "patience stopped some member"
    for m, lr in enumerate(lrs):
        alone = abc_jax.train(params, fit, lr=lr, eval_data=held, **kw)
        k = len(alone.eval_losses)
        np.testing.assert_allclose(many.eval_losses[m, :k], alone.eval_losses, rtol=1e-12)
        assert np.isnan(np.asarray(many.eval_losses[m, k:])).all()  # after its stop: none
        assert int(many.best_epoch[m]) == alone.best_epoch
        n = len(alone.losses)
        np.testing.assert_allclose(many.losses[m, :n], alone.losses, rtol=1e-12)
        chex.assert_trees_all_close(member(many.params, m), alone.params, rtol=1e-12)
    # resumed from a checkpoint part way: bit for bit the uninterrupted run
    abc_jax.train_many(params, fit, lr=lrs, eval_data=held, checkpoint_dir=tmp_path,
                       **kw | dict(epochs=40))
    resumed = abc_jax.train_many(params, fit, lr=lrs, eval_data=held, checkpoint_dir=tmp_path,
                                 **kw)
    for a, b in zip(resumed, many, strict=True):
        if a is not None:
            chex.assert_trees_all_equal(a, b)


def test_per_member_held_out_data():
    params, fit, held = held_out_problem()
    X2 = jnp.stack([held.X, held.X[::-1] * 0.5])
    T2 = jnp.stack([held.T, held.T[::-1]])
    many = abc_jax.train_many(params, fit, lr=0.05, members=2, epochs=30, eval_every=10,
                              eval_data=Batch(X2, T=T2), **KW)
    for m in range(2):
        alone = abc_jax.train(params, fit, lr=0.05, epochs=30, eval_every=10,
                              eval_data=Batch(X2[m], T=T2[m]), **KW)
        np.testing.assert_allclose(many.eval_losses[m], alone.eval_losses, rtol=1e-12)


def test_callbacks_add_metrics_and_can_stop_the_run():
    params, fit, held = held_out_problem()
    seen = []

    def gradient_norm(epoch, p, metrics):
        seen.append((epoch, metrics["eval_loss"]))
        g = abc_jax.batch_grad(p, fit)
        return {"grad_norm": float(jnp.sqrt(sum(jnp.sum(a * a) for a in g))),
                "stop": epoch >= 20}

    r = abc_jax.train(params, fit, lr=0.05, epochs=100, eval_every=10, eval_data=held,
                      callbacks=[gradient_norm], **KW)
    np.testing.assert_array_equal(r.eval_epochs, [0, 10, 20])
    assert r.losses.shape == (20,)  # stopped at the chunk's end that asked
    assert [e for e, _ in seen] == [10, 20]  # the host acts at chunk ends
    np.testing.assert_allclose([v for _, v in seen], r.eval_losses[1:], rtol=1e-12)
    np.testing.assert_array_equal(r.metric_epochs, [10, 20])
    at_10 = abc_jax.train(params, fit, lr=0.05, epochs=10, **KW).params
    g = abc_jax.batch_grad(at_10, fit)
    np.testing.assert_allclose(r.metrics["grad_norm"][0],
                               float(jnp.sqrt(sum(jnp.sum(a * a) for a in g))), rtol=1e-12)


def test_callbacks_of_train_many_act_per_member():
    params, fit, _ = held_out_problem()

    def stop_the_first(epoch, p, metrics):
        assert p.A.shape == (3, H, D) and metrics["loss"].shape == (3,)
        return {"C_norm": jnp.sqrt(jnp.sum(p.C ** 2, axis=(1, 2))),
                "stop": np.array([epoch >= 10, False, False])}

    r = abc_jax.train_many(params, fit, lr=[0.01, 0.02, 0.03], epochs=30, eval_every=10,
                           callbacks=[stop_the_first], **KW)
    assert np.asarray(r.stopped_at).tolist() == [10, -1, -1]
    assert np.isnan(np.asarray(r.losses[0, 10:])).all() and np.isfinite(r.losses[1:]).all()
    assert r.metrics["C_norm"].shape == (3, 3)  # epochs 10, 20, 30
    assert np.isnan(r.metrics["C_norm"][0, 1:]).all()  # none after its stop
    with pytest.raises(TypeError, match="callbacks must return a dict of metrics or None"):
        abc_jax.train(params, fit, lr=0.01, epochs=2, callbacks=[lambda e, p, m: 1.0], **KW)


def cv_problem():
    """13 rows, weights non-uniform with zero-weight rows in the middle (rows 3 and 7)."""
    params, X, T, w = weighted_problem(3, N=13)
    w[3] = w[7] = 0.0
    return params, X, T, w


def test_cross_validation_equals_kfold_and_train_by_hand():
    from sklearn.model_selection import KFold

    params, X, T, w = cv_problem()
    data = Batch(X, jnp.asarray(w), T)
    real = np.flatnonzero(w > 0)  # the reference: scikit-learn's folds of the weighted rows
    folds = [(real[tr], real[te]) for tr, te in KFold(3).split(real)]
    cv = abc_jax.cross_validate(params, data, folds=3, lr=0.05, epochs=25, **KW)
    for k, (tr, te) in enumerate(folds):
        w_tr, w_te = np.zeros_like(w), np.zeros_like(w)
        w_tr[tr], w_te[te] = w[tr], w[te]
        alone = abc_jax.train(params, Batch(X, jnp.asarray(w_tr), T), lr=0.05, epochs=25, **KW)
        score = abc_jax.batch_loss(alone.params, Batch(X, jnp.asarray(w_te), T))
        np.testing.assert_allclose(cv["held_out_loss"][k], score, rtol=1e-12)
        chex.assert_trees_all_close(member(cv["result"].params, k), alone.params, rtol=1e-12)
        np.testing.assert_array_equal(cv["folds"][k][1], te)
    held = cv["held_out_loss"]
    assert cv["mean"] == pytest.approx(np.mean(held)) and cv["std"] == pytest.approx(
        np.std(held, ddof=1))
    # a scikit-learn splitter and a list of index pairs are the same folds
    same = abc_jax.cross_validate(params, data, folds=KFold(3), lr=0.05, epochs=25, **KW)
    listed = abc_jax.cross_validate(params, data, folds=folds, lr=0.05, epochs=25, **KW)
    np.testing.assert_array_equal(same["held_out_loss"], held)
    np.testing.assert_array_equal(listed["held_out_loss"], held)
    # shuffled: KFold's own shuffle of the weighted rows, by its seed
    mixed = abc_jax.cross_validate(params, data, folds=3, shuffle=4, lr=0.05, epochs=25, **KW)
    for (_, te), (_, want) in zip(mixed["folds"], KFold(3, shuffle=True, random_state=4)
                                  .split(real), strict=True):
        np.testing.assert_array_equal(te, np.sort(real[want]))


def test_cross_validation_with_patience_never_sees_the_scored_fold():
    params, X, T, w = cv_problem()
    kw = dict(folds=3, lr=0.05, epochs=60, patience=2, validation_fraction=0.3, **KW)
    cv = abc_jax.cross_validate(params, Batch(X, jnp.asarray(w), T), **kw)
    te = cv["folds"][1][1]
    changed = np.asarray(T).copy()
    changed[te] += 10.0  # the scored rows of fold 1: other targets
    other = abc_jax.cross_validate(params, Batch(X, jnp.asarray(w), jnp.asarray(changed)), **kw)
    chex.assert_trees_all_equal(member(other["result"].params, 1),
                                member(cv["result"].params, 1))  # trained without them
    assert other["held_out_loss"][1] > cv["held_out_loss"][1]  # but scored on them
    # patience watched an inner split of the training rows: the last 30% of them
    tr = cv["folds"][0][0]
    inner = tr[len(tr) - int(np.ceil(0.3 * len(tr))):]
    w_tr, w_in = np.zeros_like(w), np.zeros_like(w)
    w_tr[np.setdiff1d(tr, inner)], w_in[inner] = w[np.setdiff1d(tr, inner)], w[inner]
    alone = abc_jax.train(params, Batch(X, jnp.asarray(w_tr), T), lr=0.05, epochs=60,
                          eval_data=Batch(X, jnp.asarray(w_in), T), patience=2, **KW)
    chex.assert_trees_all_close(member(cv["result"].params, 0), alone.params, rtol=1e-12)


def test_cross_validation_never_scores_a_diverged_fold():
    params, X, T, w = cv_problem()
    data = Batch(X, jnp.asarray(w), T)
    with pytest.raises(DivergenceError, match=r"folds \[0, 1, 2\] diverged") as info:
        abc_jax.cross_validate(params, data, folds=3, lr=1e3, epochs=50, **KW)
    assert info.value.members == [0, 1, 2] and all(e > 0 for e in info.value.epochs)
    lrs = [0.05, 1e3, 0.05]  # one fold diverges: flagged, excluded from mean and std
    cv = abc_jax.cross_validate(params, data, folds=3, lr=lrs, epochs=50,
                                on_divergence="exclude", **KW)
    assert cv["diverged"].tolist() == [False, True, False] and np.isnan(cv["held_out_loss"][1])
    kept = cv["held_out_loss"][[0, 2]]
    assert np.isfinite(kept).all() and cv["mean"] == pytest.approx(np.mean(kept))


# --- held-out evaluation, early stopping -----------------------------------------------------


def teacher_problem(n_train=12, n_eval=40, noise=0.3):
    rng = np.random.default_rng(0)
    teacher = Params(*(jnp.asarray(rng.standard_normal(s)) for s in [(H, D), (H, D), (O, H)]))
    X = jnp.asarray(rng.standard_normal((n_train + n_eval, D)))
    T = abc_jax.predict(teacher, X) + noise * jnp.asarray(rng.standard_normal((len(X), O)))
    student = abc_jax.init_params(jax.random.key(3), D, H, O, dtype=jnp.float64)
    return student, Batch(X[:n_train], T=T[:n_train]), Batch(X[n_train:], T=T[n_train:])


def run(params, train_set, epochs, **kw):
    return abc_jax.train(params, train_set, lr=0.05, epochs=epochs, progress=False,
                         epochs_per_chunk=EVERY, eval_every=EVERY, **kw)


def test_the_held_out_loss_is_measured_at_every_chunk_boundary():
    params, train_set, held = teacher_problem()
    r = run(params, train_set, 35, eval_data=held)
    np.testing.assert_array_equal(r.eval_epochs, [0, 10, 20, 30, 35])
    for e, got in zip(r.eval_epochs, r.eval_losses, strict=True):
        at = run(params, train_set, int(e)).params
        np.testing.assert_allclose(got, ref_batch_loss(at, held.X, held.T), rtol=1e-12)
    assert r.best_epoch == int(r.eval_epochs[np.argmin(r.eval_losses)])
    plain = run(params, train_set, 35)  # evaluation observes, it does not change training
    np.testing.assert_array_equal(r.losses, plain.losses)
    assert plain.eval_losses is None and plain.best_epoch is None


def test_patience_stops_and_returns_the_best_params():
    params, train_set, held = teacher_problem(n_train=6, noise=1.0)
    r = run(params, train_set, 3000, eval_data=held, patience=3)
    L = np.asarray(r.eval_losses)
    best = int(np.argmin(L))
    assert len(L) - 1 - best == 3, "stops after exactly `patience` evaluations without a new best"
    assert np.all(L[best + 1:] >= L[best])
    stop = int(r.eval_epochs[-1])
    assert stop < 3000 and r.losses.shape == (stop,)
    assert r.best_epoch == int(r.eval_epochs[best])
    np.testing.assert_array_equal(np.asarray(r.params.A),
                                  np.asarray(run(params, train_set, r.best_epoch).params.A))


def test_a_resumed_run_with_evaluation_equals_the_uninterrupted_one(tmp_path):
    params, train_set, held = teacher_problem(n_train=6, noise=1.0)
    kw = dict(eval_data=held, patience=3)
    whole = run(params, train_set, 3000, **kw)
    first = run(params, train_set, 40, checkpoint_dir=tmp_path, **kw)
    assert checkpoint_epoch(tmp_path) == 40 and first.losses.shape == (40,)
    rest = run(params, train_set, 3000, checkpoint_dir=tmp_path, **kw)
    again = run(params, train_set, 3000, checkpoint_dir=tmp_path, **kw)  # already stopped
    for r in (rest, again):
        np.testing.assert_array_equal(r.losses, whole.losses)
        np.testing.assert_array_equal(r.eval_losses, whole.eval_losses)
        np.testing.assert_array_equal(r.eval_epochs, whole.eval_epochs)
        assert r.best_epoch == whole.best_epoch
        for a, b in zip(r.params, whole.params, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_evaluation_arguments_are_named():
    params, train_set, held = teacher_problem()
    with pytest.raises(ValueError, match="patience needs eval_data"):
        run(params, train_set, 5, patience=2)
    with pytest.raises(ValueError, match="patience"):
        run(params, train_set, 5, eval_data=held, patience=0)
    with pytest.raises(ValueError, match="eval_data must have D = 4 columns"):
        run(params, train_set, 5, eval_data=held.X[:, :2])
    with pytest.raises(ValueError, match=r"T must have shape \(N, O\)"):
        run(params, train_set, 5, eval_data=Batch(held.X, T=held.T[:, :2]))
    with pytest.raises(ValueError, match="eval_data must be finite"):
        run(params, train_set, 5, eval_data=held._replace(X=held.X.at[1, 1].set(jnp.nan)))
    with pytest.raises(ValueError, match="eval_data: the training batch has targets T and "
                                         "eval_data has none"):
        run(params, train_set, 5, eval_data=held.X)
    with pytest.raises(ValueError, match="eval_data: eval_data has targets T and the training "
                                         "batch has none"):
        run(params, train_set.X, 5, eval_data=held)


# --- predict -------------------------------------------------------------------


# --- saved params ----------------------------------------------------------------




def test_a_checkpoint_of_other_held_out_data_or_patience_is_refused(tmp_path):
    params, train_set, held = teacher_problem()
    run(params, train_set, 20, checkpoint_dir=tmp_path, eval_data=held)
    other = Batch(held.X, T=held.T + 1.0)
    for kw in (dict(eval_data=other), dict(eval_data=held, patience=2), dict()):
        with pytest.raises(ValueError, match="evaluation"):
            run(params, train_set, 30, checkpoint_dir=tmp_path, **kw)

# --- train_many: every member is its own train call ------------------------------------------


def stacked_params(m=M, dtype=jnp.float64):
    """One init_params per seed, stacked: A (m, H, D), B (m, H, D), C (m, O, H)."""
    ps = [init_params(jax.random.key(s), D, H, O, dtype=dtype) for s in range(m)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def data(m=None, n=N, seed=1):
    shape = (n, D) if m is None else (m, n, D)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)




def assert_member_equals(r: TrainManyResult, m: int, alone, rtol=1e-12):
    np.testing.assert_allclose(r.losses[m], alone.losses, rtol=rtol)
    chex.assert_trees_all_close(member(r.params, m), alone.params, rtol=rtol)


def test_seeds_and_learning_rates_each_equal_their_own_train():
    params, X, lrs = stacked_params(), data(), np.array([0.02, 0.05, 0.1])
    r = train_many(params, X, lr=lrs, epochs=20, **KW)
    assert isinstance(r, TrainManyResult) and r.losses.shape == (M, 20)
    assert r.params.A.shape == (M, H, D) and r.params.C.shape == (M, O, H)
    assert not np.asarray(r.diverged).any() and np.asarray(r.diverged_at).tolist() == [-1] * M
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), X, lr=lrs[m], epochs=20, **KW))
    assert len({float(v) for v in r.losses[:, -1]}) == M  # they really differ


@pytest.mark.integration  # mini-batch loops of their own
def test_shared_params_with_mini_batches_from_folded_keys():
    params, X, key = stacked_params(1), data(), jax.random.key(7)
    p0 = member(params, 0)
    r = train_many(p0, X, lr=LR, epochs=9, batch_size=5, key=key, members=M, **KW)
    for m in range(M):
        alone = train(p0, X, lr=LR, epochs=9, batch_size=5, key=jax.random.fold_in(key, m), **KW)
        assert_member_equals(r, m, alone)
    assert not np.allclose(r.losses[0], r.losses[1])  # other mini-batches, other losses
    keys = jax.random.split(key, M)  # stacked keys: used as given
    r = train_many(p0, X, lr=LR, epochs=4, batch_size=5, key=keys, **KW)
    assert_member_equals(r, 2, train(p0, X, lr=LR, epochs=4, batch_size=5, key=keys[2], **KW))


def test_per_member_data_weights_and_targets():
    params, Xs = stacked_params(), data(M)
    T = jax.random.normal(jax.random.key(3), (M, N, O), jnp.float64)
    r = train_many(params, Batch(Xs, T=T), lr=LR, epochs=10, **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), Batch(Xs[m], T=T[m]), lr=LR,
                                         epochs=10, **KW))
    X = data()  # one X, weights per member (a bootstrap), targets shared
    w = jnp.asarray(np.random.default_rng(0).integers(0, 3, (M, N)), jnp.float64).at[:, 0].set(1)
    r = train_many(params, Batch(X, w, T[0]), lr=LR, epochs=10, **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), Batch(X, w[m], T[0]), lr=LR,
                                         epochs=10, **KW))


@pytest.mark.integration  # M + 1 Adam loops to compile
def test_optax_optimizer_and_per_member_learning_rate():
    params, X = stacked_params(), data()
    r = train_many(params, X, epochs=12, optimizer=optax.adam(0.01), **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), X, epochs=12,
                                         optimizer=optax.adam(0.01), **KW))
    lrs = [0.001, 0.01, 0.03]
    per_member = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.asarray(lrs))
    r = train_many(params, X, epochs=12, grad="oracle", optimizer=per_member, **KW)
    for m in (0, 2):
        own = optax.inject_hyperparams(optax.adam)(learning_rate=lrs[m])
        assert_member_equals(r, m, train(member(params, m), X, epochs=12, optimizer=own, **KW))
    with pytest.raises(TypeError, match=r"an optimizer carries its own rate.*inject_hyperparams"):
        train_many(params, X, lr=lrs, epochs=2, optimizer=optax.adam(0.01), **KW)
    with pytest.raises(TypeError, match="an optimizer carries its own rate"):
        train(member(params, 0), X, lr=0.1, epochs=2, optimizer=optax.adam(0.01), **KW)


def test_one_member_diverges_the_others_finish():
    params, X = stacked_params(), data()
    lrs = np.array([0.05, 1e3, 0.02])
    r = train_many(params, X, lr=lrs, epochs=30, **KW)
    assert np.asarray(r.diverged).tolist() == [False, True, False]
    e = int(r.diverged_at[1])
    assert 0 < e < 30
    assert np.isfinite(r.losses[1, :e]).all() and not np.isfinite(r.losses[1, e:]).any()
    chex.assert_tree_all_finite(r.params)
    for m in (0, 2):
        assert_member_equals(r, m, train(member(params, m), X, lr=lrs[m], epochs=30, **KW))

    with pytest.raises(DivergenceError) as info:  # the frozen member: train's error result
        train(member(params, 1), X, lr=1e3, epochs=30, **KW)
    assert info.value.epoch == e
    chex.assert_trees_all_close(member(r.params, 1), info.value.result.params, rtol=1e-12)
    np.testing.assert_allclose(r.losses[1, :e], info.value.result.losses, rtol=1e-12)


def test_all_members_diverged_stops_early_and_pads():
    r = train_many(stacked_params(2), data(), lr=[1e3, 2e3], epochs=60, **KW)
    assert np.asarray(r.diverged).all() and r.losses.shape == (2, 60)
    assert np.isnan(r.losses[:, -1]).all()


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    params, X, key = stacked_params(), data(), jax.random.key(5)
    kw = dict(lr=[0.05, 1e3, 0.02], batch_size=4, key=key, **KW)
    whole = train_many(params, X, epochs=25, **kw)
    train_many(params, X, epochs=14, checkpoint_dir=tmp_path, **kw)
    assert checkpoint_epoch(tmp_path) == 14
    rest = train_many(params, X, epochs=25, checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(np.asarray(rest.losses), np.asarray(whole.losses))
    chex.assert_trees_all_equal(rest.params, whole.params)
    np.testing.assert_array_equal(np.asarray(rest.diverged_at), np.asarray(whole.diverged_at))
    with pytest.raises(ValueError, match="lr"):  # another run's checkpoint is refused
        train_many(params, X, epochs=25, checkpoint_dir=tmp_path, **(kw | dict(lr=0.01)))


def test_chunk_size_changes_nothing():
    params, X = stacked_params(), data()
    a = train_many(params, X, lr=LR, epochs=6, **KW)
    b = train_many(params, X, lr=LR, epochs=6, chunk_size=5, **KW)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)




def users_run():
    """A public function and a short train with held-out data and patience, in float32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import abc_jax
    p = abc_jax.init_params(jax.random.key(0), 3, 5, 2)
    X = jax.random.normal(jax.random.key(1), (16, 3), jnp.float32)
    T = jax.random.normal(jax.random.key(2), (16, 2), jnp.float32)
    b, h = abc_jax.Batch(X[:12], T=T[:12]), abc_jax.Batch(X[12:], T=T[12:])
    g = abc_jax.batch_grad(p, b)
    r = abc_jax.train(p, b, lr=0.1, epochs=20, eval_data=h, patience=3, progress=False)
    return {"g": [np.asarray(a).tolist() for a in g], "x64": jax.config.jax_enable_x64,
            "losses": np.asarray(r.losses).tolist(), "dtype": str(r.losses.dtype),
            "eval": np.asarray(r.eval_losses).tolist()}


def test_the_users_setup_gives_the_suites_results():
    """The suite compiles with test-only XLA flags and x64 on; a user's process has neither.
    ``users_run`` there gives what it gives here (float32 both ways)."""
    test_only = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                 "--xla_cpu_use_fusion_emitters=false")
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if f not in test_only)
    code = (textwrap.dedent(inspect.getsource(users_run)) +
            "import json\nprint(json.dumps(users_run()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True, cwd=TESTS.parent).stdout
    theirs, ours = json.loads(out.strip().splitlines()[-1]), users_run()
    assert theirs["x64"] is False and ours["x64"] is True and theirs["dtype"] == "float32"
    assert len(theirs["losses"]) == len(ours["losses"]) < 20  # patience stopped both alike
    np.testing.assert_allclose(theirs["losses"], ours["losses"], rtol=1e-5)
    np.testing.assert_allclose(theirs["eval"], ours["eval"], rtol=1e-5)
    for a, b in zip(theirs["g"], ours["g"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_member_optimizer_hyperparameters_declare_the_member_count(tmp_path):
    """The API page's example as written: shared params, no members=, the rates (M,) of an
    inject_hyperparams optimizer give M; member m is its own train with its rate. Rates
    0.3 and 0.07 make every member's trajectory its own."""
    params, X = _reference.make_problem(5, D, H, O, N)
    rates = [0.3, 0.07, 0.01]
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.asarray(rates))
    r = train_many(params, X, optimizer=opt, epochs=9, **KW)
    assert r.losses.shape == (3, 9)
    for m in (0, 1):
        own = optax.inject_hyperparams(optax.adam)(learning_rate=rates[m])
        assert_member_equals(r, m, train(params, X, epochs=9, optimizer=own, **KW))
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate has 3"):
        train_many(params, X, lr=None, optimizer=opt, epochs=2, members=2, **KW)
    # the rates are the run's: a checkpoint of other rates is refused, naming them
    train_many(params, X, optimizer=opt, epochs=2, checkpoint_dir=tmp_path, **KW)
    other = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.asarray([0.3, 0.07, 0.02]))
    with pytest.raises(ValueError, match=r"different run.*hyper"):
        train_many(params, X, optimizer=other, epochs=4, checkpoint_dir=tmp_path, **KW)


def test_patience_with_the_defaults_stops_an_overfitting_run():
    """``train(..., epochs=100, eval_data=..., patience=5)`` as people write it: the held-out
    loss is measured every epoch by default, so 12 noisy rows overfit and patience stops the
    run early, five evaluations (epochs) after its best, returning the best params."""
    params, fit, held = teacher_problem(n_train=12, n_eval=40, noise=0.5)
    r = train(params, fit, optimizer=optax.adam(0.05), epochs=100, eval_data=held, patience=5,
              progress=False)
    assert len(r.losses) < 100 and len(r.losses) == r.best_epoch + 5
    np.testing.assert_array_equal(r.eval_epochs, np.arange(len(r.losses) + 1))
    np.testing.assert_allclose(abc_jax.batch_loss(r.params, held), np.min(r.eval_losses),
                               rtol=1e-12)


def test_a_diverged_run_records_no_evaluation_it_did_not_make():
    params, fit, held = held_out_problem()
    with pytest.raises(DivergenceError) as info:
        train(params, fit, lr=50.0, epochs=300, eval_data=held, eval_every=100, **KW)
    r = info.value.result
    assert 0 < info.value.epoch < 100
    np.testing.assert_array_equal(r.eval_epochs, [0])  # not 100, 200 or the end
    assert np.isfinite(np.asarray(r.eval_losses)).all()
    many = train_many(params, fit, lr=[50.0, 0.01], epochs=300, eval_data=held,
                      eval_every=100, **KW)
    np.testing.assert_array_equal(many.eval_epochs, [0, 100, 200, 300])
    assert np.isnan(np.asarray(many.eval_losses[0, 1:])).all()  # the diverged member: none
    assert np.isfinite(np.asarray(many.eval_losses[1])).all()
