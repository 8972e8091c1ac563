"""experiments/train.py, called in-process: outputs, resume, restart, bad data, flags, help;
its Config -> run -> report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import train as train_script
from experiments.common import job
from experiments.common.data import hold_out

pytestmark = pytest.mark.integration  # script runs: the integration run (.ci/run)

ROOT = Path(__file__).resolve().parent.parent

SMALL = ["--quick", "--n", "24", "--in-dim", "4", "--hidden-dim", "6", "--out-dim", "2"]


def _usage_error(argv: list[str], capsys) -> str:
    """Exit code 2 (argparse's for a bad value, or main's for a failed check of the Config);
    what went to stderr."""
    try:
        code = train_script.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        train_script.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in (("--epochs", "1000"), ("--lr", "0.05"), ("--optimizer", "gd"),
                          ("--n", "256"), ("--heartbeat-timeout", "10"),
                          ("--out", "results/train")):
        assert f"{flag}" in text and f"(default: {default})" in text, flag
    assert "--quick" in text and "--restart" in text


def test_writes_every_output_then_resumes_refuses_and_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    # a chunk length no other test uses: this process compiles the loop here, whatever ran before
    args = [*SMALL, "--lr", "0.05", "--epochs-per-chunk", "17", "--checkpoint-every", "17",
            "--out", str(out)]
    assert train_script.main(args) == 0
    for name in ("config.json", "metrics.json", "losses.csv", "loss.png", "params.npz",
                 "checkpoint/checkpoint.npz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 40 and metrics["final_loss"] < metrics["initial_loss"]
    assert 0 < metrics["compile_seconds"] <= metrics["seconds"]
    assert metrics["epochs_per_second"] == pytest.approx(
        40 / (metrics["seconds"] - metrics["compile_seconds"]))
    config = json.loads((out / "config.json").read_text())
    assert (config["N"], config["D"], config["H"], config["O"]) == (24, 4, 6, 2)
    assert config["quick"] is True
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss" and len(rows) == 41
    with np.load(out / "params.npz") as f:
        assert (f["A"].shape, f["B"].shape, f["C"].shape) == ((6, 4), (6, 4), (2, 6))
        assert f["A"].dtype == np.float32
        params = {k: f[k] for k in "ABC"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compile s" in capsys.readouterr().out

    first = metrics
    assert first["status"] == "finished" and len(first["runs"]) == 1
    assert first["runs"][0]["epochs_run"] == 40 and first["runs"][0]["resumed_from"] == 0
    assert train_script.main(args) == 0  # the same command: resumes, nothing left to run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 40 and metrics["epochs_this_run"] == 0
    assert metrics["runs"][0] == first["runs"][0] and metrics["runs"][1]["epochs_run"] == 0
    assert metrics["runs"][1]["resumed_from"] == 40 and len(metrics["runs"]) == 2
    for k in ("epochs_per_second", "seconds", "compile_seconds"):  # the first run's timing
        assert metrics[k] == first[k] and first[k] is not None
    with np.load(out / "params.npz") as f:
        for k in "ABC":
            np.testing.assert_array_equal(f[k], params[k])

    changed = [a if a != "0.05" else "0.01" for a in args]
    capsys.readouterr()
    assert train_script.main(changed) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {out} holds a run with other settings (different lr)")
    assert "--out DIR" in line and "--restart" in line and "fingerprint" not in line

    assert train_script.main([*changed, "--restart"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 0 and metrics["epochs_this_run"] == 40
    assert len(metrics["runs"]) == 1  # --restart: a new run, a new history


def test_float64_csv_minibatches_adam_oracle(tmp_path):
    X = np.random.default_rng(0).standard_normal((13, 3))
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    out = tmp_path / "csv"
    assert train_script.main([
        "--quick", "--data", str(tmp_path / "x.csv"), "--dtype", "float64", "--optimizer",
        "adam", "--lr", "0.01", "--batch-size", "5", "--grad", "oracle", "--chunk-size", "4",
        "--epochs", "10", "--hidden-dim", "5", "--out", str(out)]) == 0
    with np.load(out / "params.npz") as f:
        assert f["A"].dtype == np.float64 and f["A"].shape == (5, 3)
    config = json.loads((out / "config.json").read_text())
    assert config["N"] == 13 and config["optimizer"] == "adam" and config["epochs"] == 10


def test_no_progress_bar_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar's own stream: a terminal
    assert train_script.main([*SMALL, "--out", str(tmp_path / "a")]) == 0
    assert "epoch" not in capsys.readouterr().err  # stdout is captured: no bar at all
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert train_script.main([*SMALL, "--out", str(tmp_path / "b")]) == 0
    assert "epoch" in capsys.readouterr().err  # the control: on a terminal the bar shows


@pytest.mark.parametrize(
    ("name", "content"),
    [("missing.csv", None), ("cube.npy", np.zeros((2, 3, 4))), ("text.csv", "x,y\n1,2\nthree,4\n"),
     ("nan.npy", np.array([[1.0, 2.0], [np.nan, 0.0]]))],
    ids=["missing", "wrong-shape", "text", "nan"],
)
def test_a_bad_data_file_is_one_line_and_exit_code_2(tmp_path, capsys, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, str):
        path.write_text(content)
    assert train_script.main(["--data", str(path), "--quick", "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started


@pytest.mark.integration
def test_the_process_exits_2_on_bad_data(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("1,2,cat\n3,4,5\n")
    result = subprocess.run([sys.executable, "-m", "experiments.train", "--data", str(path),
                             "--quick", "--out", str(tmp_path / "o")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {path}: line 1, column 3 is not a number: 'cat' " \
                            "(delimiter: comma)\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], "go together"),
        (["--num-processes", "2", "--process-id", "0"], "go together"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be in 0 .. 1"),
        (["--epochs", "-1"], "--epochs must be >= 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
    ],
    ids=["coordinator-alone", "no-coordinator", "id-out-of-range", "epochs", "lr"],
)
def test_bad_flags_are_usage_errors(tmp_path, capsys, flags, message):
    assert message in _usage_error([*flags, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=re.escape(message)):  # the same check in-process
        train_script.parse_args(flags)


def test_a_bad_coordinator_address_is_one_line(tmp_path, capsys):
    assert train_script.main(["--coordinator", "nohost", "--num-processes", "2",
                              "--process-id", "1", "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "HOST:PORT" in line and not (tmp_path / "out").exists()


# -- targets, held-out data, early stopping -------------------------------------------------


def _xy(tmp_path, n=30, D=4, O=2):
    """A CSV of n rows: D columns of X then O of targets T = f(X) (a learnable task)."""
    X = np.random.default_rng(1).standard_normal((n, D))
    T = np.c_[np.tanh(X[:, :1]), 0.5 * X[:, 1:2]][:, :O]
    np.savetxt(tmp_path / "xy.csv", np.c_[X, T], delimiter=",", header="a,b,c,d,t1,t2",
               comments="")
    return tmp_path / "xy.csv", X, T


def test_target_columns_held_out_fraction_patience_and_the_saved_params(tmp_path, monkeypatch,
                                                                        capsys):
    import abc_jax

    path, X, T = _xy(tmp_path)
    returned = []
    monkeypatch.setattr(train_script, "train", lambda *a, **k: returned.append(
        abc_jax.train(*a, **k)) or returned[-1])
    out = tmp_path / "run"
    assert train_script.main([
        "--data", str(path), "--target-cols", "5,-1", "--eval-fraction", "0.3", "--patience",
        "2", "--optimizer", "adam", "--lr", "0.05", "--epochs", "400", "--epochs-per-chunk", "20",
        "--eval-every", "20",
        "--hidden-dim", "6", "--dtype", "float64", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["N"], config["N_eval"], config["D"], config["O"]) == (21, 9, 4, 2)
    assert config["targets"] == "columns 5,-1 of the data" and config["patience"] == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_epochs"][0] == 0 and np.all(np.diff(m["eval_epochs"]) == 20)
    assert m["best_eval_loss"] == min(m["eval_losses"]) < m["eval_losses"][0]
    assert m["best_epoch"] == m["eval_epochs"][int(np.argmin(m["eval_losses"]))]
    assert m["stopped_early"] and m["eval_epochs"][-1] < 400  # 21 rows: it overfits
    assert m["eval_epochs"][-1] - m["best_epoch"] == 2 * 20  # patience: 2 evaluations
    (result,) = returned
    saved = abc_jax.load_params(out / "params.npz")
    for got, want in zip(saved, result.params, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the params written are the best held-out ones: their loss on the held-out rows is the best
    _, (Xe, Te) = hold_out(X, T, 0.3, 0)
    held = abc_jax.batch_loss(saved, abc_jax.Batch(Xe, T=Te))
    assert float(held) == pytest.approx(m["best_eval_loss"], rel=1e-12)
    # the best evaluation with both its losses, the last one likewise; the table says which
    (Xk, Tk), _ = hold_out(X, T, 0.3, 0)
    kept = float(abc_jax.batch_loss(saved, abc_jax.Batch(Xk, T=Tk)))
    assert m["best"] == {"epoch": m["best_epoch"], "eval_loss": m["best_eval_loss"],
                         "train_loss": pytest.approx(kept, rel=1e-12)}
    # the last evaluation whose params' training loss the run measured: patience stopped at
    # the final one, before its epoch ran, so the one before it
    losses = np.loadtxt(out / "losses.csv", delimiter=",", skiprows=1)[:, 1]
    assert m["eval_epochs"][-1] == len(losses) and m["last"] == {
        "epoch": m["eval_epochs"][-2], "eval_loss": m["eval_losses"][-2],
        "train_loss": pytest.approx(losses[m["eval_epochs"][-2]], rel=1e-12)}
    assert m["status"] == "finished"
    assert m["last"]["train_loss"] < m["best"]["train_loss"]  # it went on fitting the 21 rows
    lines = capsys.readouterr().out.splitlines()
    best = next(line for line in lines if line.startswith("best held-out"))
    last = next(line for line in lines if line.split()[:1] == ["last"])
    assert best.endswith("yes") and not last.endswith("yes")  # --patience keeps the best
    assert best.split()[2] == str(m["best_epoch"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_file_and_held_out_files(tmp_path, capsys):
    _, X, T = _xy(tmp_path, O=1)
    for name, a in (("x.npy", X), ("t.npy", T), ("xe.npy", X[:7]), ("te.npy", T[:7])):
        np.save(tmp_path / name, a)
    out = tmp_path / "run"
    assert train_script.main([
        "--quick", "--data", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "t.npy"),
        "--eval-data", str(tmp_path / "xe.npy"), "--eval-targets", str(tmp_path / "te.npy"),
        "--hidden-dim", "6", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["N"], config["N_eval"], config["O"]) == (30, 7, 1)  # O from the targets
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_epochs"] == [0, 20, 40] and not m["stopped_early"]
    assert m["last"]["epoch"] == 40 and m["best"]["epoch"] == m["best_epoch"]
    lines = capsys.readouterr().out.splitlines()
    best = next(line for line in lines if line.startswith("best held-out"))
    last = next(line for line in lines if line.split()[:1] == ["last"])
    assert last.endswith("yes") and not best.endswith("yes")  # no --patience: the last params


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--targets", "t.npy", "--target-cols", "1"], "give one"),
        (["--target-cols", "1"], "--target-cols needs --data"),
        (["--eval-data", "x.npy", "--eval-fraction", "0.2"], "give one"),
        (["--eval-targets", "t.npy"], "--eval-targets goes with --targets and --eval-data"),
        (["--data", "x.npy", "--targets", "t.npy", "--eval-data", "x.npy"], "needs --eval-targets"),
        (["--eval-fraction", "1"], "--eval-fraction must be between 0 and 1"),
        (["--patience", "3"], "--patience needs held-out data"),
        (["--eval-fraction", "0.2", "--patience", "0"], "--patience must be >= 1"),
        (["--data", "x.npy", "--target-cols", "2,x"], "--target-cols: expected column numbers"),
    ],
    ids=["two-targets", "cols-no-data", "two-held-out", "eval-targets-alone", "no-eval-targets",
         "fraction", "patience-alone", "patience-0", "cols-text"],
)
def test_bad_target_flags_are_usage_errors(tmp_path, capsys, flags, message):
    assert message in _usage_error([*flags, "--out", str(tmp_path / "out")], capsys)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-cols", "7"], "--target-cols 7 is out of range: the file has 6 columns"),
        (["--target-cols", "5,-2"], "names a column twice"),
        (["--target-cols", "5,6", "--out-dim", "3"], "--out-dim 3 but the targets have O = 2"),
        (["--target-cols", "6", "--eval-fraction", "0.01"], "holds out 0"),
        (["--targets", "short.npy"], "--targets has 3 rows"),
    ],
    ids=["out-of-range", "twice", "out-dim", "fraction-empty", "rows"],
)
def test_bad_targets_are_one_line_and_exit_code_2(tmp_path, capsys, flags, message):
    path, _, _ = _xy(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros((3, 2)))
    flags = [str(tmp_path / f) if f.endswith(".npy") else f for f in flags]
    assert train_script.main(["--data", str(path), *flags, "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "o").exists()


# -- outputs that survive: divergence, Ctrl-C ----------------------------------------------


def test_a_diverged_run_writes_its_outputs_and_advice_that_works_as_printed(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*SMALL, "--lr", "4", "--out", str(out)]  # diverges at epoch 4; --lr 0.4 does not
    assert train_script.main(args) == 1
    for name in ("config.json", "metrics.json", "losses.csv", "loss.png",
                 "checkpoint/checkpoint.npz"):
        assert (out / name).is_file(), name
    assert not (out / "params.npz").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["diverged_at_epoch"] == 4
    assert m["runs"][0]["status"] == "diverged" and m["final_loss"] > m["initial_loss"]
    assert len((out / "losses.csv").read_text().splitlines()) == 1 + 4  # the finite ones
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "epoch 4" in line and str(out) in line and captured.out == ""
    added = re.search(r"the same command with (.+?) added", line).group(1).split()
    assert added == ["--lr", "0.4", "--restart"]
    assert train_script.main([*args, *added]) == 0  # the advice, literally
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["epochs_this_run"] == 40 and len(m["runs"]) == 1
    assert (out / "params.npz").is_file()


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    import abc_jax

    def interrupt(epoch, params, metrics):
        if epoch == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "train", lambda *a, callbacks=(), **k: abc_jax.train(
        *a, callbacks=[*callbacks, interrupt], **k))
    out = tmp_path / "run"
    args = [*SMALL, "--out", str(out)]
    assert train_script.main(args) == 130
    assert capsys.readouterr().err == ("interrupted at epoch 20: run the same command again to "
                                       "resume\n")
    assert train_script.checkpoint_epoch(out / "checkpoint") == 20
    monkeypatch.undo()
    assert train_script.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 20 and m["epochs_this_run"] == 20


@pytest.mark.integration
def test_sigint_to_the_process_is_one_line_and_exit_code_130(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *SMALL, "--epochs",
                             "1000000", "--epochs-per-chunk", "50", "--checkpoint-every", "50",
                             "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "checkpoint.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stdout == "", (proc.returncode, stdout, stderr)
    epoch = train_script.checkpoint_epoch(out / "checkpoint")
    assert epoch > 0 and stderr == (f"interrupted at epoch {epoch}: run the same command "
                                    "again to resume\n")


def test_run_job_exit_codes_in_process(tmp_path, capsys):
    """job.run_job alone: the body's code; Ctrl-C -> 130 and one line naming the epoch of
    the checkpoint to resume from; other errors propagate; a bad coordinator -> 2."""
    assert job.run_job(lambda: 7) == 7

    def interrupted():
        raise KeyboardInterrupt

    assert job.run_job(interrupted, checkpoint_dir=tmp_path) == job.INTERRUPTED == 130
    assert capsys.readouterr().err == ("interrupted at epoch 0: run the same command again to "
                                       "resume\n")
    with pytest.raises(ZeroDivisionError):
        job.run_job(lambda: 1 // 0)
    assert job.run_job(lambda: 0, coordinator="no-port", num_processes=2,
                            process_id=0) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_config_run_then_report_in_process(tmp_path, capsys):
    """run(config) trains in config.out and prints nothing; report writes and prints; a
    config that does not go together is a ValueError."""
    config = dataclasses.replace(train_script.QUICK, n=24, in_dim=4, hidden_dim=6, out_dim=2,
                                 out=tmp_path / "run", progress=False)
    assert train_script.parse_args([*SMALL, "--out", str(config.out), "--no-progress"]) == config
    res = train_script.run(config)
    assert capsys.readouterr() == ("", "") and res["metrics"]["status"] == "finished"
    assert len(res["losses"]) == 40 and res["config"]["N"] == 24
    assert (config.out / "checkpoint" / "checkpoint.npz").is_file()  # run's own folder
    train_script.report(res, config.out)
    assert {p.name for p in config.out.iterdir()} >= {"config.json", "metrics.json",
                                                      "losses.csv", "loss.png", "params.npz"}
    assert f"results in {config.out}/" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--patience needs held-out data"):
        dataclasses.replace(config, patience=2)


def _scaled_regression(tmp_path):
    """scikit-learn's make_regression, N = 2000, D = 5, column 3 x1000, the target last."""
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=2000, n_features=5, noise=5.0, random_state=0)
    X[:, 2] *= 1000.0
    path = tmp_path / "reg.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",")
    return path, X, y


