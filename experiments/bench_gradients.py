"""How much faster is backprop? Time per gradient of the batch loss, seven ways.

For K = D = H = O over a range and a fixed batch of N samples, times one
gradient of batch_loss by:

  batch_grad       the hand-derived backward pass (one contraction over N per matrix)
  jax.grad         reverse-mode autodiff (oracle_grad)
  jvp_grad         forward mode by hand: one manual JVP per parameter (abc_jax.jvp_grad)
  jax.jacfwd       forward-mode autodiff: one JVP per parameter
  fd_grad          central finite differences: 2P batch-loss evaluations, vmapped, jitted
  python_backprop  the homework's way: lists, loops and math.exp
  python_fd        the homework's first assignment: finite differences on lists

against the parameter count P = 2HD + OH = 3K^2. Each JAX method is one jitted call at
matmul --precision, timed in interleaved rounds (_common.time_interleaved; compile time
apart from the warm median); the Python ones run on the host CPU, and stop once one call
passes --budget seconds, or is predicted to. One process, one dtype; every result is
checked against jax.grad in float64.

    python experiments/bench_gradients.py --ks 2 4 8 16 32 64 --n 256
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs and the Python (float64) baselines

import _common  # noqa: E402
import homework  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax.files import write_results  # noqa: E402

NAME = "bench_gradients"


def _jacfwd(params: abc_jax.Params, X: jax.Array, *, precision: str | None) -> abc_jax.Params:
    return jax.jacfwd(lambda p: abc_jax.batch_loss(p, X, precision=precision))(params)


class Method(NamedTuple):
    label: str
    kind: str  # "jax" (jitted, given params, X and precision) or "python" (given lists)
    exponent: int  # time ~ P^exponent at fixed N: predicts the next K for the budget
    fn: Callable[..., Any]


METHODS: dict[str, Method] = {
    "batch_grad": Method("batch_grad (manual)", "jax", 1, abc_jax.batch_grad),
    "jax_grad": Method("jax.grad (reverse)", "jax", 1, abc_jax.oracle_grad),
    "jvp_grad": Method("jvp_grad (manual forward)", "jax", 2, abc_jax.jvp_grad),
    "jacfwd": Method("jax.jacfwd (forward)", "jax", 2, _jacfwd),
    "fd_grad": Method("fd_grad (finite diff.)", "jax", 2, abc_jax.fd_grad),
    "python_backprop": Method("Python backprop", "python", 1,
                              lambda *lists: homework.py_loss_and_grad(*lists)[1]),
    "python_fd": Method("Python finite diff.", "python", 2, homework.py_fd_grad),
}


def rel_error(grads: Any, reference: abc_jax.Params) -> float:
    """max |grads - reference| / max |reference| over all three matrices."""
    g, r = (np.concatenate([np.asarray(a, np.float64).ravel() for a in x])
            for x in (grads, reference))
    return float(np.max(np.abs(g - r)) / np.max(np.abs(r)))


def param_count(K: int) -> int:
    """P = 2HD + OH with D = H = O = K."""
    return 3 * K * K


def _skip_reason(m: str, K: int, n: int, itemsize: int, last: dict[str, tuple[int, float]],
                 budget_s: float, mem_limit: float) -> str | None:
    """Why method m is skipped at this K (predicted over the budget, or the forward modes'
    memory: P tangents of the (N, 2H + O) activations, twice), else None."""
    if m in last:
        P0, t0 = last[m]
        predicted = t0 * (param_count(K) / P0) ** METHODS[m].exponent
        if predicted > budget_s:
            return f"skipped: predicted {predicted:.3g} s > budget {budget_s:g} s"
    jac_bytes = 2 * param_count(K) * n * 3 * K * itemsize
    if m in ("jacfwd", "jvp_grad") and jac_bytes > mem_limit:
        return f"skipped: memory ~{jac_bytes / 2**30:.2g} GiB"
    return None


def _time_at(K: int, n: int, todo: Sequence[str], *, dtype: Any, precision: str, seed: int,
             budget_s: float, min_time: float, rounds: int) -> tuple[dict, abc_jax.Params]:
    """(method -> Timing, jax.grad in float64 on the same rounded inputs) at one K."""
    kp, kx = jax.random.split(jax.random.fold_in(jax.random.key(seed), K))
    params = abc_jax.init_params(kp, K, dtype=dtype)
    X = jax.random.normal(kx, (n, K), dtype)
    as64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    ref = abc_jax.oracle_grad(jax.tree.map(as64, params), as64(X), precision="highest")
    lists, times = homework.to_lists(params, X), {}
    for kind, extra in (("jax", {}), ("python", {"warmup": 0, "max_time": budget_s})):
        # JAX: one jax.jit of each public function (the same dispatch cost for all, validation
        # at trace time); Python: the homework's lists of lists
        fns = {m: functools.partial(jax.jit(functools.partial(M.fn, precision=precision)),
                                    params, X) if kind == "jax" else functools.partial(M.fn, *lists)
               for m, M in METHODS.items() if m in todo and M.kind == kind}
        times |= _common.time_interleaved(fns, rounds=rounds, min_time=min_time, **extra)
    return times, ref


def run_bench(ks: Sequence[int], n: int, methods: Sequence[str] = tuple(METHODS), *,
              dtype: Any = jnp.float32, precision: str = "highest", seed: int = 0,
              budget_s: float = 2.0, min_time: float = 0.2, rounds: int = 5,
              mem_limit: float = 1 << 30) -> list[dict[str, Any]]:
    """Time every method at every K; one row per (K, method), skipped ones included.

    At each K the JAX methods are timed against each other in interleaved rounds, the Python
    ones likewise without warm-up and with at most ``budget_s`` s of rounds each. A method is
    skipped at K (``status`` says why) once one of its calls took over ``budget_s``, when its
    time predicted from the last K, ``t * (P_new / P_old) ** exponent``, is over ``budget_s``,
    or (forward modes) when its estimated memory exceeds ``mem_limit`` bytes. Rows name device
    and matmul precision (None for Python, which has no matmuls to set)."""
    if unknown := set(methods) - set(METHODS):
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {sorted(unknown)}")
    last: dict[str, tuple[int, float]] = {}  # method -> (P, median seconds)
    stopped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for K in _common.progress(ks, desc="bench", unit="K"):
        status = {m: stopped.get(m) or _skip_reason(m, K, n, jnp.dtype(dtype).itemsize, last,
                                                    budget_s, mem_limit) for m in methods}
        times, ref = _time_at(K, n, [m for m in methods if status[m] is None], dtype=dtype,
                              precision=precision, seed=seed, budget_s=budget_s,
                              min_time=min_time, rounds=rounds)
        for m in methods:
            on_jax = METHODS[m].kind == "jax"
            row = {"K": K, "P": param_count(K), "N": n, "method": m, "kind": METHODS[m].kind,
                   "device": _common.device_label() if on_jax else "host cpu (Python)",
                   "dtype": jnp.dtype(dtype).name if on_jax else "float64",
                   "precision": precision if on_jax else None, "median_s": None}
            if m not in times:
                rows.append({**row, "status": status[m]})
                continue
            t = times[m]
            rows.append({**row, "status": "ok", **{f: getattr(t, f) for f in TIMING},
                         "compile_s": t.compile_s if on_jax else None,
                         "rel_err_vs_float64": rel_error(t.output, ref)})
            last[m] = (param_count(K), t.median_s)
            slowest = t.median_s if on_jax else max(t.median_s, t.first_call_s)
            if slowest > budget_s:
                stopped[m] = f"skipped: a call took {slowest:.3g} s > budget {budget_s:g} s"
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["K"]: r["median_s"] for r in rows if r["method"] == "batch_grad" and r["median_s"]}
    for r in rows:
        b = base.get(r["K"])
        r["ratio_to_batch_grad"] = r["median_s"] / b if (b and r["median_s"]) else None


def fit_slope(P: Sequence[float], t: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line log t = slope log P + intercept; NaN if
    fewer than two distinct P."""
    if np.unique(P).size < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(P), np.log(t), 1)
    return float(slope), float(intercept)


