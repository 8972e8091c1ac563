"""train and train_per_sample: the update rule, Optax, gradients, divergence, mini-batches,
checkpoints and compilation."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import compilations, ref_batch_loss

import abc_jax
from abc_jax import (
    DivergenceError,
    Params,
    TrainResult,
    gradient_descent,
    init_params,
    train,
    train_many,
    train_per_sample,
)
from abc_jax.checkpoint import checkpoint_epoch, checkpoint_path
from abc_jax.engine import loop, pipeline

D, H, O, N = 4, 6, 3, 10  # all different: a transposed gradient cannot hide
LR = 0.05
TESTS = Path(__file__).parent


def make_problem(dtype=jnp.float64, n=N):
    params = init_params(jax.random.key(0), D, H, O, dtype=dtype)
    X = jax.random.normal(jax.random.key(1), (n, D), dtype)
    return params, X


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


@pytest.mark.smoke
@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float64, 1e-12), (jnp.float32, 1e-6)])
def test_hand_rolled_rule_equals_optax_sgd(dtype, rtol):
    params, X = make_problem(dtype)
    ours = train(params, X, lr=LR, epochs=130, progress=False, epochs_per_chunk=50)
    sgd = train(params, X, epochs=130, optimizer=optax.sgd(LR), progress=False,
                epochs_per_chunk=50)
    assert_results_close(ours, sgd, rtol=rtol)
    assert ours.losses[-1] < 0.1 * ours.losses[0]


def test_gradient_descent_is_an_optax_transformation():
    params, _ = make_problem()
    gd = gradient_descent(0.5)
    assert isinstance(gd, optax.GradientTransformation)
    assert gd.update is gradient_descent(0.25).update  # lr is data: one compiled loop
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = gd.update(grads, gd.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new, jax.tree.map(lambda p: p - 0.5, params), rtol=1e-15)


OPTIMIZERS = {
    "sgd": optax.sgd(0.05),
    "momentum": optax.sgd(0.02, momentum=0.9),
    "nesterov": optax.sgd(0.02, momentum=0.9, nesterov=True),
    "adam": optax.adam(0.02),
    "adamw": optax.adamw(0.02, weight_decay=1e-3),
    "rmsprop": optax.rmsprop(0.005),
    "clipped_chain": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05)),
    "exponential_decay": optax.sgd(
        optax.exponential_decay(0.05, transition_steps=20, decay_rate=0.5)
    ),
}


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
              epochs_per_chunk=25)
    losses = np.asarray(r.losses)
    assert losses.shape == (60,)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.2 * losses[0], (name, losses[0], losses[-1])


def test_manual_and_oracle_trajectories_agree():
    params, X = make_problem()
    kw = dict(lr=LR, epochs=120, progress=False, epochs_per_chunk=50)
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
        train(params, X, lr=lr, epochs=500, progress=False, epochs_per_chunk=50)
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
    before = train(params, X, lr=lr, epochs=err.epoch, progress=False, epochs_per_chunk=50)
    np.testing.assert_array_equal(before.losses, result.losses)


@pytest.mark.parametrize(("dtype", "scale"), [(jnp.float32, 1e30), (jnp.float64, 1e160)])
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
    with pytest.raises(FloatingPointError, match="initial parameters"):  # mini-batches too
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
              progress=False, epochs_per_chunk=30, optimizer=optax.adam(0.01))
    assert_results_equal(train(params, X, **kw), train(params, X, **kw))


def test_a_key_without_randomness_to_draw_is_refused():
    params, X = make_problem()
    for fn in (train, train_many):
        with pytest.raises(ValueError, match="key is used only with batch_size .* or privacy"):
            fn(params, X, lr=LR, epochs=2, key=jax.random.key(0), progress=False)


def test_float32_in_float32_out():
    params, X = make_problem(jnp.float32)
    r = train(params, np.asarray(X, np.float64), lr=LR, epochs=5, progress=False)
    assert r.losses.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in r.params)
    r = train(params, X, epochs=5, batch_size=3, key=jax.random.key(0),
              optimizer=optax.adam(1e-2), progress=False)
    assert r.losses.dtype == jnp.float32 and r.params.C.dtype == jnp.float32


def test_zero_epochs_returns_the_params_unchanged():
    params, X = make_problem()
    r = train(params, X, lr=LR, epochs=0)
    assert r.losses.shape == (0,)
    chex.assert_trees_all_equal(r.params, params)
    r = train_per_sample(params, X, lr=LR, epochs=0)
    assert r.losses.shape == (N, 0) and r.params.A.shape == (N, H, D)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(epochs=-1), ValueError, "epochs"),
        (dict(epochs=2.5), TypeError, "epochs"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=2), ValueError, "key"),
        (dict(grad="numeric"), ValueError, "grad"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(batch_size=2, key=jnp.ones(3)), TypeError, "key"),
        (dict(epochs_per_chunk=0), ValueError, "epochs_per_chunk"),
        (dict(precision="fast"), ValueError, "precision"),
        (dict(precision=32), TypeError, "precision"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, name):
    params, X = make_problem()
    kw = dict(lr=LR, epochs=3, progress=False) | kwargs
    with pytest.raises(error, match=name):
        train(params, X, **kw)


def test_bad_data_is_refused_before_training():
    params, X = make_problem()
    with pytest.raises(ValueError, match="X"):
        train(params, X[:, :3], lr=LR, epochs=3)
    with pytest.raises(ValueError, match=r"X\[2, 1\]"):
        train(params, X.at[2, 1].set(jnp.nan), lr=LR, epochs=3)
    with pytest.raises(ValueError, match=r"params\.B"):
        train(params._replace(B=params.B.at[0, 0].set(jnp.inf)), X, lr=LR, epochs=3)
    with pytest.raises(ValueError, match="lr"):
        train_per_sample(params, X, lr=0, epochs=3)


def test_progress_bar_on_a_terminal_only(capsys, monkeypatch):
    params, X = make_problem()
    train(params, X, lr=LR, epochs=20, progress=True, epochs_per_chunk=10)
    assert capsys.readouterr().err == ""  # a redirected log gets no bar residue
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(params, X, lr=LR, epochs=20, progress=True, epochs_per_chunk=10)
    assert "loss=" in capsys.readouterr().err
    train(params, X, lr=LR, epochs=20, progress=False, epochs_per_chunk=10)
    assert capsys.readouterr().err == ""


# --- compilation and work --------------------------------------------------


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
    sgd = optax.sgd(LR)
    static = dict(update=sgd.update, extra=False, grad="manual", length=100, batch_size=None,
                  n_rows=0, chunk_size=None, precision="highest")
    one = jax.tree.map(lambda a: a[None], (params, sgd.init(params), params))
    state = loop.State(*one, jnp.zeros(1, bool), jnp.zeros(1, bool))
    jaxpr = str(jax.make_jaxpr(lambda c, b, s, e: loop.run_chunk(
        c, b, None, s, e, batch_axes=abc_jax.Batch(None), **static))(
        state, abc_jax.Batch(X), jnp.int32(0), jnp.int32(10)))
    assert "while[" in jaxpr and "scan[" not in jaxpr


def test_precision_is_a_speed_knob_not_part_of_the_run(tmp_path):
    params, X = make_problem()
    kw = dict(lr=LR, progress=False, epochs_per_chunk=10, checkpoint_dir=tmp_path)
    high = train(params, X, epochs=30, precision="highest", **kw)
    resumed = train(params, X, epochs=40, precision="default", **kw)  # not refused
    np.testing.assert_array_equal(resumed.losses[:30], high.losses)
    whole = train(params, X, lr=LR, epochs=40, progress=False, epochs_per_chunk=10)
    assert_results_close(resumed, whole, rtol=1e-12)  # a CPU computes float64 alike



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
              epochs_per_chunk=5)
    ref = reference_minibatch(params, X, LR, 12, 4, key)
    assert_results_close(r, ref, rtol=1e-12)
    # another key, another order, another trajectory
    other = train(params, X, lr=LR, epochs=12, batch_size=4, key=jax.random.key(6),
                  progress=False, epochs_per_chunk=5)
    assert not np.allclose(other.losses[1:], r.losses[1:], rtol=1e-9)


@pytest.mark.parametrize("batch_size", [N, 3 * N])
def test_one_batch_of_everything_is_full_batch_training(batch_size):
    params, X = make_problem()
    full = train(params, X, lr=LR, epochs=40, progress=False, epochs_per_chunk=15)
    mini = train(params, X, lr=LR, epochs=40, batch_size=batch_size, key=jax.random.key(1),
                 progress=False, epochs_per_chunk=15)
    assert_results_close(full, mini, rtol=1e-12)  # only the order of the sums differs


def test_minibatch_of_one_with_chunked_gradient_and_oracle():
    params, X = make_problem()
    kw = dict(lr=0.02, epochs=6, batch_size=3, key=jax.random.key(2), progress=False)
    manual = train(params, X, chunk_size=2, **kw)
    oracle = train(params, X, grad="oracle", **kw)
    assert_results_close(manual, oracle, rtol=1e-12)
    ones = train(params, X, lr=0.02, epochs=3, batch_size=1, key=jax.random.key(2),
                 progress=False)
    assert_results_close(ones, reference_minibatch(params, X, 0.02, 3, 1, jax.random.key(2)),
                         rtol=1e-12)


# --- per-sample training ----------------------------------------------------


def test_per_sample_training_equals_training_on_each_sample_alone():
    params, X = make_problem()
    r = train_per_sample(params, X, lr=0.01, epochs=45, progress=False, epochs_per_chunk=20)
    assert r.params.A.shape == (N, H, D) and r.params.C.shape == (N, O, H)
    assert r.losses.shape == (N, 45)
    for i in (0, 3, N - 1):
        alone = train(params, X[i : i + 1], lr=0.01, epochs=45, progress=False,
                      epochs_per_chunk=20)
        mine = TrainResult(jax.tree.map(lambda p, i=i: p[i], r.params), r.losses[i])
        assert_results_close(mine, alone, rtol=1e-12)
    averaged = jax.tree.map(lambda p: p.mean(0), r.params)  # the homework's average
    assert isinstance(averaged, Params) and averaged.A.shape == (H, D)


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


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(optimizer=optax.adam(0.02), batch_size=4, key=jax.random.key(9)),
    ],
    ids=["gd", "adam-minibatch"],
)
def test_checkpoint_round_trip_continues_the_same_trajectory(tmp_path, kw):
    params, X = make_problem()
    common = dict(progress=False, epochs_per_chunk=20) | (kw or dict(lr=LR))
    whole = train(params, X, epochs=90, **common)
    first = train(params, X, epochs=50, checkpoint_dir=tmp_path, **common)
    assert checkpoint_epoch(tmp_path) == 50
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]  # no temporary files left
    np.testing.assert_array_equal(first.losses, whole.losses[:50])
    rest = train(params, X, epochs=90, checkpoint_dir=tmp_path, **common)
    assert_results_equal(rest, whole)
    assert checkpoint_epoch(tmp_path) == 90


def test_a_finished_run_returns_at_once(tmp_path, monkeypatch):
    params, X = make_problem()
    kw = dict(lr=LR, epochs=30, progress=False, checkpoint_dir=tmp_path, epochs_per_chunk=20)
    done = train(params, X, **kw)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run compiled or ran epochs")

    monkeypatch.setattr(pipeline, "run_chunk", must_not_run)
    assert_results_equal(train(params, X, **kw), done)
    with pytest.raises(ValueError, match="fewer than the 30 epochs"):
        train(params, X, **kw | dict(epochs=20))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(lr=0.01), "lr"),
        (dict(grad="oracle"), "grad"),
        (dict(optimizer=optax.adam(LR)), "optimizer"),
        (dict(batch_size=3, key=jax.random.key(0)), "batch_size"),
        (dict(X_scale=2.0), "data_fingerprint"),
        (dict(params_scale=2.0), "params_fingerprint"),
        (dict(H=H + 1), "H"),
        (dict(dtype=jnp.float32), "dtype"),
    ],
)
def test_a_checkpoint_for_another_run_is_refused(tmp_path, change, named):
    params, X = make_problem()
    kw = dict(lr=LR, epochs=20, progress=False, checkpoint_dir=tmp_path, epochs_per_chunk=10)
    train(params, X, **kw)
    change = dict(change)
    if "X_scale" in change:
        X = X * change.pop("X_scale")
    if "params_scale" in change:
        scale = change.pop("params_scale")
        params = jax.tree.map(lambda p: p * scale, params)
    if "H" in change:
        params = init_params(jax.random.key(0), D, change.pop("H"), O, dtype=jnp.float64)
    if "dtype" in change:
        params, X = make_problem(change.pop("dtype"))
    saved = checkpoint_path(tmp_path).read_bytes()
    with pytest.raises(ValueError, match=rf"different run and is not loaded \((.*; )?{named}: "):
        train(params, X, **kw | change | dict(epochs=40, lr=None if "optimizer" in change else
                                              change.get("lr", LR)))
    assert checkpoint_path(tmp_path).read_bytes() == saved  # untouched


def test_a_refused_checkpoint_names_every_difference_in_full(tmp_path):
    params, X = make_problem()
    kw = dict(epochs=20, progress=False, checkpoint_dir=tmp_path, epochs_per_chunk=10)
    train(params, X, lr=LR, **kw)
    with pytest.raises(ValueError) as info:
        train(params, X, lr=0.01, grad="oracle", **kw)
    assert "grad: manual -> oracle" in str(info.value) and f"lr: {LR} -> 0.01" in str(info.value)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_compiling(tmp_path):
    params, X = make_problem()
    (tmp_path / "f").write_text("")
    with compilations() as seen, pytest.raises(ValueError, match="checkpoint_dir must be a "):
        train(params, X, lr=LR, epochs=2, progress=False, checkpoint_dir=tmp_path / "f")
    assert "jit(run_chunk)" not in seen


def test_an_unreadable_checkpoint_is_refused(tmp_path):
    params, X = make_problem()
    checkpoint_path(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        train(params, X, lr=LR, epochs=5, progress=False, checkpoint_dir=tmp_path)


def _load_worker():
    spec = importlib.util.spec_from_file_location("train_worker", TESTS / "train_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["train", "many"])
def test_a_run_killed_midway_resumes_to_the_same_params(tmp_path, mode):
    # kill -9: only the checkpoint survives; train_many's held-out history, best params
    # and patience counters resume with it
    worker = _load_worker()
    ckpt = checkpoint_path(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "train_worker.py"), str(tmp_path), mode],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_epoch(tmp_path)
    assert 0 < killed_at < worker.EPOCHS, killed_at  # really interrupted midway
    print(f"killed after epoch {killed_at} of {worker.EPOCHS}")
    resumed = worker.run(str(tmp_path), many=mode == "many")
    uninterrupted = worker.run(None, many=mode == "many")
    assert_results_equal(resumed, uninterrupted)
    if mode == "many":
        for field in ("eval_losses", "eval_epochs", "best_epoch", "stopped_at"):
            np.testing.assert_array_equal(getattr(resumed, field), getattr(uninterrupted, field))


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax, tempfile
jax.config.update("jax_enable_x64", True)
from abc_jax import Batch, init_params, shard_batch, train
assert jax.device_count() == 4
params = init_params(jax.random.key(0), 4, 6, 3, dtype=jnp.float64)
X = jax.random.normal(jax.random.key(1), (10, 4), jnp.float64)
Xs = shard_batch(X)
# 10 rows on 4 devices: padded to 12, the padding weighted 0
assert isinstance(Xs, Batch) and Xs.X.shape == (12, 4)
assert np.asarray(Xs.weights).tolist() == [1.0] * 10 + [0.0] * 2
for kw in [{"lr": 0.05}, {"grad": "oracle", "optimizer": optax.adam(0.02)},
           {"lr": 0.05, "batch_size": 4, "key": jax.random.key(2)}]:
    one = train(params, X, epochs=40, progress=False, epochs_per_chunk=15, **kw)
    with tempfile.TemporaryDirectory() as d:  # resumed on the sharded batch
        train(params, Xs, epochs=20, progress=False, epochs_per_chunk=15,
              checkpoint_dir=d, **kw)
        many = train(params, Xs, epochs=40, progress=False, epochs_per_chunk=15,
                     checkpoint_dir=d, **kw)
    np.testing.assert_allclose(many.losses, one.losses, rtol=1e-12)
    for a, b in zip(many.params, one.params):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
print("sharded training matches")
"""


@pytest.mark.integration
def test_training_on_a_padded_sharded_batch_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sharded training matches" in result.stdout
