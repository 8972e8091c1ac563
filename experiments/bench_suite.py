"""How long does the test suite take? The default run from an empty and from a warm
compilation cache, then the integration run; with ``--ci``, also all of ``.ci/run`` on a
fresh clone of the committed code (a new virtualenv, the install, ruff and both runs).

Each run is ``python -m pytest -n WORKERS -q`` in a subprocess from the repository root
(the README's test command), all three with one fresh persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``, a temporary folder): the first default run starts from an
empty cache, the second finds what the first compiled, and the integration run
(``-m integration``: subprocesses, several processes, the notebook, the scripts) comes last,
as in ``.ci/run``. Wall times include pytest's start and the workers' JAX import; a run
that fails stops the script with its output's tail.

    python -m experiments.bench_suite --ci --docs docs    # the figures of docs/testing.md
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import common

NAME = "bench_suite"
ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["run", "seconds", "passed", "skipped", "failed"]
TARGETS = {"default, empty cache": 120.0, "CI, clean clone: default run": 120.0,
           "CI, clean clone: all of .ci/run": 300.0}  # seconds the project aims for


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run: the pytest workers, the paths, and whether the integration run too."""

    workers: str = common.flag("auto", "pytest-xdist workers (pytest -n)")
    paths: tuple[str, ...] = common.flag((), "test files or folders (default: tests/)")
    integration: bool = common.flag(True, "also time the integration run (-m integration)")
    ci: bool = common.flag(False, "also time .ci/run on a fresh clone of the committed code "
                                  "(installs the project from PyPI into a new virtualenv)")
    timeout: float = common.flag(900.0, "seconds a run may take before it counts as failed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(self.workers == "auto" or self.workers.isdigit(),
                     f"--workers must be 'auto' or a count, got {self.workers!r}")
        common.check(self.timeout > 0, f"--timeout must be > 0, got {self.timeout}")


QUICK = Config(paths=("tests/test_update.py",), integration=False, quick=True)


def counts(output: str) -> dict[str, int]:
    """passed / skipped / failed from pytest's last summary line."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", last)) else 0
            for k in ("passed", "skipped", "failed")}


def pytest_run(label: str, cfg: Config, cache: str, *extra: str) -> dict[str, Any]:
    """One timed pytest run: its label, wall seconds and counts."""
    cmd = [sys.executable, "-m", "pytest", "-n", cfg.workers, "-q", *cfg.paths, *extra]
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": cache}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{label}: still running after {cfg.timeout:g} s") from None
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{label}: pytest exited {done.returncode}:\n{done.stdout[-3000:]}")
    return {"run": label, "seconds": seconds, **counts(done.stdout)}


def ci_run(cfg: Config) -> list[dict[str, Any]]:
    """``bash .ci/run`` in a fresh clone of the repository's HEAD (so its own new virtualenv
    and empty compilation cache): the whole run's wall seconds and the two pytest runs'
    (the times .ci/run prints, with pytest's counts)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        raise common.cli.Unavailable("--ci needs git and a git checkout of the project")
    with tempfile.TemporaryDirectory(prefix="abc_jax_ci_") as tmp:
        clone = Path(tmp) / "abc_jax"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(["bash", ".ci/run"], cwd=clone, capture_output=True, text=True,
                                  timeout=cfg.timeout,
                                  env={k: v for k, v in os.environ.items()
                                       if not k.startswith(("JAX_", "XLA_", "VIRTUAL_ENV"))})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f".ci/run: still running after {cfg.timeout:g} s") from None
        seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f".ci/run exited {done.returncode}:\n{done.stdout[-3000:]}"
                           f"{done.stderr[-2000:]}")
    return ci_rows(done.stdout, seconds)


