"""Predict with trained params: the outputs w = C (sigmoid(A x) + B x) of every row of a file.

    python -m experiments.predict --params results/train --data X.csv
    python -m experiments.predict --params run/checkpoint/checkpoint.npz --data X.npy --out w.csv
    python -m experiments.predict --params results/train --data XY.csv --target-cols -1

--params: train.py's results folder (its params.npz, else its checkpoint), a params.npz
(abc_jax.save_params) or a checkpoint.npz (its best held-out params where evaluation ran,
else its last), read by abc_jax.load_params. --data: samples X (N, D) in .csv, .npy or .npz
(its array X), D the params' input size; --target-cols leaves out a file's target columns,
as train.py reads them. Writes the predictions (N, O), one row per row of X in order, as a
CSV with header w1..wO, written whole, to --out (default: preds.csv in the folder of
--params, beside the params that made them), and prints one line. A bad params or data
file, or a D that does not match: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

import abc_jax
from abc_jax import DataError
from abc_jax.files import write_csv
from experiments import common
from experiments.common import data as _data

DEFAULT_OUT = "preds.csv"  # in the folder of --params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(prog="python -m experiments.predict", description=head,
                                epilog=rest.strip(), formatter_class=common.HelpFormatter)
    p.add_argument("--params", type=Path, required=True, metavar="PATH",
                   help="a train.py results folder, a params.npz or a checkpoint.npz")
    p.add_argument("--data", type=Path, required=True, metavar="FILE",
                   help="samples X (N, D): .csv, .npy or .npz (its array X)")
    p.add_argument("--target-cols", type=_data.columns, metavar="COLS",
                   help="columns of --data to leave out (targets), as train.py's flag: "
                   "1-based, negative from the end")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help=f"the predictions' CSV (default: {DEFAULT_OUT} in the folder of "
                   "--params)")
    return p.parse_args(argv)


def default_out(params: Path) -> Path:
    """preds.csv in the folder of ``params`` (that folder itself when it is one)."""
    return (params if params.is_dir() else params.parent) / DEFAULT_OUT


def read(args: argparse.Namespace) -> tuple[abc_jax.Params, np.ndarray]:
    """The params and the samples X, checked against each other; one-line errors
    (``ValueError``: ``DataError`` for the data, load_params's for the params)."""
    params = abc_jax.load_params(args.params)
    X, _ = _data.read_rows(args, args.data, None, "--data")
    D = params.A.shape[1]
    if X.shape[1] != D:
        left = " after --target-cols" if args.target_cols is not None else ""
        raise DataError(f"{args.data}: the data have D = {X.shape[1]} columns{left}, the params "
                        f"in {args.params} take D = {D}")
    return params, X


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # float64 params load as trained; float32 stay
    try:
        params, X = read(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    W = np.asarray(abc_jax.predict(params, X))
    out = args.out if args.out is not None else default_out(args.params)
    write_csv(out, [f"w{i + 1}" for i in range(W.shape[1])], W.tolist())
    (H, D), O = params.A.shape, params.C.shape[0]
    print(f"predicted {W.shape[0]} rows of {args.data} with {args.params} (D = {D}, H = {H}, "
          f"O = {O}, {W.dtype}): wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
