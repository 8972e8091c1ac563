"""The homework-facing scripts (reproduce_seed, generalization, gradcheck), run in-process in
their quick configuration, and the pieces they stand on: the plain-Python homework functions
checked against the library, and every conclusion sentence on a case from each side."""

import contextlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from experiments import common as _common
from experiments import generalization, gradcheck
from experiments import reproduce_seed as repro
from experiments.common import averaging, homework

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _main(module, argv):
    """module.main(argv) in this process; returns (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = module.main(argv)
    return code, buf.getvalue()


def _files(out):
    files = {p.name: p for p in out.iterdir()}
    assert not any(f.endswith(".tmp") for f in files)
    for f in files.values():
        assert f.stat().st_size > 0
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return files


# -- the scripts, in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduce_quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    code, printed = _main(repro, ["--quick", "--out", str(tmp / "out"),
                                  "--docs", str(tmp / "docs")])
    assert code == 0
    return tmp, printed, json.loads((tmp / "out" / "metrics.json").read_text())


@pytest.mark.integration
def test_reproduce_seed_writes_its_files(reproduce_quick):
    tmp, _, m = reproduce_quick
    files = _files(tmp / "out")
    assert set(files) == {
        "config.json", "metrics.json", "loss.csv", "gradcheck.csv", "timing.csv",
        "generalization.csv", "homework_check.csv", "homework_check_simulated.csv",
        "reproduce_loss.png", "graph.png", "reproduce_timing.png",
        "reproduce_generalization.png", "homework_check.png"}
    config = json.loads(files["config.json"].read_text())
    assert config["quick"] is True and config["epochs"] == 20
    assert files["loss.csv"].read_text().count("\n") == 1 + 20
    assert files["gradcheck.csv"].read_text().count("\n") == 1 + 27  # every entry of A, B, C
    assert files["homework_check.csv"].read_text().count("\n") == 1 + 27
    assert sorted(p.name for p in (tmp / "docs").iterdir()) == ["reproduce_loss.png", "results"]
    rendered = json.loads((tmp / "docs" / "results" / "reproduce_seed.json").read_text())
    assert rendered.pop("tables") and rendered == m


@pytest.mark.integration
def test_reproduce_seed_prints_the_numbers_it_stores(reproduce_quick):
    _, printed, m = reproduce_quick
    listing = m["loss_listing"]
    assert listing["final_loss"] < listing["initial_loss"]
    assert f"L = {listing['initial_loss']!r}" in printed  # the homework's listing, full digits
    assert listing["max_abs_diff_python"] <= 1e-12
    worst = m["gradient_check"]["worst_rel"]
    assert worst["manual"] <= 1e-12 and worst["python"] <= 1e-12 and worst["finite_diff"] <= 1e-6
    ratios = m["timing"]["ratio_to_batch_grad"]
    assert set(ratios) == {"jax_grad", "fd_grad", "python_backprop", "python_fd"}
    assert all(r is None or r > 0 for by_k in ratios.values() for r in by_k.values())
    assert set(m["generalization"]["heldout_loss"]) == {"average", "batch_gd", "adam"}
    assert m["homework_check"]["n_beyond_rounding"] == 15
    answers = m["answers"]
    assert [a[:3] for a in answers] == ["1. ", "2. ", "3. "]
    assert "Answers:\n" + "\n".join(answers) in printed
    assert "Yes:" in answers[0] and "15 of 27" in answers[0]
    for line in m["homework_check"]["findings"]:
        assert line in printed


@pytest.mark.integration
def test_generalization_quick(tmp_path):
    out = tmp_path / "gen"
    code, printed = _main(generalization, ["--quick", "--out", str(out),
                                           "--docs", str(tmp_path / "docs")])
    assert code == 0
    files = _files(out)
    assert set(files) == {"config.json", "metrics.json", "curves.csv", "train_losses.csv",
                          "teacher_curves.csv", "generalization.png", "teacher.png"}
    assert files["train_losses.csv"].read_text().count("\n") == 1 + 20
    m = json.loads(files["metrics.json"].read_text())
    for key in ("heldout_loss", "train_loss", "norm_C", "heldout_reduction"):
        assert set(m[key]) == {"average", "batch_gd", "adam"}
    assert m["one_epoch_gap"] < 1e-12  # mean of N single steps == one step on the mean loss
    assert m["conclusion"] and all(line in printed for line in m["conclusion"])
    assert {p.name for p in (tmp_path / "docs").iterdir()} == {"generalization.png",
                                                                 "teacher.png", "results"}
    taught = m["teacher"]  # the learnable task, in its quick configuration
    assert taught["noise_floor"] == pytest.approx(3 * 0.1**2)
    assert set(taught["ratio"]) == {"batch_gd", "adam", "average", "linear"}
    assert taught["conclusion"] in printed and "/ noise floor" in printed


@pytest.mark.integration
def test_gradcheck_quick_and_rectangular(tmp_path):
    code, printed = _main(gradcheck, ["--quick", "--out", str(tmp_path / "q")])
    assert code == 0 and json.loads((tmp_path / "q" / "config.json").read_text())["n"] == 4
    out = tmp_path / "gc"
    code, printed = _main(gradcheck, ["--in-dim", "5", "--hidden-dim", "4", "--out-dim", "3",
                                      "--out", str(out)])
    assert code == 0
    files = _files(out)
    m = json.loads(files["metrics.json"].read_text())
    worst = m["worst_rel"]
    assert worst["float64/manual vs jax.grad"] <= 1e-12
    assert worst["float32/manual vs jax.grad"] <= 1e-5
    assert worst["float64/finite diff vs jax.grad"] <= 1e-7
    assert len(m["rows"]) == 12  # 2 dtypes x 2 comparisons x 3 parameters
    assert files["gradcheck.csv"].read_text().count("\n") == 13
    assert files["gradcheck.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # errors, log axis
    assert json.loads(files["config.json"].read_text())["hidden_dim"] == 4
    assert printed.count("manual vs jax.grad") == 6


def test_gradcheck_bad_shape_exits_2(tmp_path, capsys):
    assert gradcheck.main(["--in-dim", "0", "--out", str(tmp_path / "x")]) == 2
    assert "in_dim" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the homework's plain-Python implementation ------------------------------------------


def _params(key, D=4, H=3, O=2, dtype=jnp.float64):
    kp, kx = jax.random.split(key)
    return abc_jax.init_params(kp, D, H, O, dtype=dtype), jax.random.normal(kx, (5, D), dtype)


def test_python_backprop_equals_batch_grad(key):
    params, X = _params(key)  # D, H, O distinct: a transposed gradient would not fit
    L, grads = homework.py_loss_and_grad(*homework.to_lists(params, X))
    assert L == pytest.approx(float(abc_jax.batch_loss(params, X)), rel=1e-13)
    errs = abc_jax.grad_errors(abc_jax.Params(*map(jnp.asarray, grads)),
                               abc_jax.batch_grad(params, X))
    assert max(e["rel"] for e in errs.values()) <= 1e-12


def test_python_finite_differences_match_the_oracle(key):
    params, X = _params(key)
    grads = homework.py_fd_grad(*homework.to_lists(params, X))
    errs = abc_jax.grad_errors(abc_jax.Params(*map(jnp.asarray, grads)),
                               abc_jax.oracle_grad(params, X))
    assert max(e["rel"] for e in errs.values()) <= 1e-7


def test_python_sigmoid_is_stable():
    for t in (-1e4, -30.0, -1.0, 0.0, 2.0, 1e4):
        assert homework.py_sigmoid(t) == pytest.approx(float(jax.nn.sigmoid(t)), rel=1e-14, abs=0)


def test_python_gradient_descent_matches_train(key):
    params, X = _params(key)
    res = abc_jax.train(params, X, lr=0.05, epochs=7, progress=False)
    py = homework.py_gradient_descent(*homework.to_lists(params, X), lr=0.05, epochs=7)
    np.testing.assert_allclose(py, np.asarray(res.losses), rtol=1e-12)


# -- reproduce_seed's pieces ---------------------------------------------------------------


def test_timing_skips_what_would_pass_the_budget():
    rows = _common.time_gradients([2, 3], 4, repro.METHODS, dtype=jnp.float64, budget_s=1e-9,
                                  min_time=0)
    by = {(r["K"], r["method"]): r for r in rows}
    assert [r["method"] for r in rows] == list(repro.METHODS) * 2
    assert all(by[(2, m)]["median_s"] > 0 for m in repro.METHODS)  # the first K: all timed
    assert by[(2, "batch_grad")]["ratio_to_batch_grad"] == 1.0
    assert by[(3, "python_fd")]["median_s"] is None
    assert by[(3, "python_fd")]["ratio_to_batch_grad"] is None
    assert by[(3, "batch_grad")]["ratio_to_batch_grad"] == 1.0  # the reference: always timed


def test_derivation_answer_follows_the_errors():
    yes = repro.derivation_answer({"manual": 0.0, "python": 2e-16, "finite_diff": 3e-10})
    no = repro.derivation_answer({"manual": 3e-3, "python": 2e-16, "finite_diff": 3e-10})
    assert "right? Yes" in yes and "0.0e+00" in yes
    assert "right? No" in no and "3.0e-03" in no


def test_speed_answer_states_each_ratio():
    rows = [{"K": K, "N": 8, "method": m, "median_s": t, "ratio_to_batch_grad": r}
            for K, m, t, r in ((3, "batch_grad", 5e-5, 1.0), (3, "python_fd", 5e-3, 100.0),
                               (3, "jax_grad", 4e-5, 0.8), (3, "fd_grad", 1e-4, 2.0),
                               (3, "python_backprop", 2e-3, 40.0))]
    rows += [{**rows[0], "K": 9},
             {**rows[1], "K": 9, "median_s": None, "ratio_to_batch_grad": None}]
    rows += [{**r, "K": 9} for r in rows[2:5]]
    text = repro.speed_answer(rows)
    assert "at K = 3 batch_grad takes 50 us" in text and "python_fd 100x" in text
    assert text.count("python_fd") == 1  # skipped at K = 9: not stated


def test_averaging_answer_uses_the_measured_losses():
    text = repro.averaging_answer(_fake(avg=4.0, gd=0.01))
    assert "400x the held-out loss of batch GD" in text and "fits its own sample" in text
    assert repro.averaging_answer({**_fake(4.0, 0.01), "final": {}, "diverged": {"adam": "x"}}
                                  ).startswith("3. A run diverged")


# -- averaging's sentences: one case on each side --------------------------------------------


def test_checkpoints_and_average():
    c = averaging.checkpoints(1000, 10)
    assert c[:2] == [0, 1] and c[-1] == 1000 and c == sorted(set(c))
    assert averaging.checkpoints(0) == [0]
    stacked = abc_jax.Params(*(jnp.arange(2.0 * n).reshape(2, n) for n in (1, 2, 3)))
    np.testing.assert_array_equal(averaging.average_params(stacked).C, [1.5, 2.5, 3.5])


def test_carry_over_sentence_on_each_side():
    five = averaging.carry_over_sentence(own=0.4, single=2.0)  # held-out 5x its own loss
    assert "5x" in five and "not the distribution" in five and "carries over" not in five
    close = averaging.carry_over_sentence(own=0.4, single=0.5)
    assert "1.25x" in close and "it carries over to other x" in close
    assert "carries over" in averaging.carry_over_sentence(own=0.0, single=0.0)
    assert "not the distribution" in averaging.carry_over_sentence(own=0.0, single=1.0)
    with pytest.raises(ValueError, match="own"):
        averaging.carry_over_sentence(own=-1.0, single=1.0)


def test_average_and_one_epoch_sentences_on_each_side():
    worse = averaging.average_sentence(avg=4.0, gd=0.01, start=10.0)
    assert "400x the held-out loss of batch GD" in worse and "better than not training" in worse
    assert "60.0% reduction" in worse
    better = averaging.average_sentence(avg=0.001, gd=0.01, start=10.0)
    assert "no worse than batch GD" in better
    above = averaging.average_sentence(avg=20.0, gd=0.01, start=10.0)
    assert "no better than not training" in above and "100.0% increase" in above


def _fake(avg, gd, own=1e-4, single=5.0, gap=0.0, best_c=0.1):
    def row(m, L, c):
        return {"method": m, "heldout_loss": L, "train_loss": L, "norm_C": c,
                "singular_values_C": [c, 0.0]}

    return {
        "initial": row("initial", 10.0, 2.0), "diverged": {}, "own_sample_loss": own,
        "single_copy_heldout": single, "one_epoch_gap": gap,
        "final": {"average": row("average", avg, 1.5), "batch_gd": row("batch_gd", gd, best_c),
                  "adam": row("adam", gd, best_c)},
    }


def test_conclusion_and_metrics_follow_the_numbers():
    worse = " ".join(averaging.conclusion(_fake(avg=4.0, gd=0.01)))
    assert "400x" in worse and "not the distribution" in worse and "same point" in worse
    assert "C shrinking towards the trivial minimiser" in worse  # 1e-3 vs (0.1 / 2)^2
    carries = " ".join(averaging.conclusion(_fake(avg=4.0, gd=0.01, own=2.0, single=2.5,
                                                  gap=1e-3, best_c=1.9)))
    assert "it carries over" in carries and "already differ by 1.0e-03" in carries
    assert "not C shrinking" in carries and "same point" not in carries
    m = averaging.metrics(_fake(avg=20.0, gd=0.01))
    assert m["average_better_than_start"] is False and m["average_over_batch_gd_heldout"] == 2000
