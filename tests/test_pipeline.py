"""engine.pipeline: every host action is a callback with a cadence. The built-in ones
(divergence guard, progress bar, held-out loss, early stopping, checkpoint writer) and the
user's run where the cadence says, the checkpoint writer also on Ctrl-C."""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abc_jax import init_params, parallel, train_many
from abc_jax.checkpoint import checkpoint_epoch
from abc_jax.engine import pipeline

D, H, O, N, M = 3, 4, 2, 12, 2  # rectangular, as in test_train's members


def setup():
    ps = [init_params(jax.random.key(s), D, H, O, dtype=jnp.float64) for s in range(M)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    X = jax.random.normal(jax.random.key(1), (N, D), jnp.float64)
    held = jax.random.normal(jax.random.key(2), (5, D), jnp.float64)
    return params, X, held


@pytest.fixture
def calls(monkeypatch):
    """(cadence, epoch) of every call, recorded by a callback appended at each cadence."""
    seen: list[tuple[str, int]] = []
    fit = pipeline.fit

    def recording_fit(run, plan):
        def recorder(cadence):
            return cadence, lambda epoch, params, metrics: seen.append((cadence, epoch))

        extra = [recorder(c) for c in (pipeline.CHUNK, pipeline.EVALUATION, pipeline.CHECKPOINT)]
        return fit(run, pipeline.dataclasses.replace(plan, callbacks=[*plan.callbacks, *extra]))

    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


def at(calls, cadence):
    return [e for c, e in calls if c == cadence]


def test_each_cadence_is_called_where_the_config_says(calls, tmp_path):
    params, X, held = setup()
    built = []

    def spy(epoch, params, metrics):  # a user callback sees what the built-ins measured
        built.append((epoch, sorted(metrics)))

    train_many(params, X, lr=0.05, epochs=25, epochs_per_chunk=4, eval_every=10,
               checkpoint_every=20, eval_data=held, checkpoint_dir=tmp_path, callbacks=[spy],
               progress=False)
    # chunks of at most 4 epochs, cut at every evaluation (10) and checkpoint (20)
    assert at(calls, pipeline.CHUNK) == [4, 8, 10, 14, 18, 20, 24, 25]
    assert at(calls, pipeline.EVALUATION) == [0, 10, 20, 25]  # the start and the last epoch
    assert at(calls, pipeline.CHECKPOINT) == [20, 25]  # and the end of the run
    assert [e for e, _ in built] == [0, 10, 20, 25]
    assert all(keys == ["eval_loss", "loss"] for _, keys in built)
    assert checkpoint_epoch(tmp_path) == 25


def test_ctrl_c_runs_the_checkpoint_callbacks_for_the_last_chunk(calls, tmp_path):
    params, X, _ = setup()

    def interrupt(epoch, params, metrics):
        if epoch == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_many(params, X, lr=0.05, epochs=20, epochs_per_chunk=4, eval_every=3,
                   checkpoint_every=10, callbacks=[interrupt], checkpoint_dir=tmp_path,
                   progress=False)
    assert at(calls, pipeline.CHECKPOINT) == [6]
    assert checkpoint_epoch(tmp_path) == 6


def test_the_guard_records_divergence_inside_a_chunk_and_stops_the_run(calls):
    params, X, _ = setup()
    r = train_many(params, X, lr=[5e2, 1e3], epochs=60, epochs_per_chunk=7, progress=False)
    L = np.asarray(r.losses)
    first = [int(np.argmax(~np.isfinite(row))) for row in L]
    assert np.asarray(r.diverged).all() and np.asarray(r.diverged_at).tolist() == first
    assert all(0 < e < 60 for e in first)
    # once every member has diverged no chunk runs: the last chunk is the one it happened in
    assert at(calls, pipeline.CHUNK)[-1] == min(60, (max(first) // 7 + 1) * 7)


def test_a_callback_returning_something_else_is_named():
    params, X, _ = setup()
    with pytest.raises(TypeError, match="a callback must return a dict of metrics or None"):
        train_many(params, X, lr=0.05, epochs=3, callbacks=[lambda e, p, m: 1.0],
                   progress=False)


def test_a_ctrl_c_python_dropped_still_stops_the_run_at_the_next_chunk(tmp_path, capsys):
    """Python drops a KeyboardInterrupt raised inside a garbage-collector callback (JAX runs
    one); run_job's handler also records the Ctrl-C, and the loop raises it after the chunk."""
    params, X, _ = setup()

    def swallow(epoch, params, metrics):
        if epoch == 4:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # what a garbage-collector callback does with it

    def body():
        train_many(params, X, lr=0.05, epochs=40, epochs_per_chunk=4, eval_every=4,
                   callbacks=[swallow], checkpoint_dir=tmp_path, progress=False)
        return 0

    assert parallel.run_job(body, checkpoint_dir=tmp_path) == parallel.INTERRUPTED
    assert checkpoint_epoch(tmp_path) == 8  # the end of the chunk after the Ctrl-C
    assert capsys.readouterr().err == ("interrupted at epoch 8: run the same command again to "
                                       "resume\n")
    assert not parallel.interrupted()  # the job is over: the next one starts afresh


def test_a_ctrl_c_while_a_chunk_computes_lets_it_finish_and_be_recorded(tmp_path, monkeypatch):
    """The chunk's state, losses and epoch change together: a Ctrl-C that arrives meanwhile
    is held until they have, the checkpoint is that chunk's, and resuming equals a run that
    was never interrupted."""
    params, X, _ = setup()
    run_chunk = pipeline.run_chunk

    def interrupted_chunk(*args, **kwargs):
        out = run_chunk(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # after the device's work, before the host's record
        return out

    kw = dict(lr=0.05, epochs=8, epochs_per_chunk=4, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(pipeline, "run_chunk", interrupted_chunk)
    with pytest.raises(KeyboardInterrupt):
        train_many(params, X, **kw)
    monkeypatch.undo()
    assert checkpoint_epoch(tmp_path) == 4
    resumed = train_many(params, X, **kw)
    whole = train_many(params, X, **kw | dict(checkpoint_dir=None))
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(resumed.params, whole.params, strict=True):
        np.testing.assert_array_equal(a, b)
