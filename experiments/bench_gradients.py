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

    python experiments/bench_gradients.py --ks 2 4 8 16 32 64 --n 256
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs and the Python (float64) baselines

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

NAME = "bench_gradients"
METHODS = _common.GRADIENT_METHODS  # name -> (label, kind "jax" or "python", exponent, fn)
CSV_FIELDS = ["K", "P", "N", "method", "kind", "device", "dtype", "precision", "status",
              *_common.TIMING_FIELDS, "ratio_to_batch_grad", "rel_err_vs_float64"]


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
                  _common.device_label())
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
    fig, axes = _common.figure(ncols=2)
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


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__, precision=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="K=D=H=O")
    ap.add_argument("--n", type=int, default=256, help="batch size N")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to time")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the JAX methods (Python is float64)")
    ap.add_argument("--budget", type=float, default=2.0, help="stop a method once one call "
                    "takes, or is predicted to take, longer than this many seconds")
    ap.add_argument("--min-time", type=float, default=0.2, help="timed seconds per point, at least")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per point")
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.n, args.budget, args.min_time, args.rounds = [2, 4], 16, 0.5, 0.01, 3
    if args.n < 1 or min(args.ks) < 1 or args.rounds < 1:
        ap.error("--n, --ks and --rounds must be >= 1")
    env = _common.environment(args.dtype, args.precision)
    desc = (f"N = {args.n}, {env['dtype']}, precision {args.precision}, "
            f"{env['device_label']} ({env['cpu_count']} CPUs)")
    print(f"{NAME}: {desc}, jax {env['jax_version']}")
    rows = _common.time_gradients(args.ks, args.n, args.methods, dtype=jnp.dtype(args.dtype),
                     precision=args.precision, seed=args.seed, budget_s=args.budget,
                     min_time=args.min_time, rounds=args.rounds)
    summary = summarize(rows)
    header, table = ratio_table(rows)
    print("\ntime of batch_grad, and each method's as a multiple of it (warm medians):")
    _common.print_table(header, table)
    print("\nfitted slope of log time vs log P: "
          + ", ".join(f"{m} {s:.2f}" for m, s in summary["slopes"].items()))
    print("skipped: " + ("; ".join(f"{r['method']} at K={r['K']} ({r['status'][9:]})"
                                   for r in rows if r["status"] != "ok") or "none"))
    print("largest relative error against jax.grad in float64: " + ", ".join(
        f"{m} {e:.1e}" for m, e in summary["rel_err_vs_float64"].items() if e is not None))
    _common.write_and_report(
        args.out, args.docs, [NAME], config=vars(args), metrics={"environment": env, **summary},
        tables={"timings": (CSV_FIELDS, [[r.get(f) for f in CSV_FIELDS] for r in rows]),
                "ratios": (header, table)},
        figures={NAME: figure(rows, f"{desc}; Python on the host CPU")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
