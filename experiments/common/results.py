"""Writing an experiment's results: files, tables, figures, the docs copies, and where the numbers
were measured (``environment``)."""

from __future__ import annotations

import datetime
import functools
import io
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib
from PIL import Image
from tqdm.auto import tqdm

from abc_jax import files

matplotlib.use("Agg")

import matplotlib.pyplot as plt

plt.rcParams.update({"axes.grid": True, "grid.alpha": 0.35})  # the house style


def docs_copy(png: str | os.PathLike[str], docs_dir: str | os.PathLike[str]) -> Path:
    """Write a 256-colour copy of ``png`` (plots use few colours) under ``docs_dir``."""
    with Image.open(png) as im, io.BytesIO() as buf:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
        return files.atomic_write_bytes(Path(docs_dir) / Path(png).name, buf.getvalue())


def write_and_report(name: str, out: Path, docs: Path | None, key_figures: Sequence[str] = (),
                     **results: Any) -> dict[str, Path]:
    """``files.write_results(out, **results)``; with ``docs``, a ``docs_copy`` of each figure
    named in ``key_figures`` there and ``docs/results/<name>.json``: the run's metrics.json
    with its tables beside, ``"tables": {name: {"header": [...], "rows": [[...], ...]}}``
    (the numbers the pages are rendered from, ``experiments.render_docs``); prints one line
    naming the files. Returns file name -> path."""
    written = files.write_results(out, **results)
    if docs is not None:
        for fig in key_figures:
            docs_copy(written[f"{fig}.png"], docs)
        if "metrics.json" in written:
            metrics = json.loads(written["metrics.json"].read_text())
            tables = {k: {"header": list(h), "rows": [list(r) for r in rows]}
                      for k, (h, rows) in (results.get("tables") or {}).items()}
            files.write_json(Path(docs) / "results" / f"{name}.json",
                             metrics | ({"tables": tables} if tables else {}))
    print(f"wrote {out}/: {', '.join(written)}")
    return written


def device_label() -> str:
    """The device JAX computes on, short: ``"cpu"`` or e.g. ``"gpu NVIDIA H100 80GB HBM3"``."""
    dev = jax.devices()[0]
    kind = str(dev.device_kind)
    return dev.platform if kind.lower() == dev.platform else f"{dev.platform} {kind}"


def precisions_to_time() -> tuple[str, ...]:
    """Exact float32 and TF32 on a GPU; elsewhere every setting gives the same products."""
    return ("highest", "default") if jax.default_backend() == "gpu" else ("highest",)


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout the experiments run from (None: not a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(dtype: Any = None, precision: str | None = None) -> dict[str, Any]:
    """Where and when the numbers were measured: device, backend, versions, CPUs, load, dtype,
    precision, machine, the UTC date and the git commit."""
    dev = jax.devices()[0]
    return {"device": str(dev), "device_label": device_label(), "device_kind": dev.device_kind,
            "backend": jax.default_backend(), "device_count": jax.device_count(),
            "jax_version": jax.__version__, "python_version": platform.python_version(),
            "cpu_count": os.cpu_count(), "x64_enabled": bool(jax.config.jax_enable_x64),
            "load_average_1min": os.getloadavg()[0], "precision": precision,  # load: slower
            "dtype": None if dtype is None else jax.numpy.dtype(dtype).name,
            "machine": f"{platform.system()} {platform.machine()}",
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit()}


def format_table(header: Sequence[str], rows: Sequence[Sequence], floatfmt: str = ".3g") -> str:
    """A plain-text table: columns right-aligned, floats formatted with ``floatfmt``, None "-"."""
    cells = [[str(h) for h in header]] + [
        ["-" if v is None else format(v, floatfmt) if isinstance(v, float) else str(v)
         for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def print_table(header: Sequence[str], rows: Sequence[Sequence], floatfmt: str = ".3g") -> None:
    """Print ``format_table(header, rows, floatfmt)``."""
    print(format_table(header, rows, floatfmt))


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar, shown when stderr is a terminal (silent in tests and logs)."""
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kwargs)


def figure(ncols: int = 1, width: float = 5.5, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with ``ncols`` side-by-side axes in the house style (grid, tight layout)."""
    return plt.subplots(1, ncols, figsize=(width * ncols, height), layout="constrained")
