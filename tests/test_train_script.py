"""experiments/train.py and the data loader behind it: outputs, resume, bad data files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abc_jax.data import DataError, load_data

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "train.py"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )


# --- load_data --------------------------------------------------------------


def test_load_data_reads_npy_npz_and_csv(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "first.npz", X)
    np.savez(tmp_path / "named.npz", other=np.zeros((2, 2)), X=X)
    np.savetxt(tmp_path / "x.csv", X, delimiter=",", fmt="%.17g")
    (tmp_path / "header.csv").write_text("a,b,c\n" + "\n".join(
        ",".join(repr(float(v)) for v in row) for row in X.astype(np.float64)) + "\n")
    for name in ("x.npy", "first.npz", "named.npz", "x.csv", "header.csv"):
        got = load_data(tmp_path / name)
        assert got.dtype == np.float64 and got.shape == (4, 3), name
        np.testing.assert_allclose(got, X, rtol=1e-7, err_msg=name)
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(3, 2))
    assert load_data(tmp_path / "ints.npy").shape == (3, 2)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.npy", None, "no such file"),
        ("cube.npy", np.zeros((2, 3, 4)), "2-D"),
        ("vector.npy", np.zeros(5), "2-D"),
        ("empty.npy", np.zeros((0, 3)), "at least one sample"),
        ("nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]), "finite"),
        ("inf.csv", "1,2\n3,inf\n", "finite"),
        ("text.csv", "1,2\n3,four\n", "not a number"),
        ("ragged.csv", "1,2\n3\n", "columns"),
        ("garbage.npy", b"this is not numpy", "cannot read"),
        ("garbage.npz", b"this is not a zip", "cannot read"),
        ("strings.npy", np.array([["a", "b"]]), "real numbers"),
        ("x.txt", "1,2\n", "suffix"),
    ],
)
def test_load_data_rejects_bad_files_in_one_line(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(DataError, match=reason) as info:
        load_data(path)
    assert "\n" not in str(info.value) and name in str(info.value)


# --- the script -------------------------------------------------------------


def test_script_writes_every_output_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--n", "24", "--in-dim", "4", "--hidden-dim", "6", "--out-dim", "2",
            "--epochs", "150", "--lr", "0.05", "--out", str(out), "--no-progress"]
    first = run_script(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for name in ("config.json", "metrics.json", "losses.csv", "loss.png", "params.npz",
                 "checkpoint/checkpoint.npz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("final_loss", "epochs_per_second", "device", "jax_version"):
        assert key in metrics, key
    assert metrics["final_loss"] < metrics["initial_loss"]
    config = json.loads((out / "config.json").read_text())
    assert (config["N"], config["D"], config["H"], config["O"]) == (24, 4, 6, 2)
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss" and len(rows) == 151
    with np.load(out / "params.npz") as f:
        assert f["A"].shape == (6, 4) and f["B"].shape == (6, 4) and f["C"].shape == (2, 6)
        assert f["A"].dtype == np.float32
        params = {k: f[k] for k in "ABC"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_script(*args, cwd=tmp_path)  # same command: resumes, nothing left to run
    assert again.returncode == 0, again.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 150 and metrics["epochs_this_run"] == 0
    with np.load(out / "params.npz") as f:
        for k in "ABC":
            np.testing.assert_array_equal(f[k], params[k])

    changed = run_script(*[a if a != "0.05" else "0.01" for a in args], cwd=tmp_path)
    assert changed.returncode == 2 and "different run" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_script_trains_float64_on_a_csv_with_minibatches_and_adam(tmp_path):
    X = np.random.default_rng(0).standard_normal((13, 3))
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    out = tmp_path / "csv"
    result = run_script("--data", str(tmp_path / "x.csv"), "--dtype", "float64",
                        "--optimizer", "adam", "--lr", "0.01", "--batch-size", "5",
                        "--grad", "oracle", "--chunk-size", "4", "--epochs", "40",
                        "--hidden-dim", "5", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(out / "params.npz") as f:
        assert f["A"].dtype == np.float64 and f["A"].shape == (5, 3)
    config = json.loads((out / "config.json").read_text())
    assert config["N"] == 13 and config["optimizer"] == "adam"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("missing.csv", None),
        ("cube.npy", np.zeros((2, 3, 4))),
        ("text.csv", "x,y\n1,2\nthree,4\n"),
        ("nan.npy", np.array([[1.0, 2.0], [np.nan, 0.0]])),
    ],
    ids=["missing", "wrong-shape", "text", "nan"],
)
def test_script_reports_a_bad_data_file_in_one_line(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, str):
        path.write_text(content)
    result = run_script("--data", str(path), "--epochs", "5", "--out", str(tmp_path / "out"),
                        "--no-progress", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], "go together"),
        (["--num-processes", "2", "--process-id", "0"], "go together"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be in 0 .. 1"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "1"],
         "HOST:PORT"),
    ],
    ids=["coordinator-alone", "no-coordinator", "id-out-of-range", "bad-address"],
)
def test_script_several_process_flags_are_checked(tmp_path, flags, message):
    result = run_script(*flags, "--epochs", "1", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
