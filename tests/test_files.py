"""Params on disk (``abc_jax.files``): save_params and load_params round-trip every float
dtype bit for bit, load_params reads a checkpoint (the params its run returns) and
names what is wrong with a file; files are written whole."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import Batch, Params

D, H, O = 4, 5, 3  # all different


def teacher_problem(n_train=6, n_eval=40, noise=1.0):
    rng = np.random.default_rng(0)
    teacher = Params(*(rng.standard_normal(s) for s in [(H, D), (H, D), (O, H)]))
    X = rng.standard_normal((n_train + n_eval, D))
    T = np.asarray(abc_jax.predict(teacher, X)) + noise * rng.standard_normal((len(X), O))
    student = abc_jax.init_params(jax.random.key(3), D, H, O, dtype=np.float64)
    return student, Batch(X[:n_train], T=T[:n_train]), Batch(X[n_train:], T=T[n_train:])


def run(params, train_set, epochs, **kw):
    return abc_jax.train(params, train_set, lr=0.05, epochs=epochs, progress=False,
                         epochs_per_chunk=10, eval_every=10, **kw)


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


def test_load_params_refuses_a_diverged_run_folder_unless_asked(tmp_path):
    """A run folder as train.py leaves a diverged run: metrics.json with status "diverged"
    and its epoch, a checkpoint, no params.npz."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, D)) * [1.0, 1000.0, 1.0, 1.0]
    params = abc_jax.init_params(jax.random.key(0), D, H, O, dtype=np.float32)
    with pytest.raises(abc_jax.DivergenceError) as e:
        abc_jax.train(params, Batch(X, T=rng.standard_normal((16, O))), lr=0.05, epochs=20,
                      progress=False, checkpoint_dir=tmp_path / "checkpoint")
    abc_jax.files.write_json(tmp_path / "metrics.json",
                             {"status": "diverged", "diverged_at_epoch": e.value.epoch})
    assert abc_jax.files.run_status(tmp_path) == {"status": "diverged",
                                                  "diverged_at_epoch": e.value.epoch}
    with pytest.raises(ValueError, match=f"not finite at epoch {e.value.epoch}.*allow_diverged"):
        abc_jax.load_params(tmp_path)
    back = abc_jax.load_params(tmp_path, allow_diverged=True)
    want = abc_jax.load_params(tmp_path / "checkpoint" / "checkpoint.npz")
    for a, b in zip(back, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.isfinite(a).all()) for a in back)
    # a finished run, and a folder without metrics.json, load as before
    abc_jax.files.write_json(tmp_path / "metrics.json", {"status": "finished"})
    assert abc_jax.files.run_status(tmp_path) == {"status": "finished"}
    abc_jax.load_params(tmp_path)
    assert abc_jax.files.run_status(tmp_path / "checkpoint") is None


def test_json_holds_null_for_nan_and_inf(tmp_path):
    path = abc_jax.files.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, np.inf],
                                                          "c": np.float32(np.nan)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": None}
    assert "NaN" not in path.read_text() and '"nan"' not in path.read_text()
