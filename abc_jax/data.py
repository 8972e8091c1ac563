"""Loading a user's samples from disk: .npy, .npz or .csv, checked, as an (N, D) array.

Every problem with the file becomes a ``DataError`` (a ``ValueError``) with a
one-line message naming the file and what is wrong, so a script can print it
and exit instead of showing a traceback.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv")


class DataError(ValueError):
    """The data file is missing, unreadable, of the wrong shape, non-numeric or not finite."""


def _load_csv(path: Path) -> np.ndarray:
    """Rows of numbers, comma separated; a first row that is not numeric is a header."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path}: the file holds no rows")

    def numbers(row: list[str], line: int) -> list[float]:
        out = []
        for col, cell in enumerate(row):
            try:
                out.append(float(cell))
            except ValueError:
                raise DataError(
                    f"{path}: row {line}, column {col + 1} is not a number: {cell.strip()!r}"
                ) from None
        return out

    try:
        numbers(rows[0], 1)
        first = 0
    except DataError:
        first = 1  # a header
    table = [numbers(row, i + 1) for i, row in enumerate(rows) if i >= first]
    if not table:
        raise DataError(f"{path}: the file holds a header but no rows of numbers")
    widths = {len(row) for row in table}
    if len(widths) != 1:
        raise DataError(f"{path}: rows have different numbers of columns {sorted(widths)}")
    return np.asarray(table, dtype=np.float64)


def _load_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        names = list(f.files)
        if not names:
            raise DataError(f"{path}: the archive holds no arrays")
        return np.asarray(f["X" if "X" in names else names[0]])


def load_data(path: str | os.PathLike[str]) -> np.ndarray:
    """Samples X of shape (N, D) from a .npy, .npz or .csv file, as float64.

    .npy: the array. .npz: the array named ``X``, else the first one. .csv:
    one sample per row, comma separated, with an optional header row.

    Returns:
      X, float64, shape (N, D) with N, D >= 1, every entry finite.

    Raises:
      DataError: missing or unreadable file, unknown suffix, an array that is
        not 2-D or is empty, non-numeric entries, NaN or inf; one line.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown suffix {path.suffix!r}, expected one of {SUFFIXES}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".csv":
            X = _load_csv(path)
        elif path.suffix.lower() == ".npz":
            X = _load_npz(path)
        else:
            X = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read it as {path.suffix} ({reason})") from None
    if X.dtype == bool or not (
        np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
    ):
        raise DataError(f"{path}: entries must be real numbers, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{path}: samples must form a 2-D array (N, D), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: need at least one sample and one feature, got shape {X.shape}")
    X = X.astype(np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: entries must be finite; {int(bad.sum())} NaN/inf, first at "
            f"row {i}, column {j} ({X[i, j]})"
        )
    return X