def ci_rows(output: str, seconds: float) -> list[dict[str, Any]]:
    """The rows of a .ci/run that printed ``output`` and took ``seconds``: its two pytest
    runs (the wall times it prints after each, pytest's counts) and the whole."""
    summaries = [line for line in output.splitlines()
                 if re.search(r"\d+ passed", line) and " in " in line]
    times = [float(m.group(1)) for m in re.finditer(r"(?:test suite|integration tests): (\d+) s",
                                                     output)]
    if len(summaries) != 2 or len(times) != 2:
        raise RuntimeError(f".ci/run printed no two runs' times:\n{output[-3000:]}")
    zero = dict.fromkeys(("passed", "skipped", "failed"), 0)
    return [{"run": "CI, clean clone: default run", "seconds": times[0], **counts(summaries[0])},
            {"run": "CI, clean clone: integration run", "seconds": times[1],
             **counts(summaries[1])},
            {"run": "CI, clean clone: all of .ci/run", "seconds": seconds, **zero}]


def run(cfg: Config) -> dict[str, Any]:
    """The three runs (two without ``integration``), sharing one fresh compilation cache;
    then, with ``ci``, .ci/run on a clean clone."""
    env = common.environment()
    with tempfile.TemporaryDirectory(prefix="abc_jax_cache_") as cache:
        runs = [pytest_run("default, empty cache", cfg, cache),
                pytest_run("default, warm cache", cfg, cache)]
        if cfg.integration:
            runs.append(pytest_run("integration, warm cache", cfg, cache, "-m", "integration"))
    if cfg.ci:
        runs += ci_run(cfg)
    by = {r["run"]: r for r in runs}
    ci = {k: by.get(f"CI, clean clone: {k}", {}).get("seconds")
          for k in ("default run", "integration run", "all of .ci/run")}
    return {"config": dataclasses.asdict(cfg), "runs": runs, "environment": env,
            "default_empty_s": by["default, empty cache"]["seconds"],
            "default_warm_s": by["default, warm cache"]["seconds"],
            "default_passed": by["default, empty cache"]["passed"],
            "default_skipped": by["default, empty cache"]["skipped"],
            "integration_s": by.get("integration, warm cache", {}).get("seconds"),
            "integration_passed": by.get("integration, warm cache", {}).get("passed"),
            "ci_default_s": ci["default run"], "ci_integration_s": ci["integration run"],
            "ci_total_s": ci["all of .ci/run"]}


def plot(res: dict[str, Any]) -> Any:
    """One bar per run (seconds), the target as a line."""
    fig, ax = common.figure(width=6.0, height=3.2)
    runs = res["runs"]
    ax.barh([r["run"] for r in runs], [r["seconds"] for r in runs], color="C0")
    for i, r in enumerate(runs):
        tests = f", {r['passed']} tests" if r["passed"] else ""
        ax.annotate(f"{r['seconds']:.0f} s{tests}", (max(r["seconds"], TARGETS.get(r["run"], 0)),
                                                     i),  # clear of the target's mark
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        if r["run"] in TARGETS:
            ax.plot([TARGETS[r["run"]]] * 2, [i - 0.4, i + 0.4], color="C3", lw=2,
                    label="target" if i == min(j for j, q in enumerate(runs)
                                               if q["run"] in TARGETS) else None)
    ax.invert_yaxis()
    ax.set(xlabel="wall seconds",
           xlim=(0, 1.35 * max(max(r["seconds"], TARGETS.get(r["run"], 0)) for r in runs)),
           title=f"pytest -n {res['config']['workers']}, {res['environment']['cpu_count']} CPUs")
    if any(r["run"] in TARGETS for r in runs):
        ax.legend(fontsize=8, loc="upper right")
    return fig


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table; write config.json, metrics.json, bench_suite.csv, bench_suite.png."""
    rows = [[r[f] for f in FIELDS] for r in res["runs"]]
    print(f"{NAME}: pytest -n {res['config']['workers']}, {res['environment']['cpu_count']} "
          f"CPUs, JAX {res['environment']['jax_version']}")
    common.print_table(FIELDS, rows, ".1f")
    return common.write_and_report(NAME, out, docs, [NAME], config=res["config"],
                                   metrics={k: v for k, v in res.items() if k != "config"},
                                   tables={NAME: (FIELDS, rows)}, figures={NAME: plot(res)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
