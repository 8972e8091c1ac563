"""experiments/predict.py, called in-process: its CSV is abc_jax.predict of the params it reads
(a params.npz, a train.py results folder, its checkpoint); a bad file is one line, exit 2."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from experiments import predict as predict_script

pytestmark = pytest.mark.integration  # script runs: the integration run (.ci/run)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _csv(path):
    """(header, values (N, O)) of a predictions file."""
    header, *rows = path.read_text().splitlines()
    return header.split(","), np.array([[float(v) for v in r.split(",")] for r in rows])


def _check_predictions(out, params_path, X):
    """The CSV at ``out`` holds abc_jax.predict(load_params(params_path), X), header w1..wO."""
    want = np.asarray(abc_jax.predict(abc_jax.load_params(params_path), X))
    header, got = _csv(out)
    assert header == [f"w{i + 1}" for i in range(want.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train.py --quick results folder (D = 4, O = 2, float32) and samples for it."""
    tmp = tmp_path_factory.mktemp("predict")
    train_script = importlib.import_module("experiments.train")
    assert train_script.main(["--quick", "--in-dim", "4", "--hidden-dim", "5", "--out-dim", "2",
                              "--out", str(tmp / "run"), "--no-progress"]) == 0
    X = np.random.default_rng(3).standard_normal((9, 4))
    np.savetxt(tmp / "x.csv", X, delimiter=",", header="a,b,c,d", comments="")
    return tmp, X