def slopes(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fitted log-log slope of time against P, per method, over its measured points."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["P"], r["median_s"]) for r in rows if r["method"] == m and r["median_s"]]
        out[m] = fit_slope(*zip(*pts, strict=True))[0] if pts else float("nan")
    return out


def ratio_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: K, P, device, precision, batch_grad time, then each method's time /
    batch_grad's. Methods that ran elsewhere than batch_grad (the plain-Python ones when JAX
    is not on the CPU) say where in their column's name."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "batch_grad"]
    by = {(r["K"], r["method"]): r for r in rows}
    device = next((r.get("device") for r in rows if r["method"] == "batch_grad"), None)
    device = device or _common.device_label()
    host = " (host cpu)" if not device.startswith("cpu") else ""
    header = ["K", "P", "device", "precision", "batch_grad"] + [
        f"{m} x" + (host if METHODS[m].kind == "python" else "") for m in methods]
    precision = next((r.get("precision") for r in rows if r.get("precision")), None)
    return header, [[K, param_count(K), device, precision, _fmt_time(
        by.get((K, "batch_grad"), {}).get("median_s")), *(
        by.get((K, m), {}).get("ratio_to_batch_grad") for m in methods)]
        for K in dict.fromkeys(r["K"] for r in rows)]


def _fmt_time(s: float | None) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if s is not None and (s >= scale or unit == "ns"):
            return f"{s / scale:.3g} {unit}"
    return "-"


