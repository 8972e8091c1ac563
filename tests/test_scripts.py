"""Smoke tests of the step-benchmark script and its helpers."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import chex
import jax
import pytest

import abc_jax

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

bench_step = importlib.import_module("bench_step")
common = importlib.import_module("_common")
_common = importlib.import_module("_common")


@pytest.mark.smoke
@pytest.mark.integration
def test_bench_step_quick(tmp_path, capsys):
    out = tmp_path / "bs"
    assert bench_step.main(["--quick", "--out", str(out), "--docs", str(tmp_path / "docs")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    precisions = _common.precisions_to_time()
    assert metrics["precisions"] == list(precisions)
    assert [(r["K"], r["precision"]) for r in metrics["sizes"]] == [(16, p) for p in precisions]
    for row in metrics["sizes"]:
        assert row["device"] == _common.device_label()
        for key in ("batch_grad_s", "jax_grad_s", "matmul_s", "ratio_jax_grad",
                    "ratio_7_matmuls", "gflops", "naive_over_batch_grad"):
            assert row[key] > 0
        assert row["ratio_jax_grad"] == pytest.approx(row["batch_grad_s"] / row["jax_grad_s"])
    if jax.default_backend() != "gpu":
        assert "only 'highest' is timed" in printed
    overhead = metrics["overhead"]
    assert {(r["K"], r["N"]) for r in overhead} == {(3, 8)}  # kept in the quick run
    assert {r["function"] for r in overhead} == {"batch_grad", "batch_value_and_grad"}
    assert {r["waited"] for r in overhead} == {"at the end", "every call"}
    assert "per-call cost" in printed and "target <= 1.3x" in printed
    assert printed.count("smoke run") == 1  # one caveat, above every table
    assert printed.index("smoke run") < printed.index("batch_grad ms")
    mem = metrics["memory"]
    assert mem["max_rel_diff"] <= 1e-5  # chunked equals unchunked, float32 at "highest"
    assert 0 < mem["chunked_temp_bytes"] < mem["unchunked_temp_bytes"]
    assert mem["counter"] in printed
    for name in ("config.json", "bench_step.csv", "overhead.csv", "bench_step.png"):
        assert (out / name).stat().st_size > 0
    header = (out / "bench_step.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["device", "precision"]
    assert json.loads((out / "config.json").read_text())["quick"] is True
    assert (tmp_path / "docs" / "bench_step.png").exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):  # exit code, --quick: test_experiments' help test
        bench_step.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overhead OVERHEAD KxN list for the per-call overhead table (default: 3x8)" in text
    assert "--seed SEED random seed (default: 0)" in text


def test_parse_sizes():
    assert bench_step._parse_sizes("64x4096,8X16") == [(64, 4096), (8, 16)]
    for bad in ("64", "64x0", "axb", "", "1x2x3"):
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
    assert by["naive/bg"] is None  # the naive form did not run: "-" in the table
    assert _common.format_table(header, cells).splitlines()[2].split()[-1] == "-"


def test_temp_bytes_grow_with_the_chunk():
    params = _common.problem(jax.random.key(0), 16, 8)[0]
    small, whole = (bench_step.temp_bytes(params, 4096, 8, c) for c in (256, 4096))
    assert 0 < small < whole


def test_bench_overhead_compares_like_with_like():
    # the bare loop computes the same gradient as the public function it is compared with
    params, X = common.problem(jax.random.key(0), 8, 3)
    bare = jax.jit(jax.grad(bench_step.plain_loss))(params, X)
    chex.assert_trees_all_close(bare, abc_jax.batch_grad(params, X), rtol=1e-5)
    rows = bench_step.bench_overhead(3, 8, rounds=1, calls=3, seed=0)
    assert [(r["waited"], r["function"]) for r in rows] == [
        (w, f) for w in ("at the end", "every call") for f in ("batch_grad",
                                                             "batch_value_and_grad")]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["public_us"] / r["bare_us"])
