"""engine.pipeline: the host acts only between compiled chunks (the user's callbacks, the
checkpoint, the bar), at chunk ends and checkpoints; the checkpoint written on Ctrl-C is of
a whole chunk, and resuming it equals a run that was never interrupted."""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abc_jax import checkpoint, init_params, train_many
from abc_jax.checkpoint import checkpoint_epoch
from abc_jax.engine import pipeline
from experiments.common import job

D, H, O, N, M = 3, 4, 2, 12, 2  # rectangular, as in test_train's members


def members(count):
    """Params of ``count`` seeds stacked (count, ...) and X (N, D), float64."""
    ps = [init_params(jax.random.key(s), D, H, O, dtype=jnp.float64) for s in range(count)]
    X = jax.random.normal(jax.random.key(1), (N, D), jnp.float64)
    return jax.tree.map(lambda *a: jnp.stack(a), *ps), X


def setup():
    params, X = members(M)
    held = jax.random.normal(jax.random.key(2), (5, D), jnp.float64)
    return params, X, held


@pytest.fixture
def saved(monkeypatch):
    """The epoch of every checkpoint written."""
    epochs: list[int] = []
    save = checkpoint.save_checkpoint

    def recording(directory, **kw):
        epochs.append(kw["epoch"])
        return save(directory, **kw)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording)
    return epochs


def test_the_host_acts_at_chunk_ends_and_checkpoints(saved, tmp_path):
    params, X, held = setup()
    seen = []

    def spy(epoch, params, metrics):
        seen.append((epoch, sorted(metrics), np.asarray(metrics["eval_loss"])))

    r = train_many(params, X, lr=0.05, epochs=25, epochs_per_chunk=4, eval_every=10,
                   checkpoint_every=10, eval_data=held, checkpoint_dir=tmp_path,
                   callbacks=[spy], progress=False)
    # chunks end at multiples of 4 epochs, at every checkpoint (10, 20) and at the end
    assert [e for e, _, _ in seen] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert all(keys == ["eval_loss", "loss"] for _, keys, _ in seen)
    assert saved == [10, 20, 25] and checkpoint_epoch(tmp_path) == 25
    # evaluations are the loop's (0, 10, 20 and the last epoch), not the host's
    np.testing.assert_array_equal(r.eval_epochs, [0, 10, 20, 25])
    np.testing.assert_array_equal(seen[2][2], r.eval_losses[:, 1])  # the latest, at 10
    np.testing.assert_array_equal(r.metric_epochs, [4, 8, 10, 12, 16, 20, 24, 25])


