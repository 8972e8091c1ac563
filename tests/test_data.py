"""abc_jax.load_data: every format it reads, every bad file refused in one line with its place."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from abc_jax import DataError, load_data

X = np.arange(12, dtype=np.float64).reshape(4, 3) / 7


def _text(rows, sep=","):
    return "\n".join(sep.join(repr(float(v)) for v in row) for row in rows) + "\n"


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_reads_npy_npz_and_csv(tmp_path):
    np.save(tmp_path / "x.npy", X.astype(np.float32))
    np.savez(tmp_path / "only.npz", X)  # one array, whatever its name
    np.savez(tmp_path / "named.npz", other=np.zeros((2, 2)), X=X)
    (tmp_path / "x.csv").write_text(_text(X))
    (tmp_path / "header.csv").write_text("a,b,c\n" + _text(X))
    for name in ("x.npy", "only.npz", "named.npz", "x.csv", "header.csv"):
        got = load_data(tmp_path / name)
        assert got.dtype == np.float64 and got.shape == (4, 3), name
        np.testing.assert_allclose(got, X, rtol=1e-7, err_msg=name)
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(load_data(tmp_path / "ints.npy"), [[0, 1], [2, 3], [4, 5]])


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab"), (" ", "spaces"),
                                           (" ,  ", "padded commas")])
def test_csv_delimiter_is_sniffed(tmp_path, sep, name):
    path = tmp_path / "x.csv"
    path.write_text("x1" + sep + "x2" + sep + "x3\n" + _text(X, sep))
    np.testing.assert_array_equal(load_data(path), X, err_msg=name)


def test_decimal_commas_fail_naming_the_delimiter(tmp_path):
    path = tmp_path / "eu.csv"
    path.write_text("1,5;2,25\n3,0;4,0\n")
    with pytest.raises(DataError, match=r"line 1, column 1 is not a number: '1,5' "
                                        r"\(delimiter: semicolon\)"):
        load_data(path)


def test_a_partly_numeric_first_row_is_an_error_not_a_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("1,2,cat\n3,4,5\n")
    with pytest.raises(DataError, match=r"line 1, column 3 is not a number: 'cat'"):
        load_data(path)


def test_positions_are_the_files_line_numbers(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n\n1,2\n\n3,four\n")  # blank lines count, as in an editor
    with pytest.raises(DataError, match=r"line 5, column 2 is not a number: 'four'"):
        load_data(path)
    path.write_text("a,b\n\n1,2\n3,nan\n")
    with pytest.raises(DataError, match=r"1 NaN/inf, first at line 4, column 2"):
        load_data(path)
    path.write_text("1,2\n\n3\n")
    with pytest.raises(DataError, match=r"line 3 has 1 columns, line 1 has 2"):
        load_data(path)
    np.save(tmp_path / "x.npy", np.array([[1.0, 2.0], [3.0, np.inf]]))
    with pytest.raises(DataError, match=r"first at row 2, column 2 \(inf\)"):
        load_data(tmp_path / "x.npy")


def test_npz_with_several_arrays_and_no_X_names_them(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, a=X, b=X)
    with pytest.raises(DataError, match=r"no array named 'X'; it has \['a', 'b'\]: name one as "
                                        r".*two\.npz:NAME"):
        load_data(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.npy", None, "no such file"),
        ("cube.npy", np.zeros((2, 3, 4)), "2-D"),
        ("vector.npy", np.zeros(5), "2-D"),
        ("empty.npy", np.zeros((0, 3)), "at least one sample"),
        ("nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]), "finite"),
        ("inf.csv", "1,2\n3,inf\n", "finite"),
        ("blank.csv", "\n \n", "no rows"),
        ("header-only.csv", "a,b\n", "header but no rows"),
        ("garbage.npy", b"this is not numpy", r"not a NumPy array file \(\.npy expected"),
        ("garbage.npz", b"this is not a zip", r"not a NumPy array file \(\.npz expected"),
        ("empty.npz", {}, "no arrays"),
        ("strings.npy", np.array([["a", "b"]]), "real numbers"),
        ("x.txt", "1,2\n", "suffix"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(DataError, match=reason) as info:
        load_data(path)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_an_archive_array_is_picked_by_name(tmp_path):
    X, T = np.arange(6.0).reshape(3, 2), np.arange(3.0)
    np.savez(tmp_path / "xy.npz", X=X, T=T, other=X + 1)
    np.testing.assert_array_equal(load_data(tmp_path / "xy.npz"), X)
    np.testing.assert_array_equal(load_data(tmp_path / "xy.npz", name="T", what="targets"),
                                  T[:, None])  # 1-D targets: one per row, O = 1
    np.testing.assert_array_equal(load_data(f"{tmp_path / 'xy.npz'}:other"), X + 1)
    with pytest.raises(DataError, match=r"no array named 'Y'; it has \['X', 'T', 'other'\]"):
        load_data(f"{tmp_path / 'xy.npz'}:Y")
    with pytest.raises(DataError, match=r"samples must form a 2-D array \(N, D\)"):
        load_data(f"{tmp_path / 'xy.npz'}:T")  # as samples, a 1-D array is not a batch


def test_a_decimal_comma_is_named(tmp_path):
    (tmp_path / "eu.csv").write_text("a;b\n1,5;2\n3;4\n")
    with pytest.raises(DataError, match=r"line 2, column 1 is not a number: '1,5' \(delimiter: "
                                        r"semicolon\); decimal commas are not read: write 1\.5"):
        load_data(tmp_path / "eu.csv")


@pytest.mark.integration
def test_train_script_takes_targets_from_an_archive_by_name(tmp_path):
    # --targets XY.npz picks the array named T (not X: the network would learn to copy X),
    # XY.npz:NAME names another; 1-D targets are O = 1.
    train_script = importlib.import_module("experiments.train")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4))
    np.savez(tmp_path / "xy.npz", X=X, T=X[:, :2] * 0.5, t1=X[:, 0])
    for targets, O in ((tmp_path / "xy.npz", 2), (f"{tmp_path / 'xy.npz'}:t1", 1)):
        out = tmp_path / f"run{O}"
        assert train_script.main(["--quick", "--data", str(tmp_path / "xy.npz"), "--targets",
                                  str(targets), "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["O"] == O
