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


def save_params(path: str | os.PathLike[str], params: Any) -> Path:
    """Write ``Params(A, B, C)`` to an .npz with arrays A, B, C (what train.py writes).

    A dtype NumPy cannot store (bfloat16) is written as float32, exactly, with its name
    in an array ``dtype``, so ``load_params`` gives it back as it was.
    """
    params = edge.params(edge.params_input(params))
    dtype = np.dtype(params.A.dtype)
    stored = {k: np.asarray(a, np.float32 if dtype.kind == "V" or dtype.name == "bfloat16"
                            else dtype) for k, a in zip("ABC", params, strict=True)}
    return write_npz(path, **stored, dtype=np.array(dtype.name))


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


def load_params(path: str | os.PathLike[str]) -> Params:
    """``Params(A (H, D), B (H, D), C (O, H))`` from what ``save_params`` or train.py wrote.

    ``path``: an .npz of ``save_params`` (train.py's params.npz), a training checkpoint
    (``checkpoint.npz``: its best params where evaluation ran, else its last), or a run
    folder holding params.npz or checkpoint/checkpoint.npz.

    Raises ValueError naming the file if it is missing, unreadable or not an array file,
    lacks A, B or C, or holds shapes that do not chain; TypeError for a non-floating
    dtype (or float64 without x64).
    """
    path = Path(path)
    if path.is_dir():
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
    return edge.params(params, f"the params in {path}")
