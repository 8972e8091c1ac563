"""Several processes as one real job: ``jax.distributed`` with gloo, two local processes of
two CPU devices each, on free local ports, every process bounded by a timeout.

- the global batch from each process's own rows (600 + 401), each process padding its
  own share with rows of weight 0, gives the gradients, losses and training (mini-batches
  included) of one process on all the rows (tests/distributed_worker.py);
- python -m experiments.train: a peer killed mid-run stops the other within 30 s, and the same
  commands again finish with the parameters of an uninterrupted run (one process, all rows);
- a coordinator that is not there is a one-line error, not a hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import train as train_script

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent
SCRIPT = ["-m", "experiments.train"]  # run from the repository root
ENV = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
TIMEOUT = 180  # seconds any one process may take
SURVIVOR_LIMIT = 30  # seconds a process may outlive a dead peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=ENV, cwd=TESTS.parent,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process; on a timeout kill them all. Assert they all exited 0."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"{log.name}: exit {p.returncode}\n{log.read_text()[-3000:]}"


def test_two_processes_give_the_results_of_one(tmp_path):
    port = free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [start([str(TESTS / "distributed_worker.py"), str(port), str(i), str(tmp_path)], log)
             for i, log in enumerate(logs)]
    finish(procs, logs)
    differences = json.loads((tmp_path / "differences.json").read_text())
    print(json.dumps(differences, indent=1))
    for name, value in differences.items():
        assert value <= 1e-10, (name, value)


# --- python -m experiments.train -----------------------------------------------

ROWS = (600, 401)
EPOCHS = 60
TRAIN = ["--dtype", "float64", "--epochs", str(EPOCHS), "--epochs-per-chunk", "5",
         "--checkpoint-every", "5", "--lr", "0.05",
         "--hidden-dim", "6", "--out-dim", "5", "--no-progress"]


def write_data(folder: Path) -> list[Path]:
    X = np.random.default_rng(0).standard_normal((sum(ROWS), 8))
    paths = [folder / "X0.npy", folder / "X1.npy"]
    np.save(paths[0], X[: ROWS[0]])
    np.save(paths[1], X[ROWS[0] :])
    return paths


def commands(data: list[Path], out: Path, port: int) -> list[list[str]]:
    """The README's two commands, one per process."""
    return [[*SCRIPT, "--data", str(d), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), *TRAIN, "--out", str(out)]
            for i, d in enumerate(data)]


def start_job(data: list[Path], out: Path, logs: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    return [start(c, log) for c, log in zip(commands(data, out, port), logs, strict=True)]


def test_a_killed_peer_stops_the_other_and_the_same_commands_resume(tmp_path):
    data = write_data(tmp_path)
    out = tmp_path / "killed"
    logs = [tmp_path / "killed0.log", tmp_path / "killed1.log"]
    procs = start_job(data, out, logs)
    ckpt = out / "checkpoint" / "checkpoint.npz"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ckpt.exists():
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            procs[0].wait(timeout=SURVIVOR_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still runs {SURVIVOR_LIMIT} s after its peer was killed")
        survived = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    print(f"process 0 exited {survived:.1f} s after process 1 was killed, "
          f"with exit code {procs[0].returncode}")
    assert procs[0].returncode != 0
    assert procs[1].returncode == -signal.SIGKILL
    with np.load(ckpt) as f:
        stopped = int(f["epoch"])
    assert 0 < stopped < EPOCHS, stopped  # really interrupted midway
    assert not (out / "params.npz").exists()

    resumed_logs = [tmp_path / "resumed0.log", tmp_path / "resumed1.log"]
    finish(start_job(data, out, resumed_logs), resumed_logs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == stopped and metrics["process_count"] == 2

    # The uninterrupted run: one process on all the rows, in this process (two processes
    # agree with one to rounding: test_two_processes_give_the_results_of_one).
    everything, whole = tmp_path / "X.npy", tmp_path / "whole"
    np.save(everything, np.concatenate([np.load(d) for d in data]))
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_script.main(["--data", str(everything), *TRAIN, "--out", str(whole)]) == 0
    with np.load(out / "params.npz") as a, np.load(whole / "params.npz") as b:
        for k in "ABC":
            np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.loadtxt(out / "losses.csv", delimiter=",", skiprows=1),
                               np.loadtxt(whole / "losses.csv", delimiter=",", skiprows=1),
                               rtol=1e-10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["killed", "whole"]


def test_a_coordinator_that_is_not_there_is_a_clear_error(tmp_path):
    data = write_data(tmp_path)
    port = free_port()  # nobody listens there
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, *commands(data, tmp_path / "out", port)[1], "--init-timeout", "3"],
        env=ENV, cwd=TESTS.parent, capture_output=True, text=True, timeout=60,
    )
    took = time.monotonic() - began
    print(f"exit {result.returncode} after {took:.1f} s: {result.stderr.strip()}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no coordinator answered at "), lines
    assert f"127.0.0.1:{port}" in lines[0] and "within 3 s" in lines[0]
    assert took < 3 + 20  # the timeout, plus starting Python and JAX
    assert not (tmp_path / "out").exists()
