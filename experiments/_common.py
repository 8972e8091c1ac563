"""What experiment scripts share: flags, problems, results, tables, plots, environment, timing
(one helper, and the gradient methods timed against each other), optimizers."""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import homework
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from PIL import Image
from tqdm.auto import tqdm

import abc_jax
from abc_jax import files
from abc_jax.edge import PRECISIONS

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


def problem(key: jax.Array, n: int, in_dim: int, hidden_dim: int | None = None,
            out_dim: int | None = None, *, dtype: Any = jnp.float32) -> tuple[abc_jax.Params, Any]:
    """``init_params(kp, in_dim, hidden_dim, out_dim)`` and X (n, in_dim) ~ Normal(0, 1), where
    ``kp, kx = split(key)``."""
    kp, kx = jax.random.split(key)
    params = abc_jax.init_params(kp, in_dim, hidden_dim, out_dim, dtype=dtype)
    return params, jax.random.normal(kx, (n, in_dim), dtype)


def docs_copy(png: str | os.PathLike[str], docs_dir: str | os.PathLike[str]) -> Path:
    """Write a 256-colour copy of ``png`` (plots use few colours) under ``docs_dir``."""
    with Image.open(png) as im, io.BytesIO() as buf:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
        return files.atomic_write_bytes(Path(docs_dir) / Path(png).name, buf.getvalue())


def write_and_report(out: Path, docs: Path | None, key_figures: Sequence[str] = (),
                     **results: Any) -> dict[str, Path]:
    """``files.write_results(out, **results)``; with ``docs``, a ``docs_copy`` of each figure
    named in ``key_figures`` there; prints one line naming the files. Returns name -> path."""
    written = files.write_results(out, **results)
    for name in key_figures if docs is not None else ():
        docs_copy(written[f"{name}.png"], docs)
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


# The gradient methods timed against each other (bench_gradients, reproduce_seed): kind "jax"
# (jitted; given params, X, precision) or "python" (given lists); time ~ P^exponent.
Method = collections.namedtuple("Method", "label kind exponent fn")
GRADIENT_METHODS = {
    "batch_grad": Method("batch_grad (manual)", "jax", 1, abc_jax.batch_grad),
    "jax_grad": Method("jax.grad (reverse)", "jax", 1, abc_jax.oracle_grad),
    "jvp_grad": Method("jvp_grad (manual forward)", "jax", 2, abc_jax.jvp_grad),
    "jacfwd": Method("jax.jacfwd (forward)", "jax", 2, lambda p, X, precision: jax.jacfwd(
        lambda q: abc_jax.batch_loss(q, X, precision=precision))(p)),
    "fd_grad": Method("fd_grad (finite diff.)", "jax", 2, abc_jax.fd_grad),
    "python_backprop": Method("Python backprop", "python", 1,
                              lambda *lists: homework.py_loss_and_grad(*lists)[1]),
    "python_fd": Method("Python finite diff.", "python", 2, homework.py_fd_grad)}
TIMING_FIELDS = ["median_s", "min_s", "first_call_s", "compile_s", "rounds", "calls_per_round"]


def rel_error(grads: Any, reference: abc_jax.Params) -> float:
    """max |grads - reference| / max |reference| over all three matrices."""
    g, r = (np.concatenate([np.asarray(a, np.float64).ravel() for a in x])
            for x in (grads, reference))
    return float(np.max(np.abs(g - r)) / np.max(np.abs(r)))


def _time_gradients_at(K: int, n: int, todo: Sequence[str], *, dtype: Any, precision: str,
                       seed: int, budget_s: float, min_time: float,
                       rounds: int) -> tuple[dict, abc_jax.Params]:
    """(method -> Timing, jax.grad in float64 on the same rounded inputs) at one K. JAX: a jit of
    each public function (one dispatch cost); Python: the lists, no warm-up, <= ``budget_s`` s."""
    params, X = problem(jax.random.fold_in(jax.random.key(seed), K), n, K, dtype=dtype)
    ref = abc_jax.oracle_grad(*jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, X)),
                              precision="highest")
    lists, times = homework.to_lists(params, X), {}
    for kind, extra in (("jax", {}), ("python", {"warmup": 0, "max_time": budget_s})):
        fns = {m: functools.partial(jax.jit(functools.partial(M.fn, precision=precision)),
                                    params, X) if kind == "jax" else functools.partial(M.fn, *lists)
               for m, M in GRADIENT_METHODS.items() if m in todo and M.kind == kind}
        times |= time_interleaved(fns, rounds=rounds, min_time=min_time, **extra)
    return times, ref


