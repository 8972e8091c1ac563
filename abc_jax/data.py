"""Loading a user's samples from disk: .npy, .npz or .csv, checked, as an (N, D) array.

Every problem becomes a one-line ``DataError`` (a ``ValueError``) naming the
file, so a script can print it and exit. Positions are 1-based: a text file's
line numbers as an editor shows them (blank lines counted), an array's rows
and columns counted from 1.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv")
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", None: "whitespace"}


class DataError(ValueError):
    """The data file is missing, unreadable, of the wrong shape, non-numeric or not finite."""


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _sniff(line: str) -> str | None:
    """The delimiter of a text table from one of its lines: ; , tab, else whitespace (None).

    A semicolon comes first: a line with both is semicolons between decimal commas.
    """
    return next((d for d in (";", ",", "\t") if d in line), None)


def _split(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.split()
    return [cell.strip() for cell in next(csv.reader([line], delimiter=delimiter))]


def _load_csv(path: Path) -> tuple[np.ndarray, list[int]]:
    """(rows of numbers, the file's 1-based line number of each row).

    The delimiter is sniffed from the first non-blank line. That line is a
    header when none of its cells is a number, even read with a decimal comma;
    a row with some numbers and some not is an error naming its line and column.
    """
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    if not lines:
        raise DataError(f"{path}: the file holds no rows")
    delimiter = _sniff(lines[0][1])
    rows = [(i, _split(line, delimiter)) for i, line in lines]
    if all(_number(cell.replace(",", ".")) is None for cell in rows[0][1]):
        rows = rows[1:]  # a header: no cell a number (nor one with a decimal comma)
    if not rows:
        raise DataError(f"{path}: the file holds a header but no rows of numbers")
    table = []
    for i, cells in rows:
        values = [_number(cell) for cell in cells]
        if None in values:
            j = values.index(None)
            comma = _number(cells[j].replace(",", ".")) is not None
            hint = (f"; decimal commas are not read: write {cells[j].replace(',', '.')} for "
                    f"{cells[j]}" if comma else "")
            raise DataError(f"{path}: line {i}, column {j + 1} is not a number: {cells[j]!r} "
                            f"(delimiter: {DELIMITERS[delimiter]}){hint}")
        if len(values) != len(table[0] if table else values):
            raise DataError(f"{path}: line {i} has {len(values)} columns, line {rows[0][0]} "
                            f"has {len(table[0])} (delimiter: {DELIMITERS[delimiter]})")
        table.append(values)
    return np.asarray(table, dtype=np.float64), [i for i, _ in rows]


def _load_npz(path: Path, name: str, named: bool) -> np.ndarray:
    """The array ``name`` of the archive; with ``name`` only a default (not ``named``), the
    archive's one array if it holds one."""
    with np.load(path, allow_pickle=False) as f:
        names = list(f.files)
        if not names:
            raise DataError(f"{path}: the archive holds no arrays")
        if name in names:
            return np.asarray(f[name])
        if len(names) == 1 and not named:
            return np.asarray(f[names[0]])
        raise DataError(f"{path}: the archive holds no array named {name!r}; it has {names}: "
                        f"name one as {path}:NAME")


def _read(path: Path, name: str, named: bool) -> tuple[np.ndarray, list[int] | None]:
    """(the array in the file, a text file's line number of each row or None)."""
    try:
        if path.suffix.lower() == ".csv":
            return _load_csv(path)
        if path.suffix.lower() == ".npz":
            return _load_npz(path, name, named), None
        return np.load(path, allow_pickle=False), None
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # NumPy's words for a file that is not an array file
            raise DataError(f"{path}: not a NumPy array file ({path.suffix} expected: "
                            "written by np.save or np.savez)") from None
        raise DataError(f"{path}: cannot read it as {path.suffix} ({str(e).splitlines()[0]})"
                        ) from None
    except (OSError, EOFError, csv.Error, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read it as {path.suffix} ({reason})") from None


def load_data(path: str | os.PathLike[str], *, name: str = "X",
              what: str = "samples") -> np.ndarray:
    """Rows of a .npy, .npz or .csv file, (N, D) as float64: samples X, or targets T.

    .npy: the array. .npz: the array named ``name`` ("X"; "T" for targets), or
    the archive's only array; ``FILE.npz:NAME`` picks the array NAME. .csv: one
    row per line, the delimiter (comma, semicolon, tab or whitespace) sniffed
    from the first line, with an optional header line (no cell of it a number);
    blank lines are skipped. ``what``: "samples", or "targets", which may also
    be 1-D (N,): one target per row, O = 1.

    Returns:
      float64, shape (N, D) with N, D >= 1, every entry finite.

    Raises:
      DataError: missing or unreadable file, not an array file, unknown suffix,
        an array of the wrong rank or empty, non-numeric entries (a decimal
        comma named as such), NaN or inf; in one line that names the file and,
        for a bad entry, its 1-based line (or row) and column.
    """
    path, named = Path(path), False
    if ".npz:" in path.name:  # FILE.npz:NAME
        stem, _, name = str(path).rpartition(":")
        path, named = Path(stem), True
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown suffix {path.suffix!r}, expected one of {SUFFIXES}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    X, lines = _read(path, name, named)
    real = np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
    if X.dtype == bool or not real:
        raise DataError(f"{path}: entries must be real numbers, got dtype {X.dtype}")
    if what == "targets" and X.ndim == 1:
        X = X[:, None]  # one target per row: O = 1
    if X.ndim != 2:
        shape = "(N, O) or (N,)" if what == "targets" else "(N, D)"
        raise DataError(f"{path}: {what} must form a 2-D array {shape}, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        one = "one sample and one feature" if what == "samples" else "one row and one target"
        raise DataError(f"{path}: need at least {one}, got shape {X.shape}")
    X = X.astype(np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        where = f"row {i + 1}" if lines is None else f"line {lines[i]}"
        raise DataError(f"{path}: entries must be finite; {int(bad.sum())} NaN/inf, first at "
                        f"{where}, column {j + 1} ({X[i, j]})")
    return X
