"""Smoke tests of the step-benchmark script and its helpers."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import jax
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

bench_step = importlib.import_module("bench_step")
_common = importlib.import_module("_common")


@pytest.mark.smoke
def test_bench_step_quick(tmp_path, capsys):
    out = tmp_path / "bs"
    assert bench_step.main(["--quick", "--out", str(out), "--docs", str(tmp_path / "docs")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    precisions = _common.precisions_to_time()
    assert metrics["precisions"] == list(precisions)
    assert [(r["K"], r["precision"]) for r in metrics["sizes"]] == [
        (16, p) for p in precisions]
    for row in metrics["sizes"]:
        assert row["device"] == _common.device_label()
        for key in ("batch_grad_s", "jax_grad_s", "matmul_s", "ratio_jax_grad",
                    "ratio_7_matmuls", "gflops", "naive_over_batch_grad"):
            assert row[key] > 0
        if "torch_eager_s" in row:  # PyTorch only ever on JAX's device
            assert row["torch_device"] == ("cuda" if jax.default_backend() == "gpu" else "cpu")
            assert row["torch_allow_tf32"] == (row["precision"] == "default")
    if jax.default_backend() != "gpu":
        assert "only 'highest' is timed" in printed
    mem = metrics["memory"]
    assert mem["max_rel_diff"] <= 1e-5  # chunked equals unchunked, float32 at "highest"
    assert mem["chunked_peak_bytes"] >= 0 and mem["unchunked_peak_bytes"] >= 0
    assert mem["counter"].startswith("device" if jax.default_backend() == "gpu" else "host")
    assert mem["counter"] in printed
    for name in ("config.json", "bench_step.csv", "bench_step.png"):
        assert (out / name).stat().st_size > 0
    header = (out / "bench_step.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["device", "precision"]
    assert (tmp_path / "docs" / "bench_step.png").exists()


def test_parse_sizes():
    assert bench_step._parse_sizes("64x4096,8X16") == [(64, 4096), (8, 16)]
    for bad in ("64", "64x0", "axb", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_step._parse_sizes(bad)


def test_table_marks_missing_methods():
    row = {"device": "cpu", "precision": "highest", "K": 8, "N": 16, "batch_grad_s": 1e-3,
           "jax_grad_s": 2e-3, "matmul_s": 1e-4, "gflops": 1.0, "ratio_jax_grad": 0.5,
           "ratio_7_matmuls": 1.43}
    header, cells = bench_step.table_rows([row])
    assert header[:4] == ["device", "precision", "K", "N"]
    by = dict(zip(header, cells[0], strict=True))
    assert by["batch_grad ms"] == 1.0 and by["7 matmul ms"] == pytest.approx(0.7)
    assert by["torch ms"] is None and by["/torch"] is None  # no torch: "-" in the table
    assert _common.format_table(header, cells).splitlines()[2].split()[7] == "-"


def test_device_peak_reads_the_device_counters(monkeypatch):
    counters = iter([{"peak_bytes_in_use": 500, "bytes_in_use": 0},  # after compiling
                     {"peak_bytes_in_use": 900, "bytes_in_use": 800},  # X resident
                     {"peak_bytes_in_use": 2000, "bytes_in_use": 800}])  # after the run
    monkeypatch.setattr(bench_step, "_memory_stats", lambda: next(counters))
    r = bench_step.device_peak(64, 4, 16, 0)
    assert r == {"peak_above_resident": 1200, "resident_bytes": 800,
                 "compile_peak_bytes": 500, "upper_bound": False}


@pytest.mark.slow
def test_in_fresh_process_returns_the_result():
    assert bench_step.in_fresh_process("_parse_sizes", "8x16") == [[8, 16]]
    with pytest.raises(RuntimeError, match="fresh process"):
        bench_step.in_fresh_process("_parse_sizes", "bad")


def test_bench_overhead_compares_every_public_function_with_its_bare_computation():
    rows = bench_step.bench_overhead(3, 8, rounds=1, min_time=0.001, seed=0)
    assert [(r["calling"], r["function"]) for r in rows] == [
        (c, f) for c in ("same arrays", "new params")
        for f in ("batch_grad", "oracle_grad", "batch_loss", "per_sample_grads")]
    for r in rows:
        assert r["public_us"] > 0 and r["bare_us"] > 0
        assert r["ratio"] == pytest.approx(r["public_us"] / r["bare_us"])
