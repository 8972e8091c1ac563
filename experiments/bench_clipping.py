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
arguments and outputs); Opacus's is the size of its per-sample gradients (N x P float32),
a lower bound. A method whose estimate exceeds --budget-gib is not run and is reported as
out of memory. Times are medians over interleaved rounds, each waited for
with ``jax.block_until_ready``; compile time is apart.

    python -m experiments.bench_clipping            # K 64, 256; N 1024 .. 65536
    python -m experiments.bench_clipping --quick    # a smoke run
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax.core.backward import batch_grad
from abc_jax.core.model import Batch, Params, forward, init_params
from abc_jax.core.norms import clipped_batch_grad, per_sample_grad_norms
from experiments import common

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


def run_point(K: int, N: int, args: Config) -> list[dict[str, Any]]:
    """Every method at one (K, N): compile (memory estimate), skip over budget, time the rest."""
    params, batch, clip_norm = problem(K, N, args.seed)
    rows, fns = {}, {}
    for name in args.methods:
        row = rows[name] = {"K": K, "P": 3 * K * K, "N": N, "method": name, "status": "ok"}
        if name == "opacus":
            est = row["mem_total_bytes"] = N * 3 * K * K * 4  # its grad_sample tensors alone
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
              *(f"{m} MiB{' (est.)' if m == 'opacus' else ''}" for m in methods)]
    out = []
    for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
        by = {r["method"]: r for r in rows if (r["K"], r["N"]) == (K, N)}
        times = [f"{by[m]['median_s'] * 1e3:.3g}" if by[m].get("median_s") else by[m]["status"]
                 for m in methods]
        ratios = [ratio(rows, K, N, "clipped", "plain"), ratio(rows, K, N, "vmap", "clipped"),
                  *([ratio(rows, K, N, "opacus", "clipped")] if "opacus" in methods else [])]
        mem = [f"{by[m]['mem_total_bytes'] / 2**20:.0f}" for m in methods]
        out.append([K, N, *times, *(f"{x:.2f}" if x else "-" for x in ratios), *mem])
    return header, out


def figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Time per gradient against N (log-log), one panel per K, one line per method."""
    ks = sorted({r["K"] for r in rows})
    fig, axes = common.figure(ncols=len(ks), width=5.0, height=4.0)
    for ax, K in zip(np.atleast_1d(axes), ks, strict=True):
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


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes, methods and timing; ``QUICK``: K 64, N 1024 and 4096, 3 rounds (a smoke run,
    not a measurement)."""

    ks: tuple[int, ...] = common.flag((64, 256), "K = D = H = O")
    ns: tuple[int, ...] = common.flag((1024, 4096, 16384, 65536), "batch sizes N")
    methods: tuple[str, ...] = common.flag(METHODS, "methods to time", choices=METHODS)
    rounds: int = common.flag(5, "interleaved timing rounds")
    min_time: float = common.flag(0.5, "seconds of timed calls per method and point, about")
    budget_gib: float = common.flag(8.0, "a method whose memory estimate exceeds this is not run")
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(min(self.ks + self.ns) >= 1 and self.rounds >= 1,
                     "--ks, --ns and --rounds must be >= 1")


QUICK = Config(ks=(64,), ns=(1024, 4096), rounds=3, min_time=0.1, quick=True)


def run(cfg: Config) -> dict[str, Any]:
    """Every method at every (K, N) (``run_point``); opacus only where it is installed."""
    env = common.environment(jnp.float32)
    skipped = "opacus" in cfg.methods and not opacus_installed()
    if skipped:
        cfg = dataclasses.replace(cfg, methods=tuple(m for m in cfg.methods if m != "opacus"))
    rows = [r for K in cfg.ks for N in cfg.ns for r in run_point(K, N, cfg)]
    return {"config": dataclasses.asdict(cfg), "environment": env, "opacus_skipped": skipped,
            "rows": rows,
            "versions": {m: importlib.metadata.version(m) for m in ("torch", "opacus")
                         if "opacus" in cfg.methods},
            "ratios": [{"K": K, "N": N} | {f"{a}/{b}": ratio(rows, K, N, a, b) for a, b in PAIRS}
                       for K in cfg.ks for N in cfg.ns]}


PAIRS = (("clipped", "plain"), ("vmap", "clipped"), ("opacus", "clipped"))  # the ratios


def ranges(ratios: list[dict[str, Any]]) -> dict[str, dict[str, list[float] | None]]:
    """Per K ("K64") and ratio, [lowest, highest] over the N where both methods ran (None: none)."""
    out: dict[str, dict[str, list[float] | None]] = {}
    for r in ratios:
        for name, x in r.items():
            if name in ("K", "N"):
                continue
            at = out.setdefault(f"K{r['K']}", {}).setdefault(name, None)
            if x is not None:
                out[f"K{r['K']}"][name] = [min(at[0], x), max(at[1], x)] if at else [x, x]
    return out


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table and the largest difference from vmap; write config.json, metrics.json,
    timings.csv, ratios.csv and bench_clipping.png."""
    env, rows = res["environment"], res["rows"]
    print(f"{NAME}: float32, {env['backend']} ({env['device']}, {env['cpu_count']} CPUs), "
          f"jax {env['jax_version']}, load {env['load_average_1min']:.1f}")
    if res["config"]["quick"]:
        print("quick run: a smoke run, not a measurement (tiny sizes, 3 rounds)")
    if res["opacus_skipped"]:
        print("opacus: skipped, torch or opacus not installed (pip install torch opacus)")
    header, body = table(rows)
    print("\nmedian time per gradient, ratios of medians, XLA memory estimates:")
    common.print_table(header, body)
    errs = [r["rel_err_vs_vmap"] for r in rows if "rel_err_vs_vmap" in r]
    print("largest relative difference from vmap(grad) + clip: "
          + (f"{max(errs):.1e}" if errs else "- (vmap not run)"))
    return common.write_and_report(
        NAME, out, docs, [NAME], config=res["config"],
        metrics={k: res[k] for k in ("environment", "versions", "rows", "ratios")} | {
            "ranges": ranges(res["ratios"])},
        tables={"timings": (CSV_FIELDS, [[r.get(f) for f in CSV_FIELDS] for r in rows]),
                "ratios": (header, body)},
        figures={NAME: figure(rows, f"{NAME}: float32, {env['backend']}, "
                                    f"{env['cpu_count']} CPUs")})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
