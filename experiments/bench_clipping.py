"""Per-sample gradient clipping: what does it cost over a plain batch gradient?

Times, in one interleaved run per (K, N) with K = D = H = O, float32, targets T:

- clipped: ``core.norms.clipped_batch_grad``, the mean of per-sample clipped gradients
  computed from the rows of one batch pass (norms ||gy_i|| ||x_i|| etc., the clip factors
  as row weights before the three contractions), jitted;
- plain: ``core.backward.batch_grad``, the unclipped gradient, jitted;
- vmap: ``vmap(jax.grad)`` of the per-sample loss, then clip and mean, jitted
  (materialises N x P per-sample gradients, P = 3 K^2);
- opacus: PyTorch + Opacus ``GradSampleModule`` per-sample gradients, clip, mean (only if
  torch and opacus are installed).

The clip norm is the median per-sample gradient norm (about half the rows clipped).
Memory per JAX method is XLA's estimate (``compiled.memory_analysis()``: temporaries,
arguments and outputs); a method whose estimate exceeds --budget-gib is not run and is
reported as out of memory. Times are medians over interleaved rounds, each waited for
with ``jax.block_until_ready``; compile time is apart.

    python experiments/bench_clipping.py            # K 64, 256; N 1024 .. 65536
    python experiments/bench_clipping.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from abc_jax.core.backward import batch_grad
from abc_jax.core.model import Batch, Params, forward, init_params
from abc_jax.core.norms import clipped_batch_grad, per_sample_grad_norms

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAME = "bench_clipping"
METHODS = ("clipped", "plain", "vmap", "opacus")
GIB = 2.0**30
CSV_FIELDS = ["K", "P", "N", "method", "status", "median_s", "min_s", "rounds",
              "calls_per_round", "compile_s", "mem_temp_bytes", "mem_total_bytes",
              "rel_err_vs_vmap"]


def vmap_clipped(params: Params, batch: Batch, clip_norm: jax.Array) -> Params:
    """Autodiff's way: per-sample gradients (N, ...) by vmap(grad), clip each, mean."""
    grads = jax.vmap(jax.grad(lambda p, x, t: forward(p, x, t)[0]),
                     in_axes=(None, 0, 0))(params, batch.X, batch.T)
    norms = jnp.sqrt(sum(jnp.sum(g * g, axis=(1, 2)) for g in grads))  # (N,)
    f = jnp.minimum(1.0, clip_norm / norms)  # a zero norm gives c / 0 = inf -> 1
    return Params(*(jnp.einsum("n,nij->ij", f, g) / g.shape[0] for g in grads))


JAX_METHODS: dict[str, Callable[..., Params]] = {
    "clipped": clipped_batch_grad,
    "plain": lambda params, batch, clip_norm: batch_grad(params, batch),
    "vmap": vmap_clipped}


def opacus_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "opacus"))


def opacus_method(params: Params, batch: Batch, clip_norm: float) -> Callable[[], Params]:
    """A zero-argument call: Opacus per-sample gradients, clipped, averaged (numpy Params)."""
    import torch
    from opacus import GradSampleModule

    A, B, C = (torch.from_numpy(np.array(a)) for a in params)
    X, T = torch.from_numpy(np.array(batch.X)), torch.from_numpy(np.array(batch.T))

    class ABC(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = (torch.nn.Linear(A.shape[1], A.shape[0], bias=False) for _ in "ab")
            self.c = torch.nn.Linear(C.shape[1], C.shape[0], bias=False)
            for layer, weight in ((self.a, A), (self.b, B), (self.c, C)):
                layer.weight.data.copy_(weight)

        def forward(self, x: Any) -> Any:
            return self.c(torch.sigmoid(self.a(x)) + self.b(x))

    model = GradSampleModule(ABC(), loss_reduction="sum")
    layers = (model._module.a, model._module.b, model._module.c)

    def step() -> Params:
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        ((model(X) - T) ** 2).sum().backward()
        gs = [layer.weight.grad_sample for layer in layers]  # (N, ...) each
        norms = torch.sqrt(sum((g * g).sum(dim=(1, 2)) for g in gs))
        f = torch.clamp(clip_norm / norms, max=1.0)
        return Params(*(torch.einsum("n,nij->ij", f, g).div(len(X)).numpy() for g in gs))

    return step


def compile_jax(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float, int, int]:
    """(compiled, compile seconds, temp bytes, total bytes) of ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes)
    total = temp + int(mem.argument_size_in_bytes) + int(mem.output_size_in_bytes) - int(
        mem.alias_size_in_bytes)
    return compiled, seconds, temp, total


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int,
                     min_time: float) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each zero-argument call, in interleaved rounds.

    One warm call each (its time sets how many calls a sample loops, so a sample lasts
    about ``min_time / rounds``); then ``rounds`` rounds running every call in turn, each
    sample waited for with ``jax.block_until_ready``. Returns name -> timing and output.
    """
    outputs, inner, samples = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outputs[name] = jax.block_until_ready(fn())
        inner[name] = max(1, int(min_time / rounds / max(time.perf_counter() - t0, 1e-9)))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "rounds": len(s),
                   "calls_per_round": inner[name], "output": outputs[name]}
            for name, s in samples.items()}


