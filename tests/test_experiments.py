"""The experiment scripts: each runs in its quick configuration and writes its files, and the
logic they hold (plain-Python baselines, the timing helper, timing budget, slope fit,
conclusions) is right."""

import importlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import abc_jax
from experiments import bench_gradients as bench
from experiments import bench_train
from experiments import common as _common
from experiments import optimizers as opt

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _params(key, D=4, H=3, O=2, dtype=jnp.float64):
    kp, kx = jax.random.split(key)
    return abc_jax.init_params(kp, D, H, O, dtype=dtype), jax.random.normal(kx, (5, D), dtype)


# -- the scripts end to end -------------------------------------------------------------


def _run_quick(name, tmp_path, capsys):
    out, docs = tmp_path / name, tmp_path / "docs"
    assert importlib.import_module(f"experiments.{name}").main(
        ["--quick", "--out", str(out), "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json"} <= files
    assert any(f.endswith(".csv") for f in files) and any(f.endswith(".png") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    for f in out.iterdir():
        assert f.stat().st_size > 0
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copies = [p for p in docs.iterdir() if p.is_file()]  # the key figures, small enough
    # and the numbers the docs are rendered from: the run's metrics.json as docs/results/NAME.json
    rendered = json.loads((docs / "results" / f"{name}.json").read_text())
    assert rendered.pop("tables") and rendered == json.loads((out / "metrics.json").read_text())
    assert copies
    for copy in copies:
        assert copy.suffix == ".png" and (out / copy.name).exists()
        assert copy.stat().st_size < 150_000
    config = json.loads((out / "config.json").read_text())
    assert config["quick"] is True
    return json.loads((out / "metrics.json").read_text()), printed


@pytest.mark.smoke
@pytest.mark.integration
def test_bench_gradients_quick(tmp_path, capsys):
    m, printed = _run_quick("bench_gradients", tmp_path, capsys)
    assert set(m["slopes"]) == set(bench.METHODS)
    assert all(math.isfinite(s) for s in m["slopes"].values())
    for method in bench.METHODS:
        if method != "batch_grad":
            assert all(r > 0 for r in m["ratio_to_batch_grad"][method].values())
    errs = m["rel_err_vs_float64"]  # float32 at "highest" against jax.grad in float64
    assert max(errs[k] for k in ("batch_grad", "jax_grad", "jacfwd", "jvp_grad")) < 1e-5
    assert max(errs[k] for k in ("python_backprop", "python_fd")) < 1e-9  # Python is float64
    assert errs["fd_grad"] < 1e-1
    env = m["environment"]
    assert env["dtype"] == "float32" and env["jax_version"] == jax.__version__ and env["device"]
    assert "batch_grad" in printed
    assert env["precision"] == "highest" and m["precision"]["batch_grad"] == "highest"
    assert m["device"]["batch_grad"] == _common.device_label()
    assert m["device"]["python_fd"].startswith("host cpu") and m["precision"]["python_fd"] is None
    header = (tmp_path / "bench_gradients" / "timings.csv").read_text().splitlines()[0]
    assert {"device", "precision", "rounds"} <= set(header.split(","))


@pytest.mark.smoke
@pytest.mark.integration
def test_bench_train_quick(tmp_path, capsys):
    out = tmp_path / "bench_train"
    assert bench_train.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    small, large = m["homework_scale"], m["large_batch"]
    assert set(small["loop_over_train"]) == {"1", "10", "100"}
    assert set(large["loop_over_train"]) == {"3"}
    run_s = {(r["epochs"], r["method"].split()[0]): r["run_s"] for r in small["rows"]}
    for e, cost in small["call_cost"].items():  # train's time over the loop's, and the excess
        train_s, loop_s = run_s[(int(e), "train")], run_s[(int(e), "Python")]
        assert cost["train_over_loop"] == pytest.approx(train_s / loop_s)
        assert cost["extra_ms"] == pytest.approx(1e3 * (train_s - loop_s))
    diffs = small["max_rel_loss_difference"]  # float64: the three loops agree to rounding
    assert max(diffs.values()) < 1e-10
    for row in small["rows"] + large["rows"]:
        assert row["epochs_per_s"] == pytest.approx(row["epochs"] / row["run_s"])
        if row["method"].startswith("plain Python"):
            assert row["device"].startswith("host cpu") and row["precision"] is None
        else:
            assert row["device"] == _common.device_label() and row["precision"] == "highest"
    assert large["final_loss"] < large["initial_loss"]
    ev = m["evaluation"]
    assert ev["epochs"] == 100 and ev["ratio"] == pytest.approx(ev["every_epoch_s"] /
                                                                ev["without_s"])
    assert "loop of jitted steps / train" in printed and "highest" in printed
    assert "the cost of a call: 1 epoch: train" in printed
    assert "(c) held-out evaluation every epoch" in printed
    lines = (out / "bench_train.csv").read_text().splitlines()
    assert lines[0].startswith("part,K,N,dtype,method,device,precision") and len(lines) == 1 + 9
    assert (out / "bench_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # epochs/s


@pytest.mark.integration
def test_optimizers_quick(tmp_path, capsys):
    m, printed = _run_quick("optimizers", tmp_path, capsys)
    assert all(r["device"] == _common.device_label() and r["precision"] == "highest"
               for r in m["runs"])
    hit = [r for r in m["runs"] if r["epochs_to_target"] is not None and r["diverged_at"] is None]
    assert hit and all(r["seconds_to_target"] > 0 for r in hit)
    assert m["gd_vs_sgd_max_abs_loss_diff"] <= 1e-12 * m["initial_loss"]
    assert set(m["best"]) == {"gd", "sgd", "momentum", "adam"}
    assert m["winner"]["by_epochs"]["epochs"] >= 1
    assert m["winner"]["lowest_final_loss"]["final_loss"] < m["initial_loss"]
    assert all(r["optimizer"] in opt.LRS for r in m["runs"])
    assert "optax.sgd" in printed



@pytest.mark.integration
def test_sweep_quick(tmp_path, capsys):
    m, printed = _run_quick("sweep", tmp_path, capsys)
    assert len(m["lrs"]) == 3 and np.shape(m["final_loss"]) == (3, 2)
    assert np.shape(m["diverged_at"]) == (3, 2)
    assert m["timing"]["diverging"]["diverged"] >= 1  # lrs up to 30: some diverge
    for part in ("sweep", "bench", "diverging"):
        t = m["timing"][part]
        assert t["train_many_s"] > 0 and t["ratio"] == pytest.approx(
            t["train_loop_s"] / t["train_many_s"])
        assert t["max_rel_diff_final_loss"] < 1e-4  # float32: the same members, both ways
        assert f"{part}: train_many of {t['members']} members is" in printed
    lines = (tmp_path / "sweep" / "final_loss.csv").read_text().splitlines()
    assert lines[0] == "lr,seed,final_loss,diverged_at" and len(lines) == 1 + 6
    ranked = [line.split(",") for line in
              (tmp_path / "sweep" / "ranking.csv").read_text().splitlines()[1:]]
    held = [float(r[3]) for r in ranked if r[3]]
    assert len(ranked) == 6 and held == sorted(held)  # ranked by best held-out loss
    assert m["best"]["best_eval_loss"] == held[0] and "ranked by best held-out loss" in printed


# -- benchmark logic -----------------------------------------------------------------------


def test_fit_slope_recovers_a_power_law():
    P = np.array([12.0, 48.0, 192.0, 768.0])
    slope, intercept = bench.fit_slope(P, 3.0 * P**1.5)
    assert slope == pytest.approx(1.5) and intercept == pytest.approx(math.log(3.0))
    assert math.isnan(bench.fit_slope([12.0], [1.0])[0])
    assert math.isnan(bench.fit_slope([12.0, 12.0], [1.0, 2.0])[0])


def test_slopes_and_ratio_table_from_rows():
    rows = [
        {"K": K, "P": 3 * K * K, "N": 4, "method": m, "median_s": t,
         "ratio_to_batch_grad": t / (1e-4 * K)}
        for K in (2, 4) for m, t in (("batch_grad", 1e-4 * K), ("fd_grad", 1e-3 * K**4))
    ]
    fits = bench.slopes(rows)
    assert fits["batch_grad"] == pytest.approx(0.5) and fits["fd_grad"] == pytest.approx(2.0)
    header, table = bench.ratio_table(rows)
    assert header == ["K", "P", "device", "precision", "batch_grad", "fd_grad x"]
    assert table[0][5] == pytest.approx(10 * 2**3) and table[1][5] == pytest.approx(10 * 4**3)
    for r in rows:
        r.update(device="gpu H100", precision="default")
    rows.append({"K": 2, "P": 12, "N": 4, "method": "python_fd", "median_s": 1.0,
                 "device": "host cpu (Python)", "precision": None})
    header, table = bench.ratio_table(rows)  # Python runs on the host, not on the GPU
    assert header[-1] == "python_fd x (host cpu)" and table[0][2:4] == ["gpu H100", "default"]


@pytest.mark.integration  # an experiment's timing run
def test_time_gradients_applies_the_time_budget():
    rows = _common.time_gradients([2, 3], 4, ["batch_grad", "python_fd"], budget_s=1e-9, min_time=0)
    by = {(r["K"], r["method"]): r for r in rows}
    assert by[(2, "python_fd")]["status"] == "ok"
    assert by[(3, "python_fd")]["status"].startswith("skipped")
    assert by[(3, "python_fd")]["median_s"] is None
    assert by[(2, "python_fd")]["rel_err_vs_float64"] < 1e-7
    assert by[(2, "batch_grad")]["ratio_to_batch_grad"] == 1.0
    with pytest.raises(ValueError, match="method"):
        _common.time_gradients([2], 4, ["backprop"])


def test_bench_train_loop_ratios():
    rows = [{"epochs": e, "method": bench_train.LOOPS[m], "run_s": t}
            for e, m, t in ((10, "train", 1.0), (10, "loop", 3.0), (1000, "train", 4.0),
                            (1000, "loop", 2.0))]
    assert bench_train.loop_ratios(rows) == {"10": 3.0, "1000": 0.5}


def test_bench_train_step_equals_train(key):
    params, X = _params(key)
    rows, outputs = bench_train.compare_loops(params, X, 0.05, 7, "highest", rounds=1,
                                              min_time=0)
    np.testing.assert_allclose(outputs["loop"][0], outputs["train"].losses, rtol=1e-10)
    assert [r["method"] for r in rows] == list(bench_train.LOOPS.values())
    assert rows[0]["times_train"] == 1.0 and all(r["epochs"] == 7 for r in rows)


# -- the one timing helper -----------------------------------------------------------------


def _counting(calls, name, value=0):
    def fn():
        calls[name] += 1
        return value

    return fn


def test_time_interleaved_counts_first_call_warmup_and_rounds():
    calls = {"a": 0, "b": 0}
    times = _common.time_interleaved(
        {"a": _counting(calls, "a", 3), "b": _counting(calls, "b")}, rounds=4, min_time=0,
        warmup=2)
    assert set(times) == {"a", "b"} and times["a"].output == 3
    for name, t in times.items():
        assert t.rounds == 4 and t.calls_per_round == 1
        assert calls[name] == 1 + 2 + 4  # first call, warm-up, one call per round
        assert t.min_s <= t.median_s  # the fastest round bounds the median


def test_time_interleaved_loops_fast_calls_and_caps_slow_ones():
    calls = {"fast": 0}
    t = _common.time_interleaved({"fast": _counting(calls, "fast")}, rounds=3, min_time=0.03)
    assert t["fast"].calls_per_round > 1 and calls["fast"] > 3 * t["fast"].calls_per_round
    slow = _common.time_interleaved({"slow": lambda: sum(range(20_000))}, rounds=5,
                                    min_time=0, warmup=0, max_time=1e-9)
    assert slow["slow"].rounds == 1 and slow["slow"].calls_per_round == 1
    with pytest.raises(ValueError, match="rounds"):
        _common.time_interleaved({"a": _counting(calls, "fast")}, rounds=0)


def test_time_interleaved_rounds_alternate():
    order = []
    _common.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             rounds=3, min_time=0, warmup=0)
    assert order == ["a", "b"] + ["a", "b"] * 3  # first calls, then rounds in turn


# -- device, precision, compile time, help -------------------------------------------------


def test_device_label():
    assert _common.device_label().startswith(jax.devices()[0].platform)


def test_compile_clock_counts_compilation_inside_its_block_only():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())
    with _common.compile_clock() as clock:
        f(jnp.arange(7.0)).block_until_ready()  # a new shape: compiled (or loaded) here
        inside = clock[0]
        f(jnp.arange(7.0)).block_until_ready()  # cached: no more time
    assert inside > 0 and clock[0] == inside
    f(jnp.arange(9.0)).block_until_ready()  # after the block: not counted
    assert clock[0] == inside


# -- optimizer logic ---------------------------------------------------------------------


def test_first_hit_and_best_runs():
    assert opt.first_hit([3.0, 2.0, 1.0, 0.5], 1.0) == 2
    assert opt.first_hit([3.0, 2.0], 1.0) is None
    runs = [
        {"optimizer": "adam", "lr": 0.1, "epochs_to_target": None, "final_loss": None,
         "diverged_at": 3, "seconds_to_target": None},
        {"optimizer": "adam", "lr": 0.01, "epochs_to_target": 40, "final_loss": 0.2,
         "diverged_at": None, "seconds_to_target": 0.02},
        {"optimizer": "adam", "lr": 0.03, "epochs_to_target": 20, "final_loss": 0.3,
         "diverged_at": None, "seconds_to_target": 0.01},
        {"optimizer": "gd", "lr": 0.1, "epochs_to_target": None, "final_loss": 0.5,
         "diverged_at": None, "seconds_to_target": None},
    ]
    best = opt.best_runs(runs)
    assert best["adam"]["lr"] == 0.03 and best["gd"]["lr"] == 0.1
    win = opt.winners(best, runs)
    assert win["by_epochs"]["optimizers"] == ["adam"] and win["by_seconds"]["lr"] == 0.03
    assert win["lowest_final_loss"]["lr"] == 0.01


def test_one_optimizers_table(capsys):
    assert _common.make_optimizer("gd", 0.1) is None  # train's own rule
    for name in ("sgd", "momentum", "adam"):
        assert isinstance(_common.make_optimizer(name, 0.1), optax.GradientTransformation)
    with pytest.raises(ValueError, match="optimizer"):
        _common.make_optimizer("rmsprop", 0.1)
    assert set(_common.OPTIMIZERS) == set(opt.LRS) == set(opt.LABELS)
    from experiments import train as train_script  # --optimizer's choices are the table's
    assert train_script.parse_args(["--optimizer", "momentum"]).optimizer == "momentum"
    with pytest.raises(SystemExit):
        train_script.parse_args(["--optimizer", "rmsprop"])
    assert "'gd', 'sgd', 'momentum', 'adam'" in capsys.readouterr().err


def test_format_table_aligns_columns():
    text = _common.format_table(["a", "long name"], [[1, 0.5], ["xyz", None]], floatfmt=".2f")
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith("0.50") and lines[3].endswith("-")


@pytest.mark.integration
def test_second_order_quick(tmp_path, capsys):
    from experiments import second_order as so

    m, printed = _run_quick("second_order", tmp_path, capsys)
    assert [t["name"] for t in m["tasks"]] == ["teacher K=4", "teacher K=16"]
    for t in m["tasks"]:
        methods = {r["method"] for r in t["rows"]}
        assert {"gd", "adam", "lbfgs", "lm", "lm_cg", "lm_pcg"} <= methods <= set(so.LABELS)
        assert ("scipy" in methods) == (t["P"] <= 500)
        for r in t["rows"]:  # the first epoch at or below the target, read off its curve
            curve = t["curves"][r["method"]]
            e, c = np.asarray(curve["epochs"]), np.asarray(curve["heldout"], dtype=float)
            hit = r["epochs_to_target"]
            assert (c <= t["target"]).any() == (hit is not None), r
            if hit is not None:
                assert c[e == hit] <= t["target"] < c[e < hit].min(initial=np.inf)
                assert r["seconds_to_target"] == r["seconds"] > 0
            assert r["seconds"] > 0 and r["timed_epochs"] >= 1
        gap = t["gap"]  # the Hessian's extra term shrinks as LM fits the targets
        assert gap["epochs"][0] == 0 and 0 < gap["ratio"][-1] < gap["ratio"][0]
    assert m["conclusion"] in printed


def test_second_order_claims_are_read_from_the_rows():
    from experiments import second_order as so

    def row(method, hit, seconds, timed=None):
        return {"method": method, "epochs_to_target": hit, "timed_epochs": timed or hit,
                "seconds": seconds, "seconds_to_target": None if hit is None else seconds}

    rows = [row("gd", None, 2.0, 500), row("adam", 400, 1.0), row("lbfgs", 90, 0.5),
            row("lm", 10, 0.1), row("optimistix", 12, 30.0)]
    task = {"K": 16, "rows": rows, "curves": {"adam": {"epochs": [0, 1, 10, 100, 1000]}}}
    c = so.claims([task])
    assert (c["lm_epochs"], c["adam_epochs"], c["fastest_first_order"],
            c["fastest_first_order_s"], c["optimistix_s"]) == (10, 400, "lbfgs", 0.5, 30.0)
    assert so.conclusion(c) == (
        "at K = 16, LM by hand (direct) reached the target in 10 epochs and 0.1 s; Adam's "
        "best in 400 epochs (LM / Adam = 0.025); the fastest first-order method (L-BFGS "
        "(optax)) in 0.5 s (5x); optimistix's LM in 12 steps and 30 s (300x).")
    rows[1], rows[4] = row("adam", None, 1.0, 500), row("optimistix", None, 9.0, 3)
    c = so.claims([task])
    assert "Adam's best not within 1000 epochs (LM / Adam < 0.01)" in so.conclusion(c)
    assert "optimistix's LM not within 3 steps (9 s, 90x)" in so.conclusion(c)
