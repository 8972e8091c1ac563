"""How much faster is backprop? Time per gradient of the batch loss, six ways.

For K = D = H = O over a range and a fixed batch of N samples, times one
gradient of batch_loss by:

  batch_grad       the hand-derived backward pass (one contraction over N per matrix)
  jax.grad         reverse-mode autodiff (oracle_grad)
  jax.jacfwd       forward-mode autodiff: one JVP per parameter
  fd_grad          central finite differences: 2P batch-loss evaluations, vmapped, jitted
  python_backprop  the homework's way: lists, loops and math.exp
  python_fd        the homework's first assignment: finite differences on lists

against the parameter count P = 2HD + OH = 3K^2. The JAX methods are each one
jitted call at one matmul precision (--precision, default highest), timed in
interleaved rounds (_common.time_interleaved; compile time reported apart from
the warm median); the Python ones run on the host CPU whatever JAX's device,
and stop once one call passes --budget seconds, or is predicted to. All in one
process, one dtype; every result is checked against jax.grad in float64.

    python experiments/bench_gradients.py --ks 2 4 8 16 32 64 --n 256
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs and the Python (float64) baselines

import _common  # noqa: E402
import homework  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax import files as io  # noqa: E402

NAME = "bench_gradients"

# --------------------------------------------------------------------------------------
# Methods, timing, fits.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "jax" (compiled, async) or "python" (lists)
    exponent: int  # time ~ P^exponent at fixed N: predicts the next K for the budget


METHODS: dict[str, Method] = {
    "batch_grad": Method("batch_grad (manual)", "jax", 1),
    "jax_grad": Method("jax.grad (reverse)", "jax", 1),
    "jacfwd": Method("jax.jacfwd (forward)", "jax", 2),
    "fd_grad": Method("fd_grad (finite diff.)", "jax", 2),
    "python_backprop": Method("Python backprop", "python", 1),
    "python_fd": Method("Python finite diff.", "python", 2),
}


def make_method(
    name: str, params: abc_jax.Params, X: jax.Array, precision: str | None = None
) -> Callable[[], Any]:
    """A zero-argument call that computes one gradient, as (A, B, C) arrays or lists.

    JAX methods are one ``jax.jit`` of the public function each, at matmul
    ``precision`` (None: abc_jax's default, "highest"), so all pay the same
    dispatch cost and validation runs once, at trace time.
    """
    if name == "batch_grad":
        f = jax.jit(lambda p, X: abc_jax.batch_grad(p, X, precision=precision))
    elif name == "jax_grad":
        f = jax.jit(lambda p, X: abc_jax.oracle_grad(p, X, precision=precision))
    elif name == "jacfwd":
        f = jax.jit(jax.jacfwd(lambda p, X: abc_jax.batch_loss(p, X, precision=precision)))
    elif name == "fd_grad":
        f = jax.jit(lambda p, X: abc_jax.fd_grad(p, X, precision=precision))
    elif name == "python_backprop":
        A, B, C, Xl = homework.to_lists(params, X)
        return lambda: homework.py_loss_and_grad(A, B, C, Xl)[1]
    elif name == "python_fd":
        A, B, C, Xl = homework.to_lists(params, X)
        return lambda: homework.py_fd_grad(A, B, C, Xl)
    else:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return lambda: f(params, X)


def rel_error(grads: Any, reference: abc_jax.Params) -> float:
    """max |grads - reference| / max |reference| over all three matrices."""
    g = np.concatenate([np.asarray(a, np.float64).ravel() for a in grads])
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    return float(np.max(np.abs(g - r)) / np.max(np.abs(r)))


def param_count(K: int) -> int:
    """P = 2HD + OH with D = H = O = K."""
    return 3 * K * K


def jacfwd_bytes(K: int, N: int, itemsize: int) -> int:
    """Rough peak memory of jacfwd: P tangents of the (N, 2H + O) activations, twice."""
    return 2 * param_count(K) * N * 3 * K * itemsize


def method_device(name: str) -> str:
    """Where a method computes: JAX's device, or the host CPU for the plain-Python ones."""
    return _common.device_label() if METHODS[name].kind == "jax" else "host cpu (Python)"


def _skip_reason(
    m: str, P: int, K: int, n: int, itemsize: int, last: dict[str, tuple[int, float]],
    stopped: dict[str, str], budget_s: float, mem_limit: float,
) -> str | None:
    """Why method m is skipped at this K (the budget or jacfwd's memory), else None."""
    if m in stopped:
        return stopped[m]
    if m in last:
        P0, t0 = last[m]
        predicted = t0 * (P / P0) ** METHODS[m].exponent
        if predicted > budget_s:
            return f"skipped: predicted {predicted:.3g} s > budget {budget_s:g} s"
    if m == "jacfwd" and jacfwd_bytes(K, n, itemsize) > mem_limit:
        return f"skipped: memory ~{jacfwd_bytes(K, n, itemsize) / 2**30:.2g} GiB"
    return None


def run_bench(
    ks: Sequence[int],
    n: int,
    methods: Sequence[str] = tuple(METHODS),
    *,
    dtype: Any = jnp.float32,
    precision: str = "highest",
    seed: int = 0,
    budget_s: float = 2.0,
    min_time: float = 0.2,
    rounds: int = 5,
    mem_limit: float = 1 << 30,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Time every method at every K; one row per (K, method), skipped ones included.

    At each K the JAX methods are timed against each other in interleaved rounds
    (``_common.time_interleaved``), the plain-Python ones likewise but without a
    warm-up and with at most ``budget_s`` seconds of rounds each. A method is
    skipped at K (``status`` says why) once one of its calls at a smaller K took
    longer than ``budget_s``, when its time predicted from the last K as
    ``t * (P_new / P_old) ** exponent`` exceeds ``budget_s``, or (jacfwd) when its
    estimated memory exceeds ``mem_limit`` bytes. Each row names its device and
    matmul precision (None for the Python methods, which have no matmuls to set).
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {m!r}")
    itemsize = jnp.dtype(dtype).itemsize
    last: dict[str, tuple[int, float]] = {}  # method -> (P, median seconds)
    stopped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    bar = _common.progress(ks, desc="bench", unit="K") if show_progress else ks
    for K in bar:
        P = param_count(K)
        key = jax.random.fold_in(jax.random.key(seed), K)
        kp, kx = jax.random.split(key)
        params = abc_jax.init_params(kp, K, dtype=dtype)
        X = jax.random.normal(kx, (n, K), dtype)
        as64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        # jax.grad in float64 on the same (rounded) inputs
        ref = abc_jax.oracle_grad(jax.tree.map(as64, params), as64(X), precision="highest")
        base = {m: {"K": K, "P": P, "N": n, "method": m, "kind": METHODS[m].kind,
                    "device": method_device(m),
                    "dtype": jnp.dtype(dtype).name if METHODS[m].kind == "jax" else "float64",
                    "precision": precision if METHODS[m].kind == "jax" else None}
                for m in methods}
        status = {m: _skip_reason(m, P, K, n, itemsize, last, stopped, budget_s, mem_limit)
                  for m in methods}
        todo = [m for m in methods if status[m] is None]
        jax_fns = {m: make_method(m, params, X, precision) for m in todo
                   if METHODS[m].kind == "jax"}
        py_fns = {m: make_method(m, params, X) for m in todo if METHODS[m].kind == "python"}
        times = {}
        if jax_fns:
            times |= _common.time_interleaved(jax_fns, rounds=rounds, min_time=min_time)
        if py_fns:
            times |= _common.time_interleaved(py_fns, rounds=rounds, min_time=min_time,
                                              warmup=0, max_time=budget_s)
        for m in methods:
            if m not in times:
                rows.append({**base[m], "status": status[m]})
                continue
            t = times[m]
            fields = t.fields()
            if METHODS[m].kind == "python":
                fields["compile_s"] = None
            rows.append({**base[m], "status": "ok", **fields,
                         "rel_err_vs_float64": rel_error(t.output, ref)})
            last[m] = (P, t.median_s)
            slowest = t.median_s if METHODS[m].kind == "jax" else max(t.median_s, t.first_s)
            if slowest > budget_s:
                stopped[m] = f"skipped: a call took {slowest:.3g} s > budget {budget_s:g} s"
    for r in rows:
        r.setdefault("median_s", None)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["K"]: r["median_s"] for r in rows if r["method"] == "batch_grad" and r["median_s"]}
    for r in rows:
        b = base.get(r["K"])
        r["ratio_to_batch_grad"] = r["median_s"] / b if (b and r["median_s"]) else None


def fit_slope(P: Sequence[float], t: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line log t = slope log P + intercept.

    NaN if fewer than two distinct P.
    """
    P, t = np.asarray(P, np.float64), np.asarray(t, np.float64)
    if P.size < 2 or np.unique(P).size < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(P), np.log(t), 1)
    return float(slope), float(intercept)


def slopes(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fitted log-log slope of time against P, per method, over its measured points."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["P"], r["median_s"]) for r in rows if r["method"] == m and r["median_s"]]
        out[m] = fit_slope([p for p, _ in pts], [s for _, s in pts])[0] if pts else float("nan")
    return out


def ratio_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: K, P, device, precision, batch_grad time, then each method's time /
    batch_grad's. Methods that ran elsewhere than batch_grad (the plain-Python ones when JAX
    is not on the CPU) say where in their column's name."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["K"], r["method"]): r for r in rows}
    device = {r["method"]: r.get("device") for r in rows}
    jax_device = device.get("batch_grad") or _common.device_label()

    def column(m: str) -> str:
        on_host = not jax_device.startswith("cpu") and METHODS[m].kind == "python"
        return f"{m} x" + (" (host cpu)" if on_host else "")

    precision = next((r.get("precision") for r in rows if r.get("precision")), None)
    header = (["K", "P", "device", "precision", "batch_grad"]
              + [column(m) for m in methods if m != "batch_grad"])
    table = []
    for K in dict.fromkeys(r["K"] for r in rows):
        base = by.get((K, "batch_grad"), {}).get("median_s")
        line: list[Any] = [K, param_count(K), jax_device, precision, _fmt_time(base)]
        for m in methods:
            if m != "batch_grad":
                ratio = by.get((K, m), {}).get("ratio_to_batch_grad")
                line.append(None if ratio is None else float(ratio))
        table.append(line)
    return header, table


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def plot(rows: Sequence[dict[str, Any]], path: Any, title: str = "") -> None:
    """Log-log time per gradient against P (fitted slopes in the legend) and ratio to batch_grad."""
    fig, (ax, ax2) = _common.figure(ncols=2)
    fits = slopes(rows)
    style = {m: dict(marker=mk, color=f"C{i}", ls="--" if METHODS[m].kind == "python" else "-")
             for i, (m, mk) in enumerate(zip(METHODS, "os^vDX", strict=True))}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m and r["median_s"]]
        if not pts:
            continue
        P = [r["P"] for r in pts]
        fit = f"slope {fits[m]:.2f}" if np.isfinite(fits[m]) else "one point, no slope"
        ax.plot(P, [r["median_s"] for r in pts], **style[m], label=f"{METHODS[m].label}: {fit}")
        if m != "batch_grad":
            ax2.plot(P, [r["ratio_to_batch_grad"] for r in pts], **style[m])
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("parameter count P = 2HD + OH = 3K² (D = H = O = K)")
        top = a.secondary_xaxis(
            "top", functions=(lambda P: np.sqrt(np.maximum(P, 1e-12) / 3), lambda K: 3 * K**2)
        )
        top.set_xticks(sorted({r["K"] for r in rows}), minor=False)
        top.set_xticks([], minor=True)
        top.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        top.set_xlabel("K")
    ax.set_ylabel("time per gradient [s] (warm median)")
    ax.set_title("Time per gradient; legend: fitted log-log slope", fontsize=10)
    ax2.axhline(1.0, color="C0", lw=1.0)
    ax2.set_ylabel("time / time of batch_grad [ratio]")
    ax2.set_title("Slowdown relative to the manual batch_grad (= 1)", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    io.save_figure(path, fig, dpi=_common.DPI)


CSV_FIELDS = ["K", "P", "N", "method", "kind", "device", "dtype", "precision", "status",
              "median_s", "min_s", "first_call_s", "compile_s", "rounds", "calls_per_round",
              "ratio_to_batch_grad", "rel_err_vs_float64"]


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a README quotes: per-method slopes, ratios at the smallest and largest K."""
    fits = slopes(rows)
    ks = sorted({r["K"] for r in rows})
    ratios: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r["method"] != "batch_grad":
            ratios.setdefault(r["method"], {})[str(r["K"])] = r["ratio_to_batch_grad"]
    max_k = {}
    for m in fits:
        done = [r["K"] for r in rows if r["method"] == m and r["median_s"]]
        max_k[m] = max(done) if done else None
    errs = [r["rel_err_vs_float64"] for r in rows if r.get("rel_err_vs_float64") is not None]
    return {
        "device": {m: next(r.get("device") for r in rows if r["method"] == m) for m in fits},
        "precision": {m: next(r.get("precision") for r in rows if r["method"] == m)
                      for m in fits},
        "slopes": fits,
        "ratio_to_batch_grad": ratios,
        "median_s": {m: {str(r["K"]): r["median_s"] for r in rows if r["method"] == m}
                     for m in fits},
        "compile_s": {m: {str(r["K"]): r.get("compile_s") for r in rows if r["method"] == m}
                      for m in fits if METHODS[m].kind == "jax"},
        "largest_k_measured": max_k,
        "ks": ks,
        "max_rel_err_vs_float64": max(errs) if errs else None,
        "rel_err_vs_float64": {
            m: max((r["rel_err_vs_float64"] for r in rows
                    if r["method"] == m and r.get("rel_err_vs_float64") is not None),
                   default=None)
            for m in fits
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64],
                    help="K = D = H = O values (default 2 4 8 16 32 64)")
    ap.add_argument("--n", type=int, default=256, help="batch size N (default 256)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to time (default all)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the JAX methods (default float32; Python is float64)")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="stop a method once one call takes, or is predicted to take, "
                         "longer than this many seconds (default 2)")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="timed calls per point add up to at least this (default 0.2 s)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved timing rounds per point (default 5)")
    _common.add_precision_flag(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.n, args.budget, args.min_time, args.rounds = [2, 4], 16, 0.5, 0.01, 3
    if args.n < 1 or min(args.ks) < 1 or args.rounds < 1:
        ap.error("--n, --ks and --rounds must be >= 1")
    out = _common.out_dir(args.out)
    dtype = jnp.dtype(args.dtype)
    env = _common.environment(dtype, args.precision)
    print(f"{NAME}: N = {args.n}, dtype {env['dtype']}, precision {args.precision}, "
          f"device {env['device_label']} ({env['cpu_count']} CPUs), jax {env['jax_version']}")

    rows = run_bench(args.ks, args.n, args.methods, dtype=dtype, precision=args.precision,
                     seed=args.seed, budget_s=args.budget, min_time=args.min_time,
                     rounds=args.rounds)
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

    io.write_json(out / "config.json", {**vars(args), "out": str(args.out)})
    io.write_json(out / "metrics.json", {"environment": env, **summary})
    io.write_csv(out / "timings.csv", CSV_FIELDS, ([r.get(f) for f in CSV_FIELDS] for r in rows))
    io.write_csv(out / "ratios.csv", header, table)
    plot(rows, out / "bench_gradients.png",
         title=f"N = {args.n}, {env['dtype']}, precision {args.precision}, "
               f"{env['device_label']} ({env['cpu_count']} CPUs); Python on the host CPU")
    if args.docs is not None:
        _common.docs_copy(out / "bench_gradients.png", args.docs)
    print(f"wrote {out}/config.json, metrics.json, timings.csv, ratios.csv, bench_gradients.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