def rel_err(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref| over the three matrices, in float64."""
    g, r = (np.concatenate([np.asarray(a, np.float64).ravel() for a in x]) for x in (got, ref))
    return float(np.max(np.abs(g - r)) / np.max(np.abs(r)))


def problem(K: int, N: int, seed: int) -> tuple[Params, Batch, jax.Array]:
    """Params, a Batch (X, no weights, T) in float32, and the median per-sample gradient norm."""
    kp, kx, kt = jax.random.split(jax.random.key(seed), 3)
    params = init_params(kp, K, K, K, jnp.float32)
    batch = Batch(jax.random.normal(kx, (N, K)), None, jax.random.normal(kt, (N, K)))
    norms = jax.jit(per_sample_grad_norms)(params, batch)
    return params, batch, jnp.median(jnp.linalg.norm(norms, axis=1))


def run_point(K: int, N: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method at one (K, N): compile (memory estimate), skip over budget, time the rest."""
    params, batch, clip_norm = problem(K, N, args.seed)
    rows, fns = {}, {}
    for name in args.methods:
        row = rows[name] = {"K": K, "P": 3 * K * K, "N": N, "method": name, "status": "ok"}
        if name == "opacus":
            est = N * 3 * K * K * 4  # its grad_sample tensors alone
            if est > args.budget_gib * GIB:
                row["status"] = f"out of memory (estimated {est / GIB:.1f} GiB)"
            else:
                fns[name] = opacus_method(params, batch, float(clip_norm))
            continue
        compiled, row["compile_s"], row["mem_temp_bytes"], row["mem_total_bytes"] = compile_jax(
            JAX_METHODS[name], (params, batch, clip_norm))
        if row["mem_total_bytes"] > args.budget_gib * GIB:
            row["status"] = f"out of memory (estimated {row['mem_total_bytes'] / GIB:.1f} GiB)"
        else:
            fns[name] = lambda c=compiled: c(params, batch, clip_norm)
    timings = time_interleaved(fns, args.rounds, args.min_time)
    for name, t in timings.items():
        rows[name].update({k: v for k, v in t.items() if k != "output"})
    if "vmap" in timings:
        for name in set(timings) - {"vmap", "plain"}:
            rows[name]["rel_err_vs_vmap"] = rel_err(timings[name]["output"],
                                                    timings["vmap"]["output"])
    return list(rows.values())


def ratio(rows: list[dict[str, Any]], K: int, N: int, num: str, den: str) -> float | None:
    """median time of ``num`` / that of ``den`` at (K, N); None where either did not run."""
    t = {r["method"]: r.get("median_s") for r in rows if (r["K"], r["N"]) == (K, N)}
    return t[num] / t[den] if t.get(num) and t.get(den) else None


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: K, N, each method's time (ms) or status, the ratios, memory (MiB)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ["K", "N", *(f"{m} ms" for m in methods), "clipped/plain", "vmap/clipped",
              *(["opacus/clipped"] if "opacus" in methods else []),
              *(f"{m} MiB" for m in methods if m != "opacus")]
    out = []
    for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
        by = {r["method"]: r for r in rows if (r["K"], r["N"]) == (K, N)}
        times = [f"{by[m]['median_s'] * 1e3:.3g}" if by[m].get("median_s") else by[m]["status"]
                 for m in methods]
        ratios = [ratio(rows, K, N, "clipped", "plain"), ratio(rows, K, N, "vmap", "clipped"),
                  *([ratio(rows, K, N, "opacus", "clipped")] if "opacus" in methods else [])]
        mem = [f"{by[m]['mem_total_bytes'] / 2**20:.0f}" for m in methods if m != "opacus"]
        out.append([K, N, *times, *(f"{x:.2f}" if x else "-" for x in ratios), *mem])
    return header, out