def time_gradients(ks: Sequence[int], n: int, methods: Sequence[str] = tuple(GRADIENT_METHODS),
                   *, dtype: Any = jnp.float32, precision: str = "highest", seed: int = 0,
                   budget_s: float = 2.0, min_time: float = 0.2, rounds: int = 5,
                   mem_limit: float = 1 << 30) -> list[dict[str, Any]]:
    """One row per (K, method) of ``GRADIENT_METHODS``, skipped ones with a ``status`` saying why:
    a call took over ``budget_s``, or ``t * (P_new / P_old) ** exponent`` from the last K is over
    it, or a forward mode needs over ``mem_limit`` bytes (never batch_grad, the reference of
    each time's ``ratio_to_batch_grad`` at its K); rows name device and precision (None for
    Python)."""
    if unknown := set(methods) - set(GRADIENT_METHODS):
        raise ValueError(f"method must be one of {sorted(GRADIENT_METHODS)}, got {sorted(unknown)}")
    last, stopped, rows = {}, {}, []  # last: method -> (P, median s); stopped: method -> why
    for K in progress(ks, desc="bench", unit="K"):
        P = 3 * K * K  # 2HD + OH with D = H = O = K
        predicted = {m: t * (P / P0) ** GRADIENT_METHODS[m].exponent
                     for m, (P0, t) in last.items()}
        mem = 2 * P * n * 3 * K * jnp.dtype(dtype).itemsize  # P tangents of (N, 2H + O), twice
        status = {m: stopped.get(m) or (
            f"skipped: predicted {predicted[m]:.3g} s > budget {budget_s:g} s"
            if predicted.get(m, 0.0) > budget_s else f"skipped: memory ~{mem / 2**30:.2g} GiB"
            if m in ("jacfwd", "jvp_grad") and mem > mem_limit else None)
            for m in methods if m != "batch_grad"} | {"batch_grad": None}
        times, ref = _time_gradients_at(K, n, [m for m in methods if status.get(m) is None],
                                        dtype=dtype, precision=precision, seed=seed,
                                        budget_s=budget_s, min_time=min_time, rounds=rounds)
        for m in methods:
            kind, t = GRADIENT_METHODS[m].kind, times.get(m)
            rows.append(row := {
                "K": K, "P": P, "N": n, "method": m, "kind": kind,
                "device": device_label() if kind == "jax" else "host cpu (Python)",
                "dtype": jnp.dtype(dtype).name if kind == "jax" else "float64",
                "precision": precision if kind == "jax" else None, "median_s": None,
                "status": status[m]})
            if t is None:
                continue
            row |= {"status": "ok", **{f: getattr(t, f) for f in TIMING_FIELDS},
                    "compile_s": t.compile_s if kind == "jax" else None,
                    "rel_err_vs_float64": rel_error(t.output, ref)}
            last[m] = (P, t.median_s)
            slowest = t.median_s if kind == "jax" else max(t.median_s, t.first_call_s)
            if slowest > budget_s:
                stopped[m] = f"skipped: a call took {slowest:.3g} s > budget {budget_s:g} s"
    base = {r["K"]: r["median_s"] for r in rows if r["method"] == "batch_grad" and r["median_s"]}
    for r in rows:
        b = base.get(r["K"])
        r["ratio_to_batch_grad"] = r["median_s"] / b if (b and r["median_s"]) else None
    return rows


OPTIMIZERS: dict[str, tuple[str, Callable[[float], Any]]] = {  # name -> (label, lr -> rule)
    "gd": ("hand-rolled GD", lambda lr: None), "sgd": ("optax.sgd", optax.sgd),  # None: train's
    "momentum": ("optax.sgd momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9)),
    "adam": ("optax.adam", optax.adam)}


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation | None:
    """``OPTIMIZERS[name]`` at learning rate ``lr``: None for "gd" (train's own rule)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name][1](lr)


def rate_kwargs(name: str, lr: float) -> dict[str, Any]:
    """``train``'s keywords for optimizer ``name`` at rate ``lr``: ``lr=`` for the hand-rolled
    rule ("gd"), else ``optimizer=`` carrying the rate."""
    optimizer = make_optimizer(name, lr)
    return {"lr": lr} if optimizer is None else {"optimizer": optimizer}


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
