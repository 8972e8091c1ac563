"""Every script of experiments/ (discovered: each module but __init__) has --help, --quick and
the package's import rules; smoke tests of the step-benchmark script and its helpers."""

import argparse
import ast
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import pytest

import abc_jax
from experiments import bench_curvature, bench_step, common
from experiments import common as _common

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


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


@pytest.mark.integration  # a script's run
def test_temp_bytes_grow_with_the_chunk():
    params = _common.problem(jax.random.key(0), 16, 8)[0]
    small, whole = (bench_step.temp_bytes(params, 4096, 8, c) for c in (256, 4096))
    assert 0 < small < whole


@pytest.mark.integration  # a script's run
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


# Every script: each module experiments/NAME.py but __init__; helpers live in experiments/common/.
@pytest.mark.smoke
@pytest.mark.integration
def test_bench_curvature_quick(tmp_path, capsys):
    out = tmp_path / "bc"
    assert bench_curvature.main(["--quick", "--out", str(out), "--docs",
                                 str(tmp_path / "docs")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    precisions = _common.precisions_to_time()
    assert [(r["K"], r["N"], r["precision"]) for r in metrics["rows"]] == [
        (16, 256, p) for p in precisions]
    for row in metrics["rows"]:
        assert row["device"] == _common.device_label()
        assert all(row[f"{m}_s"] > 0 for m in bench_curvature.METHODS)
        for ratio, (a, b) in bench_curvature.RATIOS.items():
            assert row[ratio] == pytest.approx(row[f"{a}_s"] / row[f"{b}_s"])
        # float32 at "highest": the hand products equal autodiff's to rounding
        assert max(row[k] for k in row if k.startswith("diff_")) <= 1e-5
    assert "ggn_vp takes" in printed and "x the time of jax.jvp + jax.vjp" in printed
    assert printed.index("smoke run") < printed.index("ggn_vp ms")
    for name in ("config.json", "bench_curvature.csv", "bench_curvature.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["quick"] is True
    assert (tmp_path / "docs" / "bench_curvature.png").exists()


SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem != "__init__")
NOT_RANDOM = {"predict", "bench_suite", "line_count"}  # no --seed: saved params applied to a
# file; lines counted; the suite
TOOLS = {"render_docs"}  # not an experiment: renders the docs from results (its own flags)


def test_scripts_are_discovered():
    assert {"noise_scale", "train", "predict", "gradcheck", "bench_train"} <= set(SCRIPTS)
    assert not any(name.startswith("_") for name in SCRIPTS)  # helpers are in experiments.common


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"experiments.{name}").main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"python -m experiments.{name}" in text  # the usage line names the module
    if name in TOOLS:
        return
    assert "--out" in text and "(default:" in text
    if name not in NOT_RANDOM:
        assert "--seed" in text and "--quick" in text
        assert "(default: 0)" in text  # --seed
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("name", [*SCRIPTS, *(f"common/{p.stem}" for p in
                                               (EXPERIMENTS / "common").glob("*.py"))])
def test_no_file_imports_a_script_or_a_private_name(name):
    """Scripts and helpers import no other script, only experiments.common.*."""
    tree = ast.parse((EXPERIMENTS / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"] if node.value.id == "abc_jax" else []
        else:
            continue
        for full in names:
            parts = full.split(".")
            assert parts[0] not in SCRIPTS, f"{name} imports {full} by its bare name"
            if parts[0] == "experiments" and len(parts) > 1:
                assert parts[1] == "common", f"{name} imports the script {full}"


@pytest.mark.integration
def test_runs_as_a_module(tmp_path):
    """``python -m experiments.NAME --help`` from any folder: the package is installed, and
    a script needs no path of the repository (the runs themselves: in-process tests)."""
    done = subprocess.run([sys.executable, "-m", "experiments.predict", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "python -m experiments.predict" in done.stdout


# -- config -> run -> report ---------------------------------------------------------------

CONFIGURED = [n for n in SCRIPTS if n not in TOOLS]  # render_docs: its own CLI


@pytest.mark.parametrize("name", CONFIGURED)
def test_every_script_is_config_run_report(name):
    mod = importlib.import_module(f"experiments.{name}")
    assert dataclasses.is_dataclass(mod.Config) and mod.Config.__dataclass_params__.frozen
    assert mod.QUICK.quick is True and mod.Config().quick is False
    assert callable(mod.run) and callable(mod.report)
    flags = [f for f in dataclasses.fields(mod.Config) if "help" in f.metadata]
    assert name in NOT_RANDOM or "seed" in {f.name for f in flags}
    assert all(f.metadata["help"] for f in flags)


def test_flags_come_from_the_config():
    from experiments import noise_scale

    ap = common.cli.parser("noise_scale", noise_scale.__doc__, seed=False)
    common.cli.add_flags(ap, noise_scale.Config)
    config = common.cli.config_from
    assert config(ap.parse_args([]), noise_scale) == noise_scale.Config()
    assert config(ap.parse_args(["--quick"]), noise_scale) == noise_scale.QUICK
    quick = config(ap.parse_args(["--quick", "--n", "512", "--max-steps", "99"]), noise_scale)
    assert quick == dataclasses.replace(noise_scale.QUICK, n=512, max_steps=99)
    from experiments import bench_gradients  # a tuple field: nargs="+", back to a tuple

    ap = common.cli.parser("bench_gradients", "", seed=False)
    common.cli.add_flags(ap, bench_gradients.Config)
    cfg = config(ap.parse_args(["--ks", "2", "3", "--methods", "batch_grad"]), bench_gradients)
    assert cfg.ks == (2, 3) and cfg.methods == ("batch_grad",)


def test_a_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    from experiments import noise_scale

    assert noise_scale.main(["--n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "noise_scale: error: --n and --max-steps must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.integration  # a script's run
def test_gradcheck_run_then_report_in_process(tmp_path, capsys):
    from experiments import gradcheck

    res = gradcheck.run(dataclasses.replace(gradcheck.QUICK, in_dim=4, hidden_dim=3, out_dim=2))
    assert res["worst_rel"]["float64/manual vs jax.grad"] <= 1e-12
    assert len(res["rows"]) == 12 and capsys.readouterr().out == ""  # run prints nothing
    env = res["environment"]
    assert env["date_utc"].endswith("+00:00") and "git_commit" in env and env["machine"]
    written = gradcheck.report(res, tmp_path / "o", tmp_path / "docs")
    assert {"config.json", "metrics.json", "gradcheck.csv", "gradcheck.png"} == set(written)
    assert "manual vs jax.grad" in capsys.readouterr().out
    assert (tmp_path / "docs" / "gradcheck.png").exists()
    docs = json.loads((tmp_path / "docs" / "results" / "gradcheck.json").read_text())
    assert docs.pop("tables")["gradcheck"]["header"] == gradcheck.FIELDS
    assert docs == json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert docs["environment"]["date_utc"] == env["date_utc"]


@pytest.mark.integration  # a script's run
def test_bench_clipping_tiny_in_process(tmp_path, capsys):
    from experiments import bench_clipping

    cfg = bench_clipping.Config(ks=(4,), ns=(16,), methods=("clipped", "plain", "vmap"),
                                rounds=1, min_time=0.0)
    res = bench_clipping.run(cfg)
    by = {r["method"]: r for r in res["rows"]}
    assert set(by) == {"clipped", "plain", "vmap"} and by["clipped"]["rel_err_vs_vmap"] < 1e-5
    (at,) = res["ratios"]
    assert (at["K"], at["N"]) == (4, 16) and at["clipped/plain"] > 0
    assert bench_clipping.ranges(res["ratios"])["K4"]["clipped/plain"] == [
        at["clipped/plain"]] * 2
    written = bench_clipping.report(res, tmp_path / "o")
    assert {"timings.csv", "ratios.csv", "bench_clipping.png"} <= set(written)


def test_bench_suite_reads_what_ci_prints():
    from experiments import bench_suite

    printed = ("All checks passed!\n....\n570 passed, 1 skipped in 90.90s (0:01:30)\n"
               "test suite: 99 s (wall clock, README's test command)\n...\n"
               "103 passed in 164.56s (0:02:44)\nintegration tests: 168 s (wall clock)\n")
    rows = bench_suite.ci_rows(printed, 279.5)
    assert [(r["run"], r["seconds"], r["passed"], r["skipped"]) for r in rows] == [
        ("CI, clean clone: default run", 99.0, 570, 1),
        ("CI, clean clone: integration run", 168.0, 103, 0),
        ("CI, clean clone: all of .ci/run", 279.5, 0, 0)]
    with pytest.raises(RuntimeError, match="no two runs"):
        bench_suite.ci_rows(printed.split("103 passed")[0], 100.0)


def test_bench_suite_reads_pytest_and_reports(tmp_path, capsys):
    from experiments import bench_suite

    assert bench_suite.counts("....\n3 failed, 640 passed, 1 skipped in 73.20s (0:01:13)\n") == {
        "passed": 640, "skipped": 1, "failed": 3}
    assert bench_suite.counts("") == {"passed": 0, "skipped": 0, "failed": 0}
    runs = [{"run": "default, empty cache", "seconds": 100.0, "passed": 5, "skipped": 0,
             "failed": 0}, {"run": "default, warm cache", "seconds": 40.0, "passed": 5,
                            "skipped": 0, "failed": 0}]
    res = {"config": dataclasses.asdict(bench_suite.QUICK), "runs": runs,
           "environment": common.environment()}
    written = bench_suite.report(res, tmp_path / "o", tmp_path / "docs")
    assert {"bench_suite.csv", "bench_suite.png", "metrics.json"} <= set(written)
    assert json.loads((tmp_path / "docs" / "results" / "bench_suite.json").read_text())[
        "tables"]["bench_suite"]["rows"][1][:2] == ["default, warm cache", 40.0]
    assert "default, empty cache" in capsys.readouterr().out


def test_line_count_counts_code_not_docstrings_or_comments(tmp_path, capsys):
    from experiments import line_count

    source = ('"""A module docstring\n\nover lines."""\n\nimport os  # a comment\n\n\n'
              'def f(x):\n    """Its docstring."""\n    # a comment line\n    return (x +\n'
              '            1)\n\n\nclass C:\n    """Doc."""\n\n    y = "not a docstring"\n')
    assert line_count.code_lines(source) == 6  # import, def, return (2 lines), class, y
    assert line_count.main(["--out", str(tmp_path / "lc")]) == 0
    metrics = json.loads((tmp_path / "lc" / "metrics.json").read_text())
    after = metrics["after"]
    assert after["total"] == sum(after["modules"].values()) == sum(after["roles"].values())
    core = [n for m, n in after["modules"].items() if m.startswith("core/")]
    assert after["roles"]["mathematics"] == sum(core)  # core/__init__.py has no code
    assert "mathematics" in capsys.readouterr().out