def test_a_saved_params_npz_float64_and_target_columns(tmp_path, capsys):
    kp, kx = jax.random.split(jax.random.key(1))
    params = abc_jax.init_params(kp, 3, 6, 2, dtype=jnp.float64)
    abc_jax.save_params(tmp_path / "p.npz", params)
    X = np.asarray(jax.random.normal(kx, (11, 3), jnp.float64))
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "w.csv"
    assert predict_script.main(["--params", str(tmp_path / "p.npz"), "--data",
                                str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    _check_predictions(out, tmp_path / "p.npz", X)
    assert f"predicted 11 rows of {tmp_path / 'x.npy'}" in capsys.readouterr().out
    np.testing.assert_array_equal(_csv(out)[1], np.asarray(abc_jax.predict(params, X)))
    # a file with a target column between the samples' columns: --target-cols leaves it out
    np.savetxt(tmp_path / "xy.csv", np.c_[X[:, :1], np.ones(11), X[:, 1:]], delimiter=",")
    assert predict_script.main(["--params", str(tmp_path / "p.npz"), "--data",
                                str(tmp_path / "xy.csv"), "--target-cols", "2"]) == 0
    _check_predictions(tmp_path / "preds.csv", tmp_path / "p.npz", X)  # default: beside p.npz


@pytest.mark.parametrize("which", ["folder", "checkpoint"])
def test_a_train_run_folder_and_its_checkpoint(trained, which, tmp_path):
    tmp, X = trained
    run = tmp / "run"
    path = run if which == "folder" else run / "checkpoint" / "checkpoint.npz"
    out = tmp_path / "w.csv"
    assert predict_script.main(["--params", str(path), "--data", str(tmp / "x.csv"),
                                "--out", str(out)]) == 0
    _check_predictions(out, path, X)
    _check_predictions(out, run / "params.npz", X)  # the run's last params: the same model
    assert _csv(out)[1].shape == (9, 2)


def test_the_default_out_is_beside_the_params(tmp_path):
    assert predict_script.default_out(tmp_path) == tmp_path / "preds.csv"
    assert predict_script.default_out(tmp_path / "p.npz") == tmp_path / "preds.csv"


@pytest.mark.parametrize("bad", ["missing", "wrong-d", "text", "params"])
def test_a_bad_file_is_one_line_naming_it_and_exit_code_2(trained, bad, tmp_path, capsys):
    tmp, _ = trained
    data = {"missing": tmp_path / "missing.csv", "wrong-d": tmp_path / "five.npy",
            "text": tmp_path / "text.csv", "params": tmp / "x.csv"}[bad]
    np.save(tmp_path / "five.npy", np.zeros((3, 5)))
    (tmp_path / "text.csv").write_text("1,2,3,x\n")
    params = tmp_path / "nothing.npz" if bad == "params" else tmp / "run"
    out = tmp_path / "w.csv"
    assert predict_script.main(["--params", str(params), "--data", str(data),
                                "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and str(params if bad == "params" else data) in line
    if bad == "wrong-d":
        assert "D = 5" in line and "D = 4" in line
    assert not out.exists()


def test_config_run_then_report_in_process(trained, tmp_path, capsys):
    """run(config) predicts and prints nothing; report writes the CSV and prints one line."""
    tmp, X = trained
    res = predict_script.run(predict_script.Config(params=tmp / "run", data=tmp / "x.csv"))
    assert capsys.readouterr().out == "" and res["W"].shape == (9, 2)
    assert predict_script.report(res, tmp_path / "w.csv") == tmp_path / "w.csv"
    _check_predictions(tmp_path / "w.csv", tmp / "run", X)
    assert capsys.readouterr().out.startswith("predicted 9 rows")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A train.py run that diverges (a column x1000 at --lr 0.05, float32) and its data."""
    tmp = tmp_path_factory.mktemp("diverged")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 3)) * [1.0, 1000.0, 1.0]
    np.savetxt(tmp / "xy.csv", np.c_[X, X @ [1.0, 0.1, -2.0]], delimiter=",")
    train_script = importlib.import_module("experiments.train")
    assert train_script.main(["--data", str(tmp / "xy.csv"), "--target-cols", "-1", "--epochs",
                              "30", "--lr", "0.05", "--out", str(tmp / "run"),
                              "--no-progress"]) == 1
    return tmp


def test_a_diverged_run_is_refused_naming_its_epoch(diverged, capsys):
    run = diverged / "run"
    epoch = abc_jax.files.run_status(run)["diverged_at_epoch"]
    args = ["--params", str(run), "--data", str(diverged / "xy.csv"), "--target-cols", "-1"]
    assert predict_script.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"not finite at epoch {epoch}" in line and "--allow-diverged" in line
    assert not (run / "preds.csv").exists()
    # asked for anyway: the checkpoint's params, those before the last finite epoch's update
    assert predict_script.main([*args, "--allow-diverged", "--out", str(diverged / "p.csv")]) == 0
    params = abc_jax.load_params(run, allow_diverged=True)
    X = np.loadtxt(diverged / "xy.csv", delimiter=",")[:, :-1]
    preds = np.loadtxt(diverged / "p.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(preds, np.asarray(abc_jax.predict(params, X.astype(np.float32))
                                                 )[:, 0], rtol=1e-5)
    assert np.isfinite(preds).all()


def test_non_finite_predictions_are_never_written(tmp_path, capsys):
    params = abc_jax.init_params(jax.random.key(0), 3, 4, 2)  # float32
    params = params._replace(C=params.C * 1e30)
    abc_jax.save_params(tmp_path / "p.npz", params)
    np.save(tmp_path / "x.npy", np.r_[np.zeros((2, 3)), 1e10 * np.ones((1, 3))])
    assert predict_script.main(["--params", str(tmp_path / "p.npz"), "--data",
                                str(tmp_path / "x.npy")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "of 1 of 3 rows" in line and "first: row 3" in line
    assert not (tmp_path / "preds.csv").exists()


def test_preprocessed_params_predict_in_the_targets_units(tmp_path):
    """A run folder as train.py --standardize writes it (params.npz with the preprocessing,
    config.json with "standardize": true): predict.py reads the preprocessing back and its
    predictions are the estimator's, in the targets' units."""
    sklearn_module = pytest.importorskip("abc_jax.sklearn")
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 3)) * [1.0, 1000.0, 0.1]
    Y = np.c_[X @ [1.0, 0.002, 5.0] + 100.0, np.tanh(X[:, 0]) * 50.0]
    est = sklearn_module.ABCRegressor(hidden_dim=4, epochs=200, random_state=0).fit(X, Y)
    run = tmp_path / "run"
    abc_jax.save_params(run / "params.npz", est.params_, preprocessing=est.preprocessing_)
    abc_jax.files.write_json(run / "config.json", {"standardize": True, "bias": True})
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    assert predict_script.main(["--params", str(run), "--data", str(tmp_path / "x.csv")]) == 0
    np.testing.assert_allclose(_csv(run / "preds.csv")[1], est.predict(X), rtol=1e-12)
    # the same folder without its preprocessing: refused (its units would be wrong)
    abc_jax.save_params(run / "params.npz", est.params_)
    assert predict_script.main(["--params", str(run), "--data", str(tmp_path / "x.csv"),
                                "--out", str(tmp_path / "w.csv")]) == 2
    assert not (tmp_path / "w.csv").exists()
