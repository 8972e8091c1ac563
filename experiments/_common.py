"""What every experiment script shares: flags, the results folder, tables, plot style,
where a number was measured, the one timing helper, compile time, the optimizers.

Scripts import it as ``import _common`` (their own folder is first on
``sys.path`` when run as ``python experiments/<name>.py``).

Timing (``time_interleaved``): every benchmark times its variants the same way, waited for
on the device (``jax.block_until_ready``), each variant's first call (trace + compile + run)
timed apart, a warm-up after all compiles, then rounds that run every variant in turn, so a
drift in the machine's speed hits all of them alike; the median per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import matplotlib
import optax

from abc_jax import files
from abc_jax.validation import PRECISIONS

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

DPI = 150


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help names it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every script takes: --out, --seed, --quick, --docs."""
    lines = (doc or name).strip().splitlines()
    ap = argparse.ArgumentParser(prog=f"{name}.py", description=lines[0],
                                 epilog="\n".join(lines[1:]).strip() or None,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results") / name, help="results folder")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--quick", action="store_true",
                    help="tiny configuration that runs in seconds (tests)")
    ap.add_argument("--docs", type=Path, default=None, metavar="DIR",
                    help="also write a small (256-colour) copy of the key figure into DIR")
    return ap


def add_precision_flag(ap: argparse.ArgumentParser) -> None:
    """``--precision``: the matmul precision of the JAX computations."""
    ap.add_argument("--precision", choices=PRECISIONS, default="highest",
                    help="matmul precision of the JAX computations ('highest': exact float32 "
                         "on every device; 'default' lets a GPU use TF32)")


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

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return files.atomic_write_bytes(Path(docs_dir) / Path(png).name, buf.getvalue())


