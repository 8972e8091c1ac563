"""Results on disk, each file written whole: temporary file in the same folder, then rename.

A crash never leaves a half-written file: readers see the old one or the new
one (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``.

    The file gets the usual permissions (0o666 less the umask), not mkstemp's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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
        return str(obj)  # JSON has no NaN/inf
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (arrays become lists, NaN/inf strings)."""
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


def write_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write arrays to an uncompressed .npz."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


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
