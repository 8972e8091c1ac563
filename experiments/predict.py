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
--params, beside the params that made them), and prints one line.

Preprocessing: where the params were trained on preprocessed data (train.py --standardize,
or abc_jax.save_params(..., preprocessing=)), it is read back with them
(abc_jax.load_preprocessing: the .npz, or a run folder's params.npz, else its
preprocessing.npz), X is given in its own units and the predictions come out in the
targets' units. A run folder whose config.json says it was preprocessed ("standardize" or
"bias" true) but that holds no preprocessing is refused.

A run that diverged (status "diverged" in its metrics.json) saved no trained params: it is
refused with one line naming the epoch, unless --allow-diverged asks for its checkpoint's
params anyway. Predictions that are not all finite are never written. A bad params or data
file, a D that does not match, a diverged run or non-finite predictions: one line on
stderr, exit 2."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import abc_jax
from abc_jax import DataError
from abc_jax.files import run_status, write_csv
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
    allow_diverged: bool = common.flag(
        False, "predict with a diverged run's checkpoint params anyway (the last ones its "
        "loop kept, or its best held-out ones where evaluation ran)")
    quick: bool = False


QUICK = Config(quick=True)  # predicting is quick already: --quick changes nothing


def default_out(params: Path) -> Path:
    """preds.csv in the folder of ``params`` (that folder itself when it is one)."""
    return (params if params.is_dir() else params.parent) / DEFAULT_OUT


def refuse_diverged(config: Config) -> None:
    """``Failed`` (exit 2) for a run folder whose run diverged, unless --allow-diverged."""
    status = run_status(config.params) if config.params.is_dir() else None
    if status and status["status"] == "diverged" and not config.allow_diverged:
        raise common.cli.Failed(
            f"{config.params}: this run diverged (its loss was not finite at epoch "
            f"{status.get('diverged_at_epoch', '?')}), so it saved no trained params: train it "
            "again as its metrics.json's error says (a smaller --lr; --standardize for columns "
            "of unequal scales), or add --allow-diverged to predict with its checkpoint's "
            "params anyway", 2)


def preprocessing(path: Path) -> abc_jax.Preprocessing | None:
    """The preprocessing stored with the params at ``path`` (None: none); a DataError for a
    run folder whose config.json records one that the folder does not hold."""
    prep = abc_jax.load_preprocessing(path)
    config = path / "config.json"
    if prep is None and path.is_dir() and config.is_file():
        try:
            recorded = json.loads(config.read_text())
        except ValueError:
            recorded = {}
        used = [k for k in ("standardize", "bias") if recorded.get(k)]
        if used:
            raise DataError(f"{path}: its config.json says the run was trained on preprocessed "
                            f"data ({', '.join(used)}) but the folder holds no preprocessing "
                            "(params.npz or preprocessing.npz with it): its predictions would "
                            "be in the wrong units")
    return prep


def read(config: Config) -> tuple[abc_jax.Params, abc_jax.Preprocessing | None, np.ndarray]:
    """The params, their preprocessing (or None) and the samples X, checked against each other;
    one-line errors (``ValueError``: ``DataError`` for the data, load_params's for the params)."""
    params = abc_jax.load_params(config.params, allow_diverged=config.allow_diverged)
    prep = preprocessing(config.params)
    X, _ = read_rows(config, config.data, None, "--data")
    D = params.A.shape[1] if prep is None else prep.x_mean.shape[0]
    if X.shape[1] != D:
        left = " after --target-cols" if config.target_cols is not None else ""
        raise DataError(f"{config.data}: the data have D = {X.shape[1]} columns{left}, the "
                        f"params in {config.params} take D = {D}")
    return params, prep, X


def run(config: Config) -> dict[str, Any]:
    """The predictions W (N, O) of the samples, and what made them; ``Failed`` (exit 2) for a
    bad params or data file, a D that does not match, a diverged run (without
    --allow-diverged) or predictions that are not all finite."""
    if config.params is None or config.data is None:
        raise common.cli.Failed("predict needs --params and --data", 2)
    jax.config.update("jax_enable_x64", True)  # float64 params load as trained; float32 stay
    refuse_diverged(config)
    try:
        params, prep, X = read(config)
    except (ValueError, TypeError) as e:
        raise common.cli.Failed(str(e), 2) from None
    (H, D), O = params.A.shape, params.C.shape[0]
    W = np.asarray(abc_jax.predict(params, X, preprocessing=prep))
    bad = ~np.isfinite(W).all(axis=1)
    if bad.any():
        raise common.cli.Failed(
            f"{config.params}: the predictions of {int(bad.sum())} of {len(W)} rows of "
            f"{config.data} are not finite (first: row {int(np.argmax(bad)) + 1}), so none "
            f"were written: these params overflow {W.dtype} on these data", 2)
    shape = f"D = {D}, H = {H}, O = {O}" + ("" if prep is None else ", its preprocessing")
    return {"W": W, "params": config.params, "data": config.data, "shape": shape}


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