@pytest.mark.integration  # two trainings and a prediction on 2000 rows
def test_standardize_trains_scaled_columns_and_predict_answers_in_their_units(tmp_path, capsys):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    from experiments import predict

    path, X, y = _scaled_regression(tmp_path)
    common = ["--data", str(path), "--target-cols", "-1", "--eval-fraction", "0.2",
              "--optimizer", "adam", "--lr", "0.03", "--epochs", "600", "--dtype", "float64"]
    raw = tmp_path / "raw"  # without --standardize: diverges, and the advice says why
    assert train_script.main([*common, "--lr", "0.5", "--optimizer", "gd", "--out",
                              str(raw)]) == 1
    assert "--standardize" in capsys.readouterr().err
    out = tmp_path / "std"
    assert train_script.main([*common, "--standardize", "--bias", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["standardize"] and config["bias"] and config["D"] == 6  # the constant column
    (Xk, yk), (Xh, yh) = hold_out(X, y, 0.2, 0)  # the split train.py made (--seed 0)
    held = tmp_path / "held.csv"
    np.savetxt(held, Xh, delimiter=",")
    assert predict.main(["--params", str(out), "--data", str(held), "--out",
                         str(tmp_path / "preds.csv")]) == 0
    preds = np.loadtxt(tmp_path / "preds.csv", delimiter=",", skiprows=1)
    ridge = r2_score(yh, Ridge().fit(Xk, yk).predict(Xh))
    ours = r2_score(yh, preds)
    assert ours >= 0.99 * ridge, (ours, ridge)  # in y's own units
