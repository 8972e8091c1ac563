"""Checkpoints (``abc_jax.checkpoint``): a run resumed from its checkpoint continues the same
trajectory bit for bit, another run's checkpoint is refused with every difference named and
left untouched, a bad checkpoint folder is named, the data fingerprint sees the rows and not
their layout; a training process killed with ``kill -9`` resumes (integration)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import TRAIN_DIMS, TRAIN_LR, assert_results_equal, compilations, train_problem

from abc_jax import init_params, train
from abc_jax.checkpoint import checkpoint_epoch, checkpoint_path, fingerprint

D, H, O, N = TRAIN_DIMS  # all different: a transposed gradient cannot hide
LR = TRAIN_LR
TESTS = Path(__file__).parent


make_problem = train_problem  # shared with the other training tests' files


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
    common = dict(progress=False, epochs_per_chunk=10) | (kw or dict(lr=LR))
    whole = train(params, X, epochs=90, **common)
    first = train(params, X, epochs=50, checkpoint_dir=tmp_path, **common)
    assert checkpoint_epoch(tmp_path) == 50
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]  # no temporary files left
    np.testing.assert_array_equal(first.losses, whole.losses[:50])
    rest = train(params, X, epochs=90, checkpoint_dir=tmp_path, **common)
    assert_results_equal(rest, whole)
    assert checkpoint_epoch(tmp_path) == 90


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
@pytest.mark.parametrize("mode", ["train", "many", "private"])
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
    resumed = worker.run(str(tmp_path), many=mode == "many", private=mode == "private")
    uninterrupted = worker.run(None, many=mode == "many", private=mode == "private")
    assert_results_equal(resumed, uninterrupted)
    fields = {"many": ("eval_losses", "eval_epochs", "best_epoch", "stopped_at"),
              "private": ("eval_losses", "eval_epochs", "best_epoch", "epsilon")}.get(mode, ())
    for field in fields:
        np.testing.assert_array_equal(getattr(resumed, field), getattr(uninterrupted, field))


def test_fingerprint_sees_the_rows_not_their_layout():
    X = np.random.default_rng(0).standard_normal((10, 4))
    a = fingerprint(X)
    assert len(a) == 4 and a[0] == 10  # sum of the weights: the number of rows
    padded = np.pad(X, ((0, 2), (0, 0)))
    np.testing.assert_allclose(fingerprint(jnp.asarray(X)), a, rtol=1e-6)
    np.testing.assert_allclose(fingerprint(padded, np.arange(12) < 10), a, rtol=1e-6)
    np.testing.assert_allclose(fingerprint(X[::-1].copy()), a, rtol=1e-6)  # order-blind
    changed = X.copy()
    changed[9, 3] += 0.01
    for other in (changed, X[:9], X.T.copy(), padded):
        assert not np.allclose(fingerprint(other), a, rtol=1e-6)