def test_ctrl_c_writes_the_checkpoint_of_the_last_whole_chunk(saved, tmp_path):
    params, X, _ = setup()

    def interrupt(epoch, params, metrics):
        if epoch == 6:
            raise KeyboardInterrupt

    kw = dict(lr=0.05, epochs=20, epochs_per_chunk=3, checkpoint_every=10,
              checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_many(params, X, callbacks=[interrupt], **kw)
    assert saved == [6] and checkpoint_epoch(tmp_path) == 6
    resumed = train_many(params, X, **kw)
    whole = train_many(params, X, **kw | dict(checkpoint_dir=None))
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(resumed.params, whole.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_ctrl_c_during_a_chunk_leaves_a_whole_record(tmp_path, monkeypatch):
    """A Ctrl-C after the device's work but before the host's record: the record is the
    previous chunk's, whole; the checkpoint is that one, and resuming equals a run that was
    never interrupted."""
    params, X, _ = setup()
    run_chunk = pipeline.run_chunk
    count = []

    def interrupted_chunk(*args, **kwargs):
        out = run_chunk(*args, **kwargs)
        count.append(1)
        if len(count) == 2:
            signal.raise_signal(signal.SIGINT)  # after the device's work, before the record
        return out

    kw = dict(lr=0.05, epochs=12, epochs_per_chunk=4, checkpoint_dir=tmp_path, progress=False)
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


def test_divergence_inside_a_chunk_is_recorded_and_stops_the_run():
    params, X, _ = setup()
    chunks = []
    r = train_many(params, X, lr=[5e2, 1e3], epochs=60, epochs_per_chunk=7, progress=False,
                   callbacks=[lambda e, p, m: chunks.append(e)])
    L = np.asarray(r.losses)
    first = [int(np.argmax(~np.isfinite(row))) for row in L]
    assert np.asarray(r.diverged).all() and np.asarray(r.diverged_at).tolist() == first
    assert all(0 < e < 60 for e in first)
    # once every member has diverged the chunk ends and no other runs
    assert chunks[-1] == max(first) + 1 < 60


def test_a_callback_returning_something_else_is_named():
    params, X, _ = setup()
    with pytest.raises(TypeError, match="callbacks must return a dict of metrics or None"):
        train_many(params, X, lr=0.05, epochs=3, callbacks=[lambda e, p, m: 1.0],
                   progress=False)


def test_a_ctrl_c_python_dropped_still_stops_the_job_after_the_chunk(tmp_path, capsys):
    """Python drops a KeyboardInterrupt raised inside a garbage-collector callback (JAX runs
    one); run_job's handler also records the Ctrl-C, and its callback raises it after the
    chunk."""
    params, X, _ = setup()

    def swallow(epoch, params, metrics):
        if epoch == 4:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # what a garbage-collector callback does with it

    def body():
        train_many(params, X, lr=0.05, epochs=40, epochs_per_chunk=4,
                   callbacks=[swallow, job.interrupt_check], checkpoint_dir=tmp_path,
                   progress=False)
        return 0

    assert job.run_job(body, checkpoint_dir=tmp_path) == job.INTERRUPTED
    assert checkpoint_epoch(tmp_path) == 4
    assert capsys.readouterr().err == ("interrupted at epoch 4: run the same command again to "
                                       "resume\n")
    assert not job.interrupted()  # the job is over: the next one starts afresh


def chunk_sizes(monkeypatch):
    """The members of each compiled chunk the host runs, appended as they run."""
    sizes, run_chunk = [], pipeline.run_chunk

    def counting(state, *args, **kw):
        sizes.append(state.bad.shape[0])
        return run_chunk(state, *args, **kw)

    monkeypatch.setattr(pipeline, "run_chunk", counting)
    return sizes


def test_stopped_members_stop_costing(monkeypatch):
    """Once most members have diverged, the chunk ends and the next ones run the running
    members alone, in a smaller bucket; each member is still what it is alone."""
    params, X = members(8)
    lrs = [0.05, 2e3, 3e3, 0.02, 4e3, 5e3, 6e3, 7e3]  # six diverge within a few epochs
    sizes = chunk_sizes(monkeypatch)
    r = train_many(params, X, lr=lrs, epochs=60, epochs_per_chunk=30, progress=False)
    monkeypatch.undo()
    assert np.asarray(r.diverged).sum() == 6 and sizes[0] == 8 and sizes[-1] == 2
    whole = train_many(params, X, lr=lrs, epochs=60, epochs_per_chunk=60, progress=False)
    for m in (0, 3):  # the survivors, run in a bucket of 2, equal the all-member run
        alone = train_many(jax.tree.map(lambda a, m=m: a[m], params), X, lr=lrs[m], epochs=60,
                           members=1, epochs_per_chunk=60, progress=False)
        np.testing.assert_allclose(r.losses[m], alone.losses[0], rtol=1e-12)
        for a, b in zip(r.params, alone.params, strict=True):
            np.testing.assert_allclose(a[m], b[0], rtol=1e-12)
    np.testing.assert_array_equal(r.diverged_at, whole.diverged_at)


def test_buckets_pad_at_most_a_quarter_in_four_sizes_per_doubling():
    M = 300
    sizes = {n: pipeline.bucket(n, M) for n in range(1, M + 1)}
    assert all(n <= b <= M and 4 * (b - n) < b for n, b in sizes.items())
    for k in range(9):  # the sizes from 2^k up to 2^(k+1)
        assert len({b for b in sizes.values() if 2 ** k <= b < 2 ** (k + 1)}) <= 4


def test_a_padded_bucket_leaves_the_stopped_member_it_borrows_as_it_was(monkeypatch):
    """Nine survivors of 16 run in a bucket of 10, one of it a diverged member as padding:
    the survivors equal their own runs, the diverged members their all-member run."""
    params, X = members(16)
    lrs = 0.03 + 0.01 * np.arange(16)
    lrs[[1, 4, 5, 8, 11, 12, 14]] = 3e3  # these 7 diverge in the first chunk
    sizes = chunk_sizes(monkeypatch)
    r = train_many(params, X, lr=lrs, epochs=40, epochs_per_chunk=20, progress=False)
    monkeypatch.undo()
    assert np.asarray(r.diverged).sum() == 7 and sizes[0] == 16 and sizes[-1] == 10
    every = train_many(params, X, lr=lrs, epochs=40, epochs_per_chunk=40, progress=False)
    np.testing.assert_array_equal(r.diverged_at, every.diverged_at)
    for m in np.flatnonzero(np.asarray(r.diverged)):  # another program: to 1e-12
        np.testing.assert_allclose(r.losses[m], every.losses[m], rtol=1e-12)
        for a, b in zip(r.params, every.params, strict=True):
            np.testing.assert_allclose(a[m], b[m], rtol=1e-12)
    for m in np.flatnonzero(~np.asarray(r.diverged))[[0, 4, 8]]:
        alone = train_many(jax.tree.map(lambda a, m=m: a[m], params), X, lr=lrs[m], epochs=40,
                           members=1, progress=False)
        np.testing.assert_allclose(r.losses[m], alone.losses[0], rtol=1e-12)
        for a, b in zip(r.params, alone.params, strict=True):
            np.testing.assert_allclose(a[m], b[0], rtol=1e-12)
