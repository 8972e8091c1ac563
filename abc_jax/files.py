"""Results on disk, each file written whole: temporary file in the same folder, then rename.

A crash never leaves a half-written file: readers see the old one or the new
one (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from abc_jax import checkpoint, edge
from abc_jax.atomic import atomic_write_bytes, write_npz
from abc_jax.core.model import Params
from abc_jax.preprocessing import Preprocessing

PREFIX = "preprocessing_"  # the Preprocessing's arrays in an .npz: preprocessing_x_mean, ...
PREPROCESSING_FILE = "preprocessing.npz"  # a run folder's preprocessing beside its params

__all__ = ["atomic_write_bytes", "load_params", "save_figure", "save_params", "write_csv",
           "write_json", "write_npz", "write_results"]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # NumPy / JAX arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN/inf: null, as pandas and the json of most tools write
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (arrays become lists, NaN/inf null)."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def write_csv(path: str | os.PathLike[str], header: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV table with a header row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_jsonable(v) for v in row])
    return atomic_write_bytes(path, buf.getvalue().encode())


def save_figure(path: str | os.PathLike[str], fig: Any, *, dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG (150 dpi) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_results(out_dir: str | os.PathLike[str], *, config: Any = None, metrics: Any = None,
                  tables: Mapping[str, tuple[Sequence[str], Iterable[Sequence[Any]]]] | None = None,
                  figures: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write an experiment's results into ``out_dir``, each file whole.

    ``config.json`` and ``metrics.json`` (if given), one ``<name>.csv`` per
    entry of ``tables`` (``name -> (header, rows)``) and one ``<name>.png``
    per matplotlib figure in ``figures``. Returns ``{file name: path}``.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for name, obj in (("config", config), ("metrics", metrics)):
        if obj is not None:
            written[f"{name}.json"] = write_json(out / f"{name}.json", obj)
    for name, (header, rows) in (tables or {}).items():
        written[f"{name}.csv"] = write_csv(out / f"{name}.csv", header, rows)
    for name, fig in (figures or {}).items():
        written[f"{name}.png"] = save_figure(out / f"{name}.png", fig)
    return written


def save_params(path: str | os.PathLike[str], params: Any, *,
                preprocessing: Preprocessing | None = None) -> Path:
    """Write ``Params(A, B, C)`` to an .npz with arrays A, B, C (what train.py writes).

    A dtype NumPy cannot store (bfloat16) is written as float32, exactly, with its name
    in an array ``dtype``, so ``load_params`` gives it back as it was. ``preprocessing``:
    the ``Preprocessing`` the params were trained with, stored in the same file (arrays
    ``preprocessing_<field>``; ``load_preprocessing`` reads it back).
    """
    params = edge.params(edge.params_input(params))
    dtype = np.dtype(params.A.dtype)
    stored = {k: np.asarray(a, np.float32 if dtype.kind == "V" or dtype.name == "bfloat16"
                            else dtype) for k, a in zip("ABC", params, strict=True)}
    extra = {} if preprocessing is None else _preprocessing_arrays(preprocessing)
    if preprocessing is not None and params.A.shape[1] != (
            preprocessing.x_mean.shape[0] + preprocessing.constant.shape[0]):
        raise ValueError(f"preprocessing gives {preprocessing.x_mean.shape[0]} + "
                         f"{preprocessing.constant.shape[0]} input columns and the params take "
                         f"D = {params.A.shape[1]}: save the preprocessing they were trained with")
    return write_npz(path, **stored, dtype=np.array(dtype.name), **extra)


def _preprocessing_arrays(prep: Any) -> dict[str, np.ndarray]:
    if not isinstance(prep, Preprocessing):
        raise TypeError("preprocessing must be an abc_jax.Preprocessing (fit_preprocessing) or "
                        f"None, got {type(prep).__name__}")
    return {f"{PREFIX}{f}": np.asarray(a) for f, a in zip(prep._fields, prep, strict=True)
            if a is not None}


def save_preprocessing(path: str | os.PathLike[str], preprocessing: Preprocessing) -> Path:
    """Write a ``Preprocessing`` alone to an .npz (as ``save_params`` stores it beside A, B, C):
    for a run that keeps it apart from its params (train.py's preprocessing.npz)."""
    return write_npz(path, **_preprocessing_arrays(preprocessing))


def load_preprocessing(path: str | os.PathLike[str]) -> Preprocessing | None:
    """The ``Preprocessing`` stored with params (``save_params(..., preprocessing=)``) or alone
    (``save_preprocessing``); None if the file holds none (params saved without it).

    ``path``: an .npz, or a run folder: its params.npz where there is one (the params and
    their preprocessing together), else its preprocessing.npz (a run that saved no params).
    Raises ValueError for an unreadable file or a partial record.
    """
    path = file = Path(path)
    if path.is_dir():
        file = path / "params.npz"
        file = file if file.is_file() else path / PREPROCESSING_FILE
        if not file.is_file():
            return None
    elif not path.is_file():
        raise ValueError(f"cannot read preprocessing from {path}: no such file or folder")
    arrays = {k[len(PREFIX):]: a for k, a in _read_npz(file).items() if k.startswith(PREFIX)}
    if not arrays:
        return None
    fields = Preprocessing._fields
    missing = [f for f in ("x_mean", "x_scale", "constant") if f not in arrays]
    if missing or ("t_mean" in arrays) != ("t_scale" in arrays) or set(arrays) - set(fields):
        raise ValueError(f"{file} holds a partial preprocessing record: arrays "
                         f"{sorted(PREFIX + k for k in arrays)}; a whole one has "
                         f"{[PREFIX + f for f in fields]} (t_mean, t_scale: both or neither)")
    return Preprocessing(**{f: jnp.asarray(arrays[f]) for f in fields if f in arrays})


def run_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """How a train.py run ended, from its folder's metrics.json: ``{"status": "finished"}`` or
    ``{"status": "diverged", "diverged_at_epoch": e}``; None if ``path`` is not a folder with
    a readable metrics.json that records a status."""
    file = Path(path) / "metrics.json"
    try:
        metrics = json.loads(file.read_text()) if Path(path).is_dir() else None
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("status"), str):
        return None
    return {k: metrics[k] for k in ("status", "diverged_at_epoch") if k in metrics}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError(f"{path} is a .npy array, not an .npz archive of A, B and C")
            return {k: f[k] for k in f.files}
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read params from {path}: {e}") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{path} is not an array file (.npz): cannot read params from "
                             "it") from None
        raise ValueError(f"cannot read params from {path}: {e}") from None