def print_table(header: list[str], body: list[list[Any]]) -> None:
    """Columns padded to their widest cell."""
    cells = [header, *[[str(c) for c in row] for row in body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Time per gradient against N (log-log), one panel per K, one line per method."""
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False,
                             layout="constrained")
    for ax, K in zip(axes[0], ks, strict=True):
        for i, m in enumerate(METHODS):
            pts = [r for r in rows if r["K"] == K and r["method"] == m and r.get("median_s")]
            if pts:
                ax.plot([r["N"] for r in pts], [r["median_s"] for r in pts], marker="os^v"[i],
                        color=f"C{i}", label=m)
        ax.set(xscale="log", yscale="log", xlabel="batch size N",
               ylabel="time per gradient [s] (median)", title=f"K = D = H = O = {K}")
        ax.grid(True, which="both", alpha=0.35)
        ax.legend(fontsize=8)
    fig.suptitle(title + "\nmissing points: not run (out of memory estimate or not installed)",
                 fontsize=9)
    return fig


def write(out: Path, config: Any, metrics: Any, tables: Mapping[str, Any], fig: Any) -> list[str]:
    """config.json, metrics.json, one CSV per table and the PNG, each file written whole."""
    try:
        from abc_jax.files import write_results
    except ImportError:  # the package being reorganised: plain files, temp then rename
        write_results = None
    if write_results is not None:
        return list(write_results(out, config=config, metrics=metrics, tables=tables,
                                  figures={NAME: fig}))
    out.mkdir(parents=True, exist_ok=True)
    texts = {"config.json": json.dumps(config, indent=2, default=str),
             "metrics.json": json.dumps(metrics, indent=2, default=str)}
    for name, (header, body) in tables.items():
        texts[f"{name}.csv"] = "\n".join(",".join("" if c is None else str(c) for c in row)
                                         for row in [header, *body]) + "\n"
    for name, text in texts.items():
        (out / f".{name}.tmp").write_text(text)
        os.replace(out / f".{name}.tmp", out / name)
    fig.savefig(out / f".{NAME}.tmp.png", dpi=150)
    os.replace(out / f".{NAME}.tmp.png", out / f"{NAME}.png")
    return [*texts, f"{NAME}.png"]


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default that says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"{NAME}.py", description=__doc__.split("\n")[0],
                                 epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=_Help)
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 256], help="K = D = H = O")
    ap.add_argument("--ns", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                    help="batch sizes N")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of timed calls per method and point, about")
    ap.add_argument("--budget-gib", type=float, default=8.0,
                    help="a method whose memory estimate exceeds this is not run")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", type=Path, default=Path("results") / NAME, help="results folder")
    ap.add_argument("--quick", action="store_true",
                    help="K 64, N 1024 and 4096, 3 rounds: a smoke run, not a measurement")
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.ns, args.rounds, args.min_time = [64], [1024, 4096], 3, 0.1
    if min(args.ks + args.ns) < 1 or args.rounds < 1:
        ap.error("--ks, --ns and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
           "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
           "load_average_1min": os.getloadavg()[0], "dtype": "float32"}
    print(f"{NAME}: float32, {env['backend']} ({env['device']}, {env['cpu_count']} CPUs), "
          f"jax {env['jax_version']}, load {env['load_average_1min']:.1f}")
    if args.quick:
        print("quick run: a smoke run, not a measurement (tiny sizes, 3 rounds)")
    if "opacus" in args.methods and not opacus_installed():
        print("opacus: skipped, torch or opacus not installed (pip install torch opacus)")
        args.methods.remove("opacus")
    rows = [r for K in args.ks for N in args.ns for r in run_point(K, N, args)]
    header, body = table(rows)
    print("\nmedian time per gradient, ratios of medians, XLA memory estimates:")
    print_table(header, body)
    errs = [r["rel_err_vs_vmap"] for r in rows if "rel_err_vs_vmap" in r]
    print("largest relative difference from vmap(grad) + clip: "
          + (f"{max(errs):.1e}" if errs else "- (vmap not run)"))
    metrics = {"environment": env, "rows": rows,
               "ratios": {f"K={K},N={N}": {"clipped/plain": ratio(rows, K, N, "clipped", "plain"),
                                            "vmap/clipped": ratio(rows, K, N, "vmap", "clipped")}
                          for K in args.ks for N in args.ns}}
    written = write(args.out, vars(args), metrics,
                    {"timings": (CSV_FIELDS, [[r.get(f) for f in CSV_FIELDS] for r in rows]),
                     "ratios": (header, body)},
                    figure(rows, f"{NAME}: float32, {env['backend']}, {env['cpu_count']} CPUs"))
    print(f"wrote {args.out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
