"""Learning from data: held-out evaluation and early stopping in train, predict, saved params.

A student of the same shape learns a teacher's outputs plus noise, so the
held-out loss falls and then (few rows, many epochs) flattens: early stopping
has something to find. Every held-out figure is checked against the independent
reference loss at params from a plain ``train`` of that many epochs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import ref_batch_loss, ref_sigmoid

import abc_jax
from abc_jax import Batch, Params
from abc_jax.checkpoint import checkpoint_epoch

D, H, O = 4, 5, 3  # all different
EVERY = 10  # eval_every (and epochs_per_chunk): the evaluation period


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


def test_a_checkpoint_of_other_held_out_data_or_patience_is_refused(tmp_path):
    params, train_set, held = teacher_problem()
    run(params, train_set, 20, checkpoint_dir=tmp_path, eval_data=held)
    other = Batch(held.X, T=held.T + 1.0)
    for kw in (dict(eval_data=other), dict(eval_data=held, patience=2), dict()):
        with pytest.raises(ValueError, match="evaluation"):
            run(params, train_set, 30, checkpoint_dir=tmp_path, **kw)


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


def ref_outputs(params, X):
    A, B, C = params
    return (ref_sigmoid(X @ A.T) + X @ B.T) @ C.T


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-13), (jnp.float32, 1e-5)])
def test_predict_equals_the_reference_outputs_whole_and_chunked(dtype, tol):
    params, train_set, _ = teacher_problem()
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    X = train_set.X.astype(dtype)
    want = ref_outputs(jax.tree.map(lambda a: a.astype(jnp.float64), params),
                       X.astype(jnp.float64))
    for chunk in (None, 5, 100):
        W = abc_jax.predict(params, X, chunk_size=chunk)
        assert W.shape == (len(X), O) and W.dtype == dtype
        np.testing.assert_allclose(W, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(abc_jax.predict(params, Batch(X, T=train_set.T)),
                                  abc_jax.predict(params, X))
    L = jnp.mean(jnp.sum((abc_jax.predict(params, X) - train_set.T) ** 2, axis=1))
    np.testing.assert_allclose(L, abc_jax.batch_loss(params, Batch(X, T=train_set.T)),
                               rtol=10 * tol)


def test_predict_rejects_bad_input():
    params, train_set, _ = teacher_problem()
    with pytest.raises(ValueError, match="X must have D = 4 columns"):
        abc_jax.predict(params, train_set.X[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        abc_jax.predict(params, train_set.X, chunk_size=0)
    with abc_jax.value_checks(), pytest.raises(ValueError, match="X must be finite"):
        abc_jax.predict(params, train_set.X.at[0, 0].set(jnp.inf))


# --- saved params ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_save_and_load_params_round_trip(tmp_path, dtype):
    params = abc_jax.init_params(jax.random.key(1), D, H, O, dtype=dtype)
    path = abc_jax.save_params(tmp_path / "params.npz", params)
    back = abc_jax.load_params(path)
    assert isinstance(back, Params)
    for a, b in zip(back, params, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_params_names_what_is_wrong(tmp_path):
    np.savez(tmp_path / "two.npz", A=np.ones((2, 3)), B=np.ones((2, 3)))
    with pytest.raises(ValueError, match="missing C"):
        abc_jax.load_params(tmp_path / "two.npz")
    np.savez(tmp_path / "bad.npz", A=np.ones((2, 3)), B=np.ones((2, 3)), C=np.ones((4, 5)))
    with pytest.raises(ValueError, match="do not chain"):
        abc_jax.load_params(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz is not an array file \(\.npz\)"):
        abc_jax.load_params(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match=r"a folder without params\.npz or a checkpoint"):
        abc_jax.load_params(tmp_path)
    with pytest.raises(TypeError, match="params must be Params"):
        abc_jax.save_params(tmp_path / "x.npz", {"A": 1})
    assert not (tmp_path / "x.npz").exists()


def test_load_params_reads_a_checkpoint_its_best_params_where_evaluation_ran(tmp_path):
    params, train_set, held = teacher_problem(n_train=6, noise=1.0)
    r = run(params, train_set, 300, eval_data=held, patience=2, checkpoint_dir=tmp_path / "e")
    chex_equal = np.testing.assert_array_equal
    for a, b in zip(abc_jax.load_params(tmp_path / "e"), r.params, strict=True):
        chex_equal(np.asarray(a), np.asarray(b))  # the best params, as train returned
    plain = run(params, train_set, 30, checkpoint_dir=tmp_path / "p")
    for a, b in zip(abc_jax.load_params(tmp_path / "p" / "checkpoint.npz"), plain.params,
                    strict=True):
        chex_equal(np.asarray(a), np.asarray(b))  # the last params
    many = abc_jax.train_many(params, train_set, lr=[0.05, 0.1], epochs=3, progress=False,
                              checkpoint_dir=tmp_path / "m")
    assert many.losses.shape == (2, 3)
    with pytest.raises(ValueError, match="a checkpoint of 2 members"):
        abc_jax.load_params(tmp_path / "m")