def config_of(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The parsed flags as a JSON-ready dict (paths as strings), with ``extra`` on top."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | extra


# -- where a number was measured -------------------------------------------------------

CPU_PRECISION_NOTE = ("on a CPU every matmul precision computes the same float32 products, "
                      "so only 'highest' is timed")


def device_label() -> str:
    """The device JAX computes on, short: ``"cpu"`` or e.g. ``"gpu NVIDIA H100 80GB HBM3"``."""
    dev = jax.devices()[0]
    kind = str(dev.device_kind)
    return dev.platform if kind.lower() == dev.platform else f"{dev.platform} {kind}"


def precisions_to_time() -> tuple[str, ...]:
    """``("highest", "default")`` on a GPU (exact float32 and TF32); ``("highest",)`` elsewhere,
    where the settings compute the same products (``CPU_PRECISION_NOTE``)."""
    return ("highest", "default") if jax.default_backend() == "gpu" else ("highest",)


def environment(dtype: Any = None, precision: str | None = None) -> dict[str, Any]:
    """Where the numbers were measured: device, backend, versions, CPU count, dtype, precision."""
    dev = jax.devices()[0]
    env = {"device": str(dev), "device_label": device_label(), "device_kind": dev.device_kind,
           "backend": jax.default_backend(), "device_count": jax.device_count(),
           "jax_version": jax.__version__, "python_version": platform.python_version(),
           "cpu_count": os.cpu_count(), "x64_enabled": bool(jax.config.jax_enable_x64)}
    if hasattr(os, "getloadavg"):  # other work on the machine inflates timings
        env["load_average_1min"] = os.getloadavg()[0]
    if dtype is not None:
        env["dtype"] = jax.numpy.dtype(dtype).name
    if precision is not None:
        env["precision"] = precision
    return env


# -- timing ----------------------------------------------------------------------------


def wait(out: Any) -> Any:
    """Wait until every JAX array in ``out`` is computed (plain values pass), and return it."""
    jax.block_until_ready(jax.tree.leaves(out))
    return out


@dataclass(frozen=True)
class Timing:
    """One variant's result from ``time_interleaved``; times in seconds per call."""

    median_s: float  # median over the rounds: the number to report
    min_s: float
    first_s: float  # the first call alone: trace, compile and one run
    rounds: int  # timed samples
    calls_per_round: int  # calls per sample (fast calls are looped to be long enough to time)
    output: Any = field(default=None, repr=False, compare=False)  # the first call's result

    @property
    def compile_s(self) -> float:
        """The first call minus a warm one: trace and compile time (about 0 for plain Python)."""
        return max(self.first_s - self.median_s, 0.0)

    def fields(self) -> dict[str, Any]:
        """The numbers, for a result row."""
        return {"median_s": self.median_s, "min_s": self.min_s, "first_call_s": self.first_s,
                "compile_s": self.compile_s, "rounds": self.rounds,
                "calls_per_round": self.calls_per_round}


def _calls_per_round(fn: Callable[[], Any], first_s: float, warmup: int, min_time: float,
                     rounds: int) -> tuple[int, float]:
    """Warm ``fn`` up (at least ``warmup`` calls and about min_time / 4 s); return (calls per
    round lasting about min_time / rounds, seconds per call)."""
    calls, t0 = 0, time.perf_counter()
    while warmup and (calls < warmup or time.perf_counter() - t0 < min_time / 4):
        wait(fn())
        calls += 1
    once = max((time.perf_counter() - t0) / calls if calls else first_s, 1e-9)
    return max(1, int(min_time / rounds / once)), once


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 7,
                     min_time: float = 0.2, warmup: int = 1,
                     max_time: float | None = None) -> dict[str, Timing]:
    """Time zero-argument calls against each other; the median per call of each.

    1. Each variant's first call (trace + compile + one run) is timed alone: ``first_s``.
    2. After all have compiled, each is warmed up: at least ``warmup`` calls and about
       ``min_time / 4`` seconds (``warmup=0``: none, for code that is not compiled).
    3. ``rounds`` rounds, each running every variant in turn: a loop of calls lasting about
       ``min_time / rounds`` seconds (at least one), waited for at its end, gives one sample
       of seconds per call; so a drift in the machine's speed hits every variant alike.
       ``max_time`` caps the seconds of one variant's rounds (at least one round).
    """
    if rounds < 1 or warmup < 0 or min_time < 0:
        raise ValueError(f"need rounds >= 1, warmup >= 0, min_time >= 0; got {rounds}, "
                         f"{warmup}, {min_time}")
    first, outputs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outputs[name] = wait(fn())
        first[name] = time.perf_counter() - t0
    inner, n_rounds = {}, {}
    for name, fn in fns.items():
        inner[name], once = _calls_per_round(fn, first[name], warmup, min_time, rounds)
        n_rounds[name] = rounds if max_time is None else max(
            1, min(rounds, int(max_time / (inner[name] * once))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if r < n_rounds[name]:
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    out = fn()
                wait(out)
                samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: Timing(statistics.median(s), min(s), first[name], len(s), inner[name],
                         outputs[name]) for name, s in samples.items()}


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",  # lowering
                   "/jax/core/compile/backend_compile_duration",  # XLA
                   "/jax/compilation_cache/cache_retrieval_time_sec")  # or its cache


@contextlib.contextmanager
def compile_clock() -> Iterator[list[float]]:
    """Seconds JAX spends lowering and compiling (or loading from its cache) inside the
    ``with`` block, from ``jax.monitoring``'s duration events: ``clock[0]`` after it.

    Tracing is left out: its events nest (a jit traced inside another), so they would count
    twice.
    """
    clock = [0.0]

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            clock[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield clock
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# -- optimizers ------------------------------------------------------------------------

# name -> (label, lr -> transformation); None: train's hand-rolled p <- p - lr g
OPTIMIZERS: dict[str, tuple[str, Callable[[float], Any]]] = {
    "gd": ("hand-rolled GD", lambda lr: None),
    "sgd": ("optax.sgd", optax.sgd),
    "momentum": ("optax.sgd momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9)),
    "adam": ("optax.adam", optax.adam),
}


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation | None:
    """``OPTIMIZERS[name]`` at learning rate ``lr``: None for "gd" (train's own rule)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name][1](lr)


# -- output ----------------------------------------------------------------------------


def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    return format(v, floatfmt) if isinstance(v, float) else str(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                 floatfmt: str = ".3g") -> str:
    """A plain-text table: columns right-aligned, floats formatted with ``floatfmt``."""
    cells = [[str(h) for h in header]] + [[_cell(v, floatfmt) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                floatfmt: str = ".3g") -> None:
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
