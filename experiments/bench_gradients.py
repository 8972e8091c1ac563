"""How much faster is backprop? Time per gradient of the batch loss, seven ways.

For K = D = H = O over a range and a fixed batch of N samples, times one gradient of
batch_loss against the parameter count P = 2HD + OH = 3K^2, by: batch_grad (the hand-derived
backward pass, one contraction over N per matrix), jax.grad (reverse-mode autodiff,
oracle_grad), jvp_grad (forward mode by hand: one manual JVP per parameter), jax.jacfwd
(forward-mode autodiff), fd_grad (central finite differences: 2P batch-loss evaluations,
vmapped, jitted), python_backprop (the homework's lists, loops and math.exp) and python_fd (its
finite differences on lists). Each JAX method is one jitted call at matmul --precision, timed
in interleaved rounds (compile time apart from the warm median); the Python ones run on the
host CPU and stop once one call passes --budget seconds, or is predicted to. Every result is
checked against jax.grad in float64.

    python -m experiments.bench_gradients --ks 2 4 8 16 32 64 --n 256
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs and the Python (float64) baselines

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from abc_jax.edge import PRECISIONS  # noqa: E402
from experiments import common  # noqa: E402

NAME = "bench_gradients"
METHODS = common.GRADIENT_METHODS  # name -> (label, kind "jax" or "python", exponent, fn)
CSV_FIELDS = ["K", "P", "N", "method", "kind", "device", "dtype", "precision", "status",
              *common.TIMING_FIELDS, "ratio_to_batch_grad", "rel_err_vs_float64"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes, methods and timing settings; ``QUICK``: the --quick values."""

    ks: tuple[int, ...] = common.flag((2, 4, 8, 16, 32, 64), "K=D=H=O")
    n: int = common.flag(256, "batch size N")
    methods: tuple[str, ...] = common.flag(tuple(METHODS), "methods to time",
                                           choices=list(METHODS))
    dtype: str = common.flag("float32", "dtype of the JAX methods (Python is float64)",
                             choices=["float32", "float64"])
    budget: float = common.flag(2.0, "stop a method once one call takes, or is predicted to "
                                "take, longer than this many seconds")
    min_time: float = common.flag(0.2, "timed seconds per point, at least")
    rounds: int = common.flag(5, "interleaved timing rounds per point")
    precision: str = common.flag("highest", common.cli.PRECISION_HELP, choices=PRECISIONS)
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(self.n >= 1 and min(self.ks) >= 1 and self.rounds >= 1,
                     "--n, --ks and --rounds must be >= 1")


QUICK = Config(ks=(2, 4), n=16, budget=0.5, min_time=0.01, rounds=3, quick=True)


def fit_slope(P: Sequence[float], t: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares log t = slope log P + intercept; NaN if one P."""
    fit = np.polyfit(np.log(P), np.log(t), 1) if np.unique(P).size > 1 else (np.nan, np.nan)
    return float(fit[0]), float(fit[1])


def slopes(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fitted log-log slope of time against P, per method, over its measured points."""
    pts = {m: [(r["P"], r["median_s"]) for r in rows if r["method"] == m and r["median_s"]]
           for m in dict.fromkeys(r["method"] for r in rows)}
    return {m: fit_slope(*zip(*p, strict=True))[0] if p else float("nan") for m, p in pts.items()}


def ratio_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: K, P, device, precision, batch_grad's time, each method's time / its; a
    column run elsewhere than batch_grad (Python, when JAX is not on the CPU) names where."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "batch_grad"]
    by = {(r["K"], r["method"]): r for r in rows}
    device = next((r["device"] for r in rows if r["method"] == "batch_grad" and r.get("device")),
                  common.device_label())
    host = " (host cpu)" if not device.startswith("cpu") else ""
    header = ["K", "P", "device", "precision", "batch_grad"] + [
        f"{m} x" + (host if METHODS[m].kind == "python" else "") for m in methods]
    precision = next((r.get("precision") for r in rows if r.get("precision")), None)
    return header, [[K, 3 * K * K, device, precision, _fmt_time(
        by.get((K, "batch_grad"), {}).get("median_s")), *(
        by.get((K, m), {}).get("ratio_to_batch_grad") for m in methods)]
        for K in dict.fromkeys(r["K"] for r in rows)]


def _fmt_time(s: float | None) -> str:
    unit, scale = next((u for u in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)) if s and s >= u[1]),
                       ("ns", 1e-9))
    return "-" if s is None else f"{s / scale:.3g} {unit}"


