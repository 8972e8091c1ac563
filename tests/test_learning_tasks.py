"""The learning tasks: experiments/real_data.py (the diabetes data against scikit-learn) and
the teacher task of experiments/generalization.py (teacher.py), in-process and tiny."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import abc_jax
from experiments.common import teacher

pytestmark = pytest.mark.integration  # experiment runs: the integration run (.ci/run)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"



@pytest.mark.integration
def test_real_data_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    real_data = importlib.import_module("experiments.real_data")
    out, docs = tmp_path / "real_data", tmp_path / "docs"
    assert real_data.main(["--quick", "--out", str(out), "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.json", "real_data.csv",
                                               "real_data.png"}
    assert sorted(p.name for p in docs.iterdir()) == ["real_data.png", "results"]
    rendered = json.loads((docs / "results" / "real_data.json").read_text())
    assert rendered.pop("tables")["real_data"]["header"][0] == "model"
    assert rendered == json.loads((out / "metrics.json").read_text())
    assert (docs / "real_data.png").stat().st_size < 150_000
    assert json.loads((out / "config.json").read_text())["quick"] is True
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == {"train": 342, "test": 100} and m["folds"] == 3
    assert set(m["summary"]) == set(real_data.MODELS)
    runs = m["runs"]
    assert [r["model"] for r in runs].count("ABC") == 2  # --quick: 2 seeds; Ridge: one run
    assert [r["model"] for r in runs].count("Ridge") == 1
    for r in runs:
        assert r["mse"] > 0 and r["r2"] < 1
    ridge, abc = m["summary"]["Ridge"], m["summary"]["ABC"]
    assert 0.3 < ridge["r2"]["mean"] < 0.7 and ridge["best"]["alpha"] in (0.1, 10.0)
    assert abc["best"]["hidden_dim"] in (4, 8) and len(abc["cv_r2_folds"]) == 3
    assert abc["n_params"] == 2 * abc["best"]["hidden_dim"] * 11 + abc["best"]["hidden_dim"]
    assert abc["cv_r2"]["mean"] == pytest.approx(np.mean(abc["cv_r2_folds"]))
    assert abc["r2"]["mean"] == pytest.approx(
        np.mean([r["r2"] for r in runs if r["model"] == "ABC"]))
    assert len(m["grids"]["ABC"]) == 2 and len(m["grids"]["MLP"]) == 2  # H (4, 8) x one lr
    assert "test R^2" in printed and "ABC without bias" in printed


def test_real_data_split_is_fixed_by_the_seed():
    pytest.importorskip("sklearn")
    real_data = importlib.import_module("experiments.real_data")
    d = real_data.load(100, seed=3)
    assert sorted(np.r_[d["train"], d["test"]].tolist()) == list(range(442))
    assert len(d["test"]) == 100
    np.testing.assert_array_equal(real_data.load(100, seed=3)["test"], d["test"])
    assert not np.array_equal(real_data.load(100, seed=4)["test"], d["test"])


@pytest.mark.integration
def test_real_data_without_sklearn_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    real_data = importlib.import_module("experiments.real_data")
    assert real_data.main(["--quick", "--out", str(tmp_path / "o")]) == 2
    assert 'pip install -e ".[data]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_teacher_noise_floor_is_the_teachers_own_loss():
    task = teacher.make_task((4, 6, 2), sigma=0.3, gain=2.0, n_train=8, n_test=20000, seed=1)
    assert task["floor"] == pytest.approx(2 * 0.3**2) == teacher.noise_floor(2, 0.3)
    own = float(abc_jax.batch_loss(task["teacher"], task["test"]))  # mean of ||noise||^2
    assert own == pytest.approx(task["floor"], rel=0.03)  # its sampling std: 0.7%
    assert task["test"].T.shape == (20000, 2) and task["train"].X.shape == (8, 4)
    pure = abc_jax.Batch(task["test"].X, T=abc_jax.predict(task["teacher"], task["test"].X))
    assert float(abc_jax.batch_loss(task["teacher"], pure)) == 0.0  # targets: f_T(x) + noise


def test_teacher_task_gd_beats_the_average_of_copies():
    res = teacher.run_teacher((3, 4, 2), sigma=0.1, gain=3.0, n_train=24, n_test=256,
                              epochs=300, lr=0.1, adam_lr=0.01, ps_lr=0.01, ps_epochs=30,
                              n_evals=10)
    r = res["ratio"]
    assert r["batch_gd"] < r["average"] and res["heldout"]["batch_gd"] < res["start_heldout"]
    assert res["curves"]["batch_gd"]["epochs"] == list(range(0, 301, 30))
    assert res["heldout"]["batch_gd"] == res["curves"]["batch_gd"]["heldout"][-1]
    for m, v in res["heldout"].items():
        assert r[m] == pytest.approx(v / res["noise_floor"])
    assert "GD on the mean loss: held-out / noise floor" in teacher.conclusion(res)


def test_per_sample_average_trains_each_copy_on_its_own_target():
    task = teacher.make_task((3, 4, 2), sigma=0.1, gain=1.0, n_train=3, n_test=4, seed=0)
    data, start = task["train"], task["start"]
    avg = teacher.per_sample_average(start, data, lr=0.05, epochs=5)
    copies = [abc_jax.train(start, abc_jax.Batch(data.X[i:i + 1], T=data.T[i:i + 1]), lr=0.05,
                            epochs=5, progress=False).params for i in range(3)]
    for got, *each in zip(avg, *copies, strict=True):
        np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-12)
    one_epoch = teacher.per_sample_average(start, data, lr=0.05, epochs=1)
    gd = abc_jax.train(start, data, lr=0.05, epochs=1, progress=False).params  # the mean of
    for a, b in zip(one_epoch, gd, strict=True):  # N single steps is one step on the mean loss
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
