"""What experiment scripts share: flags, results, tables, plots, environment, timing, optimizers."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import matplotlib
import optax
from PIL import Image
from tqdm.auto import tqdm

from abc_jax import files
from abc_jax.validation import PRECISIONS

matplotlib.use("Agg")

import matplotlib.pyplot as plt

plt.rcParams.update({"axes.grid": True, "grid.alpha": 0.35})  # the house style


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help names it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        plain = "(default" in text or action.default is None or action.default is False
        return text if plain else super()._get_help_string(action)


def parser(name: str, doc: str | None, precision: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser with --out, --seed, --quick, --docs (and --precision if ``precision``)."""
    head, _, rest = (doc or name).strip().partition("\n")
    ap = argparse.ArgumentParser(prog=f"{name}.py", description=head, epilog=rest.strip() or None,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results") / name, help="results folder")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--quick", action="store_true", help="tiny configuration that runs in seconds")
    ap.add_argument("--docs", type=Path, metavar="DIR", help="a 256-colour copy of the key figure")
    if precision:
        ap.add_argument("--precision", choices=PRECISIONS, default="highest", help="JAX matmul "
                        "precision ('highest': exact float32; 'default' lets a GPU use TF32)")
    return ap


def out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the results folder and return it."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def docs_copy(png: str | os.PathLike[str], docs_dir: str | os.PathLike[str]) -> Path:
    """Write a 256-colour copy of ``png`` (plots use few colours) under ``docs_dir``."""
    with Image.open(png) as im, io.BytesIO() as buf:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
        return files.atomic_write_bytes(Path(docs_dir) / Path(png).name, buf.getvalue())


def device_label() -> str:
    """The device JAX computes on, short: ``"cpu"`` or e.g. ``"gpu NVIDIA H100 80GB HBM3"``."""
    dev = jax.devices()[0]
    kind = str(dev.device_kind)
    return dev.platform if kind.lower() == dev.platform else f"{dev.platform} {kind}"


def precisions_to_time() -> tuple[str, ...]:
    """Exact float32 and TF32 on a GPU; elsewhere every setting gives the same products."""
    return ("highest", "default") if jax.default_backend() == "gpu" else ("highest",)


def environment(dtype: Any = None, precision: str | None = None) -> dict[str, Any]:
    """Where the numbers were measured: device, backend, versions, CPUs, load, dtype, precision."""
    dev = jax.devices()[0]
    return {"device": str(dev), "device_label": device_label(), "device_kind": dev.device_kind,
            "backend": jax.default_backend(), "device_count": jax.device_count(),
            "jax_version": jax.__version__, "python_version": platform.python_version(),
            "cpu_count": os.cpu_count(), "x64_enabled": bool(jax.config.jax_enable_x64),
            "load_average_1min": os.getloadavg()[0], "precision": precision,  # load: slower
            "dtype": None if dtype is None else jax.numpy.dtype(dtype).name}


class Timing(NamedTuple):
    """One variant's result from ``time_interleaved``; times in seconds per call."""
    median_s: float  # median over the rounds: the number to report
    min_s: float
    first_call_s: float  # the first call alone: trace, compile and one run
    rounds: int  # timed samples
    calls_per_round: int  # calls per sample (fast calls are looped to be long enough to time)
    output: Any = None  # the first call's result
    compile_s: float = 0.0  # first_call_s - median_s, >= 0: trace and compile time (~0 for Python)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 7,
                     min_time: float = 0.2, warmup: int = 1,
                     max_time: float | None = None) -> dict[str, Timing]:
    """The median seconds per call of each zero-argument call, each waited for on the device.
    First calls (trace + compile + run) are timed alone (``first_call_s``); after all compiled, a
    warm-up (>= ``warmup`` calls and ~``min_time / 4`` s); then ``rounds`` rounds run each in
    turn (a drift in speed hits all alike), a loop of >= 1 calls lasting ~``min_time / rounds``
    s per sample. ``max_time`` caps a variant's seconds of rounds (>= 1 round)."""
    if rounds < 1 or warmup < 0 or min_time < 0:
        raise ValueError(f"need rounds >= 1, warmup >= 0, min_time >= 0; got {rounds=}, "
                         f"{warmup=}, {min_time=}")
    first, plan, samples = {}, {}, {n: [] for n in fns}  # (output, s); (calls, rounds); [s]
    for name, fn in fns.items():
        t0 = time.perf_counter()
        first[name] = jax.block_until_ready(fn()), time.perf_counter() - t0
    for name, fn in fns.items():
        calls, t0 = 0, time.perf_counter()
        while warmup and (calls < warmup or time.perf_counter() - t0 < min_time / 4):
            jax.block_until_ready(fn())
            calls += 1
        once = max((time.perf_counter() - t0) / calls if calls else first[name][1], 1e-9)
        inner = max(1, int(min_time / rounds / once))
        cap = rounds if max_time is None else max(1, int(max_time / (inner * once)))
        plan[name] = inner, min(rounds, cap)
    for name, fn in [(n, f) for r in range(rounds) for n, f in fns.items() if r < plan[n][1]]:
        t0 = time.perf_counter()  # round r: each variant with rounds left, in turn
        for _ in range(plan[name][0]):
            out = fn()
        jax.block_until_ready(out)
        samples[name].append((time.perf_counter() - t0) / plan[name][0])
    return {name: Timing(statistics.median(s), min(s), first[name][1], len(s), plan[name][0],
                         first[name][0], max(first[name][1] - statistics.median(s), 0.0))
            for name, s in samples.items()}


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",  # lowering
                   "/jax/core/compile/backend_compile_duration",  # XLA
                   "/jax/compilation_cache/cache_retrieval_time_sec")  # or its cache


@contextlib.contextmanager
def compile_clock() -> Iterator[list[float]]:
    """Seconds JAX lowers and compiles (or loads from its cache) in the ``with`` block, as
    ``clock[0]``; not tracing, whose events nest (a jit in a jit) and would count twice."""
    clock = [0.0]

    def listen(event: str, seconds: float, **_: Any) -> None:
        clock[0] += seconds * (event in _COMPILE_EVENTS)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield clock
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


OPTIMIZERS: dict[str, tuple[str, Callable[[float], Any]]] = {  # name -> (label, lr -> rule)
    "gd": ("hand-rolled GD", lambda lr: None), "sgd": ("optax.sgd", optax.sgd),  # None: train's
    "momentum": ("optax.sgd momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9)),
    "adam": ("optax.adam", optax.adam)}


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation | None:
    """``OPTIMIZERS[name]`` at learning rate ``lr``: None for "gd" (train's own rule)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name][1](lr)


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