def figure(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """Log-log time per gradient against P (fitted slopes in the legend) and ratio to batch_grad."""
    fig, axes = common.figure(ncols=2)
    fits, ks = slopes(rows), sorted({r["K"] for r in rows})
    for i, (m, M) in enumerate(METHODS.items()):
        if not (pts := [r for r in rows if r["method"] == m and r["median_s"]]):
            continue
        fit = f"slope {fits[m]:.2f}" if np.isfinite(fits[m]) else "one point, no slope"
        for ax, key in zip(axes, ("median_s", "ratio_to_batch_grad"), strict=True):
            ax.plot([r["P"] for r in pts], [r[key] for r in pts], marker="os^vDXP"[i],
                    color=f"C{i}", ls="--" if M.kind == "python" else "-",
                    label=f"{M.label}: {fit}")
    for ax, ylabel in zip(axes, ("time per gradient [s] (warm median)",
                                 "time / time of batch_grad (= 1) [ratio]"), strict=True):
        ax.set(xscale="log", yscale="log", ylabel=ylabel,
               xlabel="parameter count P = 2HD + OH = 3K² (D=H=O=K)")
        top = ax.secondary_xaxis("top", functions=(
            lambda P: np.sqrt(np.maximum(P, 1e-12) / 3), lambda K: 3 * K**2))
        top.set_xticks([], minor=True)
        top.set(xlabel="K", xticks=ks, xticklabels=[str(k) for k in ks])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3,
               fontsize=8)
    fig.suptitle(f"{title}\nlegend: fitted log-log slope of time against P", fontsize=10)
    return fig


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a README quotes, per method: slope, device, precision, and by K the time,
    compile time and ratio to batch_grad; the largest K measured and the worst error."""
    fits = slopes(rows)
    mine = {m: [r for r in rows if r["method"] == m] for m in fits}
    by_k = lambda field, ms=fits: {m: {str(r["K"]): r.get(field) for r in mine[m]}  # noqa: E731
                                   for m in ms}
    errs = {m: max((r["rel_err_vs_float64"] for r in rs if "rel_err_vs_float64" in r),
                   default=None) for m, rs in mine.items()}
    return {
        **{k: {m: rs[0][k] for m, rs in mine.items()} for k in ("device", "precision")},
        "slopes": fits, "ks": sorted({r["K"] for r in rows}),
        "ratio_to_batch_grad": by_k("ratio_to_batch_grad", [m for m in fits if m != "batch_grad"]),
        "median_s": by_k("median_s"),
        "compile_s": by_k("compile_s", [m for m in fits if METHODS[m].kind == "jax"]),
        "largest_k_measured": {m: max((r["K"] for r in rs if r["median_s"]), default=None)
                               for m, rs in mine.items()},
        "rel_err_vs_float64": errs,
        "max_rel_err_vs_float64": max((e for e in errs.values() if e is not None), default=None)}


def run(cfg: Config) -> dict[str, Any]:
    """Every method timed at every K (``common.time_gradients``) and the summary."""
    env = common.environment(cfg.dtype, cfg.precision)
    rows = common.time_gradients(cfg.ks, cfg.n, cfg.methods, dtype=jnp.dtype(cfg.dtype),
                                 precision=cfg.precision, seed=cfg.seed, budget_s=cfg.budget,
                                 min_time=cfg.min_time, rounds=cfg.rounds)
    return {"config": dataclasses.asdict(cfg), "environment": env, "rows": rows,
            **summarize(rows)}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the ratio table, slopes, skips and errors; write config.json, metrics.json,
    timings.csv, ratios.csv and bench_gradients.png."""
    cfg, env, rows = res["config"], res["environment"], res["rows"]
    summary = {k: v for k, v in res.items() if k not in ("config", "environment", "rows")}
    desc = (f"N = {cfg['n']}, {env['dtype']}, precision {cfg['precision']}, "
            f"{env['device_label']} ({env['cpu_count']} CPUs)")
    print(f"{NAME}: {desc}, jax {env['jax_version']}")
    header, table = ratio_table(rows)
    print("\ntime of batch_grad, and each method's as a multiple of it (warm medians):")
    common.print_table(header, table)
    print("\nfitted slope of log time vs log P: "
          + ", ".join(f"{m} {s:.2f}" for m, s in summary["slopes"].items()))
    print("skipped: " + ("; ".join(f"{r['method']} at K={r['K']} ({r['status'][9:]})"
                                   for r in rows if r["status"] != "ok") or "none"))
    print("largest relative error against jax.grad in float64: " + ", ".join(
        f"{m} {e:.1e}" for m, e in summary["rel_err_vs_float64"].items() if e is not None))
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg, metrics={"environment": env, **summary},
        tables={"timings": (CSV_FIELDS, [[r.get(f) for f in CSV_FIELDS] for r in rows]),
                "ratios": (header, table)},
        figures={NAME: figure(rows, f"{desc}; Python on the host CPU")})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
