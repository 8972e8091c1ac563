"""What every experiment script shares: flags, the results folder, tables, plot style.

Scripts import it as ``import _common`` (their own folder is first on
``sys.path`` when run as ``python experiments/<name>.py``).
"""

from __future__ import annotations

import argparse
import io as io_module
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

DPI = 150


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every script takes: --out, --seed, --quick."""
    lines = (doc or name).strip().splitlines()
    ap = argparse.ArgumentParser(
        prog=f"{name}.py",
        description=lines[0],
        epilog="\n".join(lines[1:]).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out", type=Path, default=Path("results") / name,
        help=f"results folder (default results/{name}/)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument(
        "--quick", action="store_true", help="tiny configuration that runs in seconds (tests)"
    )
    ap.add_argument(
        "--docs", type=Path, default=None, metavar="DIR",
        help="also write a small (256-colour) copy of the key figure into DIR, e.g. docs/",
    )
    return ap


def out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the results folder and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def docs_copy(png: str | os.PathLike[str], docs_dir: str | os.PathLike[str]) -> Path:
    """Write a 256-colour copy of ``png`` under ``docs_dir`` (same name): a fraction of the size.

    Plots use few colours, so the palette copy looks the same.
    """
    from PIL import Image

    from abc_jax import io

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    buf = io_module.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return io.atomic_write_bytes(Path(docs_dir) / Path(png).name, buf.getvalue())


def environment(dtype: Any = None) -> dict[str, Any]:
    """Where the numbers were measured: device, backend, versions, CPU count, dtype."""
    dev = jax.devices()[0]
    env = {
        "device": str(dev),
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "x64_enabled": bool(jax.config.jax_enable_x64),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine inflates timings
        env["load_average_1min"] = os.getloadavg()[0]
    if dtype is not None:
        env["dtype"] = jax.numpy.dtype(dtype).name
    return env


def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".3g"
) -> str:
    """A plain-text table: columns right-aligned, floats formatted with ``floatfmt``."""
    cells = [[str(h) for h in header]] + [[_cell(v, floatfmt) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".3g"
) -> None:
    print(format_table(header, rows, floatfmt))


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar, shown when stderr is a terminal (silent in tests and logs)."""
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kwargs)


def figure(ncols: int = 1, width: float = 5.5, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with ``ncols`` side-by-side axes in the house style (grid, tight layout)."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), layout="constrained")
    for ax in [axes] if ncols == 1 else axes:
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    return fig, axes