def figure(rows: Sequence[dict[str, Any]], title: str) -> Any:
    """Log-log time per gradient against P (fitted slopes in the legend) and ratio to batch_grad."""
    fig, (ax, ax2) = _common.figure(ncols=2)
    fits = slopes(rows)
    for i, m in enumerate(METHODS):
        pts = [r for r in rows if r["method"] == m and r["median_s"]]
        if not pts:
            continue
        style = dict(marker="os^vDXP"[i], color=f"C{i}",
                     ls="--" if METHODS[m].kind == "python" else "-")
        fit = f"slope {fits[m]:.2f}" if np.isfinite(fits[m]) else "one point, no slope"
        P = [r["P"] for r in pts]
        ax.plot(P, [r["median_s"] for r in pts], **style, label=f"{METHODS[m].label}: {fit}")
        if m != "batch_grad":
            ax2.plot(P, [r["ratio_to_batch_grad"] for r in pts], **style)
    for a in (ax, ax2):
        a.set(xscale="log", yscale="log", xlabel="parameter count P = 2HD + OH = 3K² (D=H=O=K)")
        top = a.secondary_xaxis("top", functions=(
            lambda P: np.sqrt(np.maximum(P, 1e-12) / 3), lambda K: 3 * K**2))
        top.set_xticks(sorted({r["K"] for r in rows}), minor=False)
        top.set_xticks([], minor=True)
        top.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        top.set_xlabel("K")
    ax.set(ylabel="time per gradient [s] (warm median)")
    ax.set_title("Time per gradient; legend: fitted log-log slope", fontsize=10)
    ax2.axhline(1.0, color="C0", lw=1.0)
    ax2.set(ylabel="time / time of batch_grad [ratio]")
    ax2.set_title("Slowdown relative to the manual batch_grad (= 1)", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


TIMING = ["median_s", "min_s", "first_call_s", "compile_s", "rounds", "calls_per_round"]
CSV_FIELDS = ["K", "P", "N", "method", "kind", "device", "dtype", "precision", "status",
              *TIMING, "ratio_to_batch_grad", "rel_err_vs_float64"]


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
        "device": {m: rs[0]["device"] for m, rs in mine.items()},
        "precision": {m: rs[0]["precision"] for m, rs in mine.items()},
        "slopes": fits, "ks": sorted({r["K"] for r in rows}),
        "ratio_to_batch_grad": by_k("ratio_to_batch_grad", [m for m in fits if m != "batch_grad"]),
        "median_s": by_k("median_s"),
        "compile_s": by_k("compile_s", [m for m in fits if METHODS[m].kind == "jax"]),
        "largest_k_measured": {m: max((r["K"] for r in rs if r["median_s"]), default=None)
                               for m, rs in mine.items()},
        "rel_err_vs_float64": errs,
        "max_rel_err_vs_float64": max((e for e in errs.values() if e is not None), default=None),
    }


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__, precision=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64],
                    help="K = D = H = O values")
    ap.add_argument("--n", type=int, default=256, help="batch size N")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to time")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the JAX methods (Python is float64)")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="stop a method once one call takes, or is predicted to take, "
                         "longer than this many seconds")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="seconds the timed calls per point add up to, at least")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per point")
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.n, args.budget, args.min_time, args.rounds = [2, 4], 16, 0.5, 0.01, 3
    if args.n < 1 or min(args.ks) < 1 or args.rounds < 1:
        ap.error("--n, --ks and --rounds must be >= 1")
    env = _common.environment(args.dtype, args.precision)
    print(f"{NAME}: N = {args.n}, dtype {env['dtype']}, precision {args.precision}, "
          f"device {env['device_label']} ({env['cpu_count']} CPUs), jax {env['jax_version']}")
    rows = run_bench(args.ks, args.n, args.methods, dtype=jnp.dtype(args.dtype),
                     precision=args.precision, seed=args.seed, budget_s=args.budget,
                     min_time=args.min_time, rounds=args.rounds)
    summary = summarize(rows)
    header, table = ratio_table(rows)
    print("\ntime of batch_grad, and every method's time as a multiple of it (warm median of "
          "interleaved rounds):")
    _common.print_table(header, table, floatfmt=".3g")
    print("\nfitted slope of log time vs log P: "
          + ", ".join(f"{m} {s:.2f}" for m, s in summary["slopes"].items()))
    skipped = [f"{r['method']} at K={r['K']} ({r['status'][9:]})" for r in rows
               if r["status"] != "ok"]
    if skipped:
        print("skipped: " + "; ".join(skipped))
    print("largest relative error against jax.grad in float64: " + ", ".join(
        f"{m} {e:.1e}" for m, e in summary["rel_err_vs_float64"].items() if e is not None))
    title = (f"N = {args.n}, {env['dtype']}, precision {args.precision}, "
             f"{env['device_label']} ({env['cpu_count']} CPUs); Python on the host CPU")
    written = write_results(
        args.out, config=vars(args), metrics={"environment": env, **summary},
        tables={"timings": (CSV_FIELDS, [[r.get(f) for f in CSV_FIELDS] for r in rows]),
                "ratios": (header, table)},
        figures={NAME: figure(rows, title)})
    if args.docs is not None:
        _common.docs_copy(written[f"{NAME}.png"], args.docs)
    print(f"wrote {args.out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