def load_params(path: str | os.PathLike[str], *, allow_diverged: bool = False) -> Params:
    """``Params(A (H, D), B (H, D), C (O, H))`` from what ``save_params`` or train.py wrote.

    ``path``: an .npz of ``save_params`` (train.py's params.npz), a training checkpoint
    (``checkpoint.npz``: the params its run returns, the best held-out ones with patience,
    else the last finite ones; ``checkpoint.model_params``), or a run folder holding
    params.npz or checkpoint/checkpoint.npz. A run folder whose metrics.json says the run
    diverged (``run_status``) is refused: it saved no trained params. ``allow_diverged=True``
    loads its checkpoint's params anyway (those before its last finite epoch's update).

    Raises ValueError naming the file if it is missing, unreadable or not an array file,
    lacks A, B or C, or holds shapes that do not chain, or the run diverged; TypeError for
    a non-floating dtype (or float64 without x64).
    """
    path = Path(path)
    diverged = False
    if path.is_dir():
        status = run_status(path) or {}
        diverged = status.get("status") == "diverged"
        if diverged and not allow_diverged:
            raise ValueError(
                f"{path} is a run that diverged (its loss was not finite at epoch "
                f"{status.get('diverged_at_epoch', '?')}), so it saved no trained params: "
                "train it again (a smaller learning rate; standardised data, see "
                "fit_preprocessing), or pass allow_diverged=True to load its checkpoint's "
                "last finite params anyway")
        found = [p for p in (path / "params.npz", path / "checkpoint" / "checkpoint.npz",
                             path / "checkpoint.npz") if p.is_file()]
        if not found:
            raise ValueError(f"{path} is a folder without params.npz or a checkpoint "
                             "(checkpoint/checkpoint.npz): not a training run's folder")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"cannot read params from {path}: no such file")
    arrays = _read_npz(path)
    if "settings" in arrays and "state_0" in arrays:
        arrays = checkpoint.model_params(arrays, path)
    missing = [k for k in "ABC" if k not in arrays]
    if missing:
        raise ValueError(f"{path} must hold arrays A, B and C (an .npz of save_params), "
                         f"missing {', '.join(missing)}; it has {sorted(arrays)}")
    dtype = str(arrays["dtype"]) if "dtype" in arrays else None
    params = Params(*(jnp.asarray(arrays[k], dtype) for k in "ABC"))
    if diverged and not all(np.isfinite(arrays[k]).all() for k in "ABC"):
        raise ValueError(f"{path}: the diverged run's checkpoint holds non-finite params; "
                         "there are no finite params to load: train it again")
    return edge.params(params, f"the params in {path}")
