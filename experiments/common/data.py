"""Reading a script's samples, their targets and held-out rows from files (train.py's flags;
predict.py reads its samples the same way).

Targets t of the rows of X come from a file of their own (N, O) or from columns of the data
file (1-based, negative from the end, as ``--target-cols`` takes them); held-out rows from a
file of the same format or a fixed seeded split. Every problem is a one-line ``DataError``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from abc_jax import Batch, DataError, load_data


class Data(NamedTuple):
    """What ``load_batch`` reads: this process's rows and the batches to train and evaluate on."""

    X: np.ndarray  # (n, D) this process's training rows
    T: np.ndarray | None  # (n, O) their targets; None: t = 0
    batch: Any  # X, or Batch(X, T=T); with several processes the global batch
    eval_data: Any  # held-out X' or Batch(X', T=T'); None: no held-out data


def columns(text: str) -> tuple[int, ...]:
    """--target-cols: comma-separated 1-based column numbers, negative ones from the end."""
    try:
        cols = tuple(int(c) for c in text.split(","))
    except ValueError:
        cols = ()
    if not cols or 0 in cols:
        raise argparse.ArgumentTypeError(
            f"expected column numbers like 11 or 9,10 (1-based; -1 the last), got {text!r}")
    return cols


def split_columns(A: np.ndarray, cols: tuple[int, ...], path: Path) -> tuple[np.ndarray, ...]:
    """(X, T): the columns of A (N, n) outside ``cols`` and those in it (1-based, -1 the last)."""
    n = A.shape[1]
    if bad := [c for c in cols if not -n <= c <= n]:
        raise DataError(f"{path}: --target-cols {bad[0]} is out of range: the file has {n} "
                        "columns")
    idx = [c - 1 if c > 0 else n + c for c in cols]
    if len(set(idx)) < len(idx):
        raise DataError(f"{path}: --target-cols names a column twice: {cols}")
    if len(idx) == n:
        raise DataError(f"{path}: --target-cols takes all {n} columns: none is left for X")
    return A[:, [j for j in range(n) if j not in idx]], A[:, idx]


def read_rows(args: argparse.Namespace, data: Path, targets: Path | None,
              flag: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, T or None) from the file ``data`` with --target-cols, or the file ``targets``."""
    A = load_data(data)
    if args.target_cols is not None:
        return split_columns(A, args.target_cols, data)
    if targets is None:
        return A, None
    T = load_data(targets, name="T", what="targets")
    if T.shape[0] != A.shape[0]:
        raise DataError(f"{targets}: {flag} has {T.shape[0]} rows and {data} {A.shape[0]}: "
                        "one row of targets per sample")
    return A, T


def hold_out(X: np.ndarray, T: np.ndarray | None, fraction: float,
             seed: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """((X, T) kept, (X', T') held out): round(fraction N) rows drawn from ``seed``."""
    N = X.shape[0]
    k = round(fraction * N)
    if not 1 <= k < N:
        raise DataError(f"--eval-fraction {fraction} of N = {N} rows holds out {k}: need at "
                        "least one row held out and one kept")
    perm = np.random.default_rng([seed, 3]).permutation(N)
    rows = np.sort(perm[k:]), np.sort(perm[:k])
    return tuple(tuple(None if a is None else a[r] for a in (X, T)) for r in rows)


def _check_dims(args: argparse.Namespace, X: np.ndarray, T: np.ndarray | None,
                where: str) -> None:
    """DataError if X's columns disagree with --in-dim or T's with --out-dim."""
    for flag, want, A, what in (("--in-dim", args.in_dim, X, "D"),
                                ("--out-dim", args.out_dim, T, "O")):
        if want is not None and A is not None and A.shape[1] != want:
            raise DataError(f"{where}: {flag} {want} but the "
                            f"{'data' if what == 'D' else 'targets'} have {what} = {A.shape[1]}")


def read_data(args: argparse.Namespace) -> tuple[tuple[np.ndarray, ...], tuple | None]:
    """((X, T), (X', T') or None): the training rows and the held-out ones, checked."""
    if args.data is None:
        seed = args.seed if args.coordinator is None else [args.seed, args.process_id]
        X, T = np.random.default_rng(seed).standard_normal((args.n, args.in_dim or 3)), None
    else:
        X, T = read_rows(args, args.data, args.targets, "--targets")
    _check_dims(args, X, T, str(args.data or "synthetic data"))
    held = None
    if args.eval_fraction is not None:
        (X, T), held = hold_out(X, T, args.eval_fraction, args.seed)
    elif args.eval_data is not None:
        held = read_rows(args, args.eval_data, args.eval_targets, "--eval-targets")
        D, O = X.shape[1], None if T is None else T.shape[1]
        if held[0].shape[1] != D or (O is not None and held[1].shape[1] != O):
            raise DataError(f"{args.eval_data}: the held-out data need D = {D} columns of X"
                            + ("" if O is None else f" and O = {O} of targets") + ", got "
                            + " and ".join(str(a.shape[1]) for a in held if a is not None))
    return (X, T), held


def diabetes_split(seed: int, n_test: int) -> tuple[Any, Any]:
    """scikit-learn's diabetes data split once from ``seed`` (``n_test`` rows held out), X and
    y standardised with the training rows' statistics: (train, test) ``Batch``es in float64,
    targets (n, 1)."""
    from sklearn.datasets import load_diabetes  # an optional extra: imported where used

    X, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    test, train = perm[:n_test], perm[n_test:]
    mx, sx, my, sy = X[train].mean(0), X[train].std(0), y[train].mean(), y[train].std()
    X, y = (X - mx) / sx, (y - my) / sy
    return tuple(Batch(jnp.asarray(X[rows], jnp.float64), T=jnp.asarray(y[rows, None],
                                                                          jnp.float64))
                 for rows in (train, test))

