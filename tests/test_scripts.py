"""Smoke tests of the gradient-check and step-benchmark scripts, and their helpers."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

gradcheck = importlib.import_module("gradcheck")
bench_step = importlib.import_module("bench_step")


def test_gradcheck_rectangular(tmp_path, capsys):
    out = tmp_path / "gc"
    assert gradcheck.main(["--in-dim", "5", "--hidden-dim", "4", "--out-dim", "3",
                           "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    worst = metrics["worst_rel"]
    assert worst["float64/manual vs jax.grad"] <= 1e-12
    assert worst["float32/manual vs jax.grad"] <= 1e-5
    assert worst["float64/finite diff vs jax.grad"] <= 1e-7
    assert len(metrics["rows"]) == 12  # 2 dtypes x 2 comparisons x 3 parameters
    assert (out / "gradcheck.csv").read_text().count("\n") == 13
    assert json.loads((out / "config.json").read_text())["hidden_dim"] == 4
    assert "manual vs jax.grad" in capsys.readouterr().out


def test_gradcheck_bad_shape_exits_2(tmp_path, capsys):
    assert gradcheck.main(["--in-dim", "0", "--out", str(tmp_path / "x")]) == 2
    assert "in_dim" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_step_quick(tmp_path):
    out = tmp_path / "bs"
    assert bench_step.main(["--quick", "--out", str(out), "--docs", str(tmp_path / "docs")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["K"] for r in metrics["sizes"]] == [16, 24]
    for row in metrics["sizes"]:
        for key in ("batch_grad_s", "jax_grad_s", "matmul_s", "ratio_jax_grad",
                    "ratio_7_matmuls", "gflops", "naive_over_batch_grad"):
            assert row[key] > 0
    mem = metrics["memory"]
    assert mem["max_rel_diff"] <= 1e-5  # chunked equals unchunked (float32)
    assert mem["chunked_peak_bytes"] >= 0 and mem["unchunked_peak_bytes"] >= 0
    for name in ("config.json", "bench_step.csv", "bench_step.png"):
        assert (out / name).stat().st_size > 0
    assert (tmp_path / "docs" / "bench_step.png").exists()


def test_time_interleaved_measures_each_function():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return 0

        return fn

    times = bench_step.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, min_time=0.01)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert calls["a"] >= 3 + 3 and calls["b"] >= 3 + 3  # warm-up plus one loop per round


def test_parse_sizes():
    assert bench_step._parse_sizes("64x4096,8X16") == [(64, 4096), (8, 16)]
    for bad in ("64", "64x0", "axb", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_step._parse_sizes(bad)


def test_format_table_marks_missing_methods():
    row = {"K": 8, "N": 16, "batch_grad_s": 1e-3, "jax_grad_s": 2e-3, "matmul_s": 1e-4,
           "gflops": 1.0, "ratio_jax_grad": 0.5, "ratio_7_matmuls": 1.43}
    table = bench_step.format_table([row])
    assert "0.50" in table and "1.43" in table
    assert table.splitlines()[1].split()[5] == "-"  # no torch column value
