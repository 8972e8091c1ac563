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

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import abc_jax
from abc_jax import DataError
from abc_jax.files import write_csv
from experiments import common
from experiments.common.data import columns, read_rows

NAME = "predict"
DEFAULT_OUT = "preds.csv"  # in the folder of --params


@dataclasses.dataclass(frozen=True)
class Config:
    """The params, the samples and where their predictions go (--params, --data: required)."""

    params: Path | None = common.flag(  # noqa: RUF009
        None, "a train.py results folder, a params.npz or a checkpoint.npz", metavar="PATH",
        required=True)
    data: Path | None = common.flag(  # noqa: RUF009
        None, "samples X (N, D): .csv, .npy or .npz (its array X)", metavar="FILE", required=True)
    target_cols: tuple[int, ...] | None = common.flag(
        None, "columns of --data to leave out (targets), as train.py's flag: 1-based, negative "
        "from the end", type=columns, nargs=None, metavar="COLS")
    out: Path | None = common.flag(  # noqa: RUF009
        None, f"the predictions' CSV (default: {DEFAULT_OUT} in the folder of --params)",
        metavar="FILE")
    quick: bool = False


QUICK = Config(quick=True)  # predicting is quick already: --quick changes nothing


def default_out(params: Path) -> Path:
    """preds.csv in the folder of ``params`` (that folder itself when it is one)."""
    return (params if params.is_dir() else params.parent) / DEFAULT_OUT


def read(config: Config) -> tuple[abc_jax.Params, np.ndarray]:
    """The params and the samples X, checked against each other; one-line errors
    (``ValueError``: ``DataError`` for the data, load_params's for the params)."""
    params = abc_jax.load_params(config.params)
    X, _ = read_rows(config, config.data, None, "--data")
    D = params.A.shape[1]
    if X.shape[1] != D:
        left = " after --target-cols" if config.target_cols is not None else ""
        raise DataError(f"{config.data}: the data have D = {X.shape[1]} columns{left}, the "
                        f"params in {config.params} take D = {D}")
    return params, X


def run(config: Config) -> dict[str, Any]:
    """The predictions W (N, O) of the samples, and what made them; ``Failed`` (exit 2) for a
    bad params or data file, or a D that does not match."""
    if config.params is None or config.data is None:
        raise common.cli.Failed("predict needs --params and --data", 2)
    jax.config.update("jax_enable_x64", True)  # float64 params load as trained; float32 stay
    try:
        params, X = read(config)
    except (ValueError, TypeError) as e:
        raise common.cli.Failed(str(e), 2) from None
    (H, D), O = params.A.shape, params.C.shape[0]
    return {"W": np.asarray(abc_jax.predict(params, X)), "params": config.params,
            "data": config.data, "shape": f"D = {D}, H = {H}, O = {O}"}


def report(res: dict[str, Any], out: Path | None, docs: Any = None) -> Path:
    """Write the predictions' CSV (header w1..wO) to ``out`` (None: beside the params) and
    print one line; the path written."""
    W, out = res["W"], default_out(res["params"]) if out is None else Path(out)
    write_csv(out, [f"w{i + 1}" for i in range(W.shape[1])], W.tolist())
    print(f"predicted {W.shape[0]} rows of {res['data']} with {res['params']} ({res['shape']}, "
          f"{W.dtype}): wrote {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv, docs=False)


if __name__ == "__main__":
    sys.exit(main())
