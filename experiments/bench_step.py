"""How close is the manual batch gradient to the machine's matmul limit, and what do calls cost?

One process, float32, D = H = O = K, all on JAX's device:
1. Speed per (K, N) and matmul precision ("highest": exact float32; on a GPU also "default",
   TF32): interleaved median times of ``batch_grad`` as users call it, jitted ``jax.grad``, one
   (N, K) x (K, K) matmul (the faster output layout) and, apart, the naive vmap of outer
   products. A step is about 7 such matmuls (14 N K^2 flops): GFLOP/s and ratios.
2. Per-call cost at K = 3, N = 8: loops of 2,000 eager calls of batch_grad and
   batch_value_and_grad against the same loop of a bare ``jax.jit(jax.grad(...))`` of a
   plain-jnp loss, waited for at the end and after every call; target <= 1.3x.
3. Memory of the chunked gradient against the whole batch at once: XLA's compiled memory
   analysis (``temp_size_in_bytes``, scratch only), and times. --memory-n 0 skips it.
4. The default chunking, chunk_size="auto" (``core.backward.rows_per_chunk``), against the
   whole batch and every fixed size of --grid-chunks, per (K, N) of --grid: interleaved
   medians. The rule the default follows was read off this table."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax.edge import PRECISIONS
from experiments import common

NAME = "bench_step"


def bench_size(K: int, N: int, precision: str, *, rounds: int, min_time: float, seed: int) -> dict:
    """One row: times (s), GFLOP/s and ratios of batch_grad at (K, N) and ``precision``."""
    params, X = common.problem(jax.random.key(seed), N, K)
    jit = lambda f, *a: functools.partial(jax.jit(f), *a)  # noqa: E731
    naive = jit(lambda p, X: jax.tree.map(lambda g: g.mean(0), abc_jax.per_sample_grads(
        p, X, precision=precision)), params, X)
    fns = {"batch_grad": lambda: abc_jax.batch_grad(params, X, precision=precision),
           "jax_grad": jit(functools.partial(abc_jax.oracle_grad, precision=precision), params, X),
           "matmul_nk": jit(lambda X, A: jnp.matmul(X, A.T, precision=precision), X, params.A),
           "matmul_kn": jit(lambda X, A: jnp.matmul(A, X.T, precision=precision), X, params.A)}
    times = common.time_interleaved(fns, rounds=rounds, min_time=min_time)
    if N * K * K * 4 <= 2**31:  # timed apart: it streams N (K, K) matrices through memory
        times |= common.time_interleaved({"naive_vmap": naive}, rounds=rounds, min_time=min_time)
    row = dict(device=common.device_label(), precision=precision, dtype="float32", K=K, N=N,
               flops=14 * N * K * K, **{f"{name}_s": t.median_s for name, t in times.items()})
    b, mm = row["batch_grad_s"], min(row["matmul_nk_s"], row["matmul_kn_s"])
    row |= {"batch_grad_compile_s": times["batch_grad"].compile_s, "matmul_s": mm,
            "gflops": row["flops"] / b / 1e9, "ratio_jax_grad": b / row["jax_grad_s"],
            "ratio_7_matmuls": b / (7 * mm)}
    extra = {"naive_over_batch_grad": row["naive_vmap_s"] / b} if "naive_vmap_s" in row else {}
    return row | extra


def plain_loss(params: abc_jax.Params, X: jax.Array) -> jax.Array:
    """The homework's batch loss in plain jnp: what a bare ``jax.jit(jax.grad(...))`` runs."""
    Z = jax.nn.sigmoid(X @ params.A.T) + X @ params.B.T
    return jnp.mean(jnp.sum((Z @ params.C.T) ** 2, axis=1))


def _loop(fn: Any, params: Any, X: Any, calls: int, wait_each: bool) -> Any:
    out = None
    for _ in range(calls):
        out = fn(params, X)
        if wait_each:
            jax.block_until_ready(out)
    return jax.block_until_ready(out)


def bench_overhead(K: int, N: int, *, rounds: int, calls: int, seed: int) -> list[dict]:
    """Loops of ``calls`` eager calls of the public function against the same loop of a bare
    ``jax.jit(jax.grad(plain loss))`` (``value_and_grad`` for batch_value_and_grad), waited
    for at the end (JAX's async dispatch) or after every call; interleaved rounds, medians."""
    params, X = common.problem(jax.random.key(seed), N, K)
    bare = {"batch_grad": jax.jit(jax.grad(plain_loss)),
            "batch_value_and_grad": jax.jit(jax.value_and_grad(plain_loss))}
    rows = []
    for wait_each in (False, True):
        fns = {f"{kind}{name}": lambda f=f, w=wait_each: _loop(f, params, X, calls, w)
               for name, b in bare.items()
               for kind, f in (("", getattr(abc_jax, name)), ("bare ", b))}
        times = common.time_interleaved(fns, rounds=rounds, min_time=0.0, warmup=1)
        for name in bare:
            p, j = times[name].median_s, times[f"bare {name}"].median_s
            rows.append(dict(device=common.device_label(), K=K, N=N, calls=calls,
                             waited="every call" if wait_each else "at the end",
                             function=name, public_us=p / calls * 1e6, bare_us=j / calls * 1e6,
                             ratio=p / j))
    return rows


def temp_bytes(params: abc_jax.Params, N: int, K: int, chunk_size: int) -> int:
    """Scratch bytes XLA reserves for one batch_grad over (N, K) in chunks of chunk_size rows."""
    grad = jax.jit(lambda p, X: abc_jax.batch_grad(p, X, chunk_size=chunk_size))
    compiled = grad.lower(params, jax.ShapeDtypeStruct((N, K), jnp.float32)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def bench_memory(N: int, K: int, chunk: int, seed: int) -> dict[str, Any]:
    """Scratch memory and time of batch_grad over N rows in chunks of ``chunk`` rows and at once."""
    params, X = common.problem(jax.random.key(seed), N, K)
    sizes = {"chunked": chunk, "unchunked": N}
    t = common.time_interleaved({name: lambda c=c: abc_jax.batch_grad(params, X, chunk_size=c)
                                  for name, c in sizes.items()}, rounds=3, min_time=0.0)
    errs = abc_jax.grad_errors(t["chunked"].output, t["unchunked"].output)
    c_s, u_s = t["chunked"].median_s, t["unchunked"].median_s  # chunked, unchunked
    return {"device": common.device_label(), "precision": "highest", "N": N, "K": K,
            "chunk_size": chunk, "X_bytes": N * K * 4,
            "counter": "XLA compiled memory analysis, temp_size_in_bytes",
            **{f"{name}_temp_bytes": temp_bytes(params, N, K, c) for name, c in sizes.items()},
            "chunked_s": c_s, "unchunked_s": u_s, "time_ratio": c_s / u_s,
            "max_rel_diff": max(e["rel"] for e in errs.values())}


def bench_chunking(K: int, N: int, chunks: Sequence[int], *, rounds: int, min_time: float,
                   seed: int) -> dict[str, Any]:
    """batch_grad at chunk_size "auto", None (the whole batch) and each fixed size below N,
    interleaved: the times, auto's rows, and auto's time over the whole batch's and over the
    best fixed size's."""
    params, X = common.problem(jax.random.key(seed), N, K)
    sizes = {"auto": "auto", "whole": None, **{str(c): c for c in chunks if c < N}}
    t = common.time_interleaved({k: lambda c=c: abc_jax.batch_grad(params, X, chunk_size=c)
                                 for k, c in sizes.items()}, rounds=rounds, min_time=min_time)
    fixed = {k: v.median_s for k, v in t.items() if k not in ("auto", "whole")}
    best = min(fixed, key=fixed.get) if fixed else None
    rows = abc_jax.core.backward.rows_per_chunk("auto", params, abc_jax.Batch(X))
    auto, whole = t["auto"].median_s, t["whole"].median_s
    return {"device": common.device_label(), "K": K, "N": N, "auto_rows": rows,
            "auto_s": auto, "whole_s": whole, "best_fixed": None if best is None else int(best),
            "best_fixed_s": None if best is None else fixed[best],
            "auto_over_whole": auto / whole,
            "auto_over_best": None if best is None else auto / min(fixed[best], whole)}


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = [s.lower().split("x") for s in text.split(",") if s]
    if not sizes or not all(len(s) == 2 and all(v.isdigit() and int(v) for v in s) for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must look like 64x4096,256x65536; got {text!r}")
    return [(int(k), int(n)) for k, n in sizes]


def _sizes(text: str) -> str:
    """A KxN list flag, checked (``_parse_sizes``) and kept as written."""
    _parse_sizes(text)
    return text


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes, timing and memory settings; ``QUICK``: the --quick values."""

    sizes: str = common.flag("64x4096,256x65536,1024x8192", "KxN list", type=_sizes)
    repeats: int = common.flag(7, "interleaved timing rounds")
    min_time: float = common.flag(0.2, "timed s per method and size")
    overhead: str = common.flag("3x8", "KxN list for the per-call overhead table", type=_sizes)
    memory_n: int = common.flag(1_000_000, "N for the chunked-memory measurement (0 skips it)")
    memory_k: int = common.flag(256, "K for the memory measurement")
    chunk_size: int = common.flag(65536, "rows per chunk there")
    grid: str = common.flag("16x1024,16x8192,16x65536,64x1024,64x8192,64x65536,256x1024,"
                            "256x8192,256x65536,1024x1024,1024x8192",
                            "KxN list for the chunking table (4.; empty skips it)",
                            type=lambda t: t and _sizes(t))
    grid_chunks: tuple[int, ...] = common.flag((1024, 2048, 4096, 8192),
                                               "fixed chunk sizes the chunking table tries")
    precisions: tuple[str, ...] | None = common.flag(
        None, "matmul precisions (default: highest, and default on a GPU)", choices=PRECISIONS)
    seed: int = common.flag(0, "random seed")
    overhead_calls: int = 2000  # eager calls per timed loop
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(self.repeats >= 1 and self.memory_n >= 0 and self.chunk_size >= 1,
                     "--repeats and --chunk-size must be >= 1, --memory-n >= 0")


QUICK = Config(sizes="16x256", repeats=3, min_time=0.01, memory_n=8192, memory_k=16,
               chunk_size=1024, overhead_calls=200, grid="16x2048", grid_chunks=(512,),
               quick=True)


TABLE = [("batch_grad ms", "batch_grad_s", 1e3), ("jax.grad ms", "jax_grad_s", 1e3),
         ("7 matmul ms", "matmul_s", 7e3), ("GFLOP/s", "gflops", 1.0),  # (header, key, scale)
         ("/jax.grad", "ratio_jax_grad", 1.0), ("/7mm", "ratio_7_matmuls", 1.0),
         ("naive/bg", "naive_over_batch_grad", 1.0)]
RATIOS = {"jax_grad_s": ("jax.grad (jit)", "o"), "naive_vmap_s": ("vmap outer products", "s"),
          "matmul_s": ("7 x (N,K)@(K,K) matmul (faster layout)", "D")}  # key: (label, marker)
OVERHEAD = "device K N calls waited function public_us bare_us ratio".split()
CHUNKING = ("K N auto_rows auto_s whole_s best_fixed best_fixed_s auto_over_whole "
            "auto_over_best").split()


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of the speed table (ms, ratios); None where a method did not run."""
    header = ["device", "precision", "K", "N", *(h for h, _, _ in TABLE)]
    return header, [[r["device"], r["precision"], r["K"], r["N"],
                     *(float(r[k] * s) if k in r else None for _, k, s in TABLE)] for r in rows]


def time_ratio(row: dict[str, Any], key: str) -> float | None:
    """batch_grad's time over method ``key``'s (7 matmuls for "matmul_s"); None if not run."""
    scale = 7 if key == "matmul_s" else 1
    return row["batch_grad_s"] / (scale * row[key]) if key in row else None


def plot(rows: Sequence[dict[str, Any]]) -> Any:
    """Dots on a ratio axis: batch_grad's time over each method's, per size and precision, each
    on a stem from the line at 1 (below it batch_grad is faster); x: a method not run there."""
    fig, ax = common.figure(width=7.5, height=4.4)
    x, n, missing = np.arange(len(rows)), len(RATIOS), []
    for i, (key, (label, marker)) in enumerate(RATIOS.items()):
        xs = x + (i - (n - 1) / 2) * 0.22
        pts = [(xi, v) for xi, r in zip(xs, rows, strict=True) if (v := time_ratio(r, key))]
        missing += [xi for xi, r in zip(xs, rows, strict=True) if time_ratio(r, key) is None]
        if pts:
            px, pv = np.array(pts).T
            ax.vlines(px, 1.0, pv, color=f"C{i}", lw=2, alpha=0.5)
            ax.plot(px, pv, marker, color=f"C{i}", ms=7, ls="none", label=label)
            for xi, v in pts:
                ax.annotate(f"{v:.3g}x", (xi, v), xytext=(5, 0), textcoords="offset points",
                            fontsize=7, va="center")
    ax.axhline(1.0, color="0.2", lw=1.2, label="1 (as fast as batch_grad)")
    if missing:  # on the line at 1, where no ratio exists
        ax.plot(missing, [1.0] * len(missing), "x", color="0.4", ms=8, mew=1.5, ls="none",
                label="not run (N K² too large to stream)")
        for xi in missing:
            ax.annotate("not run", (xi, 1.0), xytext=(0, 9), textcoords="offset points",
                        fontsize=7, color="0.4", ha="center", va="bottom", rotation=90)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.5), max(hi, 2.0))  # 1 well inside, both sides shown
    ax.set_xlim(-0.6, len(rows) - 0.3)
    ax.set_xticks(x, [f"K={r['K']}\nN={r['N']}\n{r['precision']}" for r in rows])
    ax.set(ylabel="batch_grad time / method's time (log)\n< 1: batch_grad faster",
           title=f"Batch gradient against each method, float32, on {rows[0]['device']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """1. speed per size and precision, 2. per-call cost, 3. memory (unless memory_n is 0)."""
    precisions = tuple(cfg.precisions or common.precisions_to_time())
    env = common.environment(jnp.float32)
    sizes, overhead_sizes = _parse_sizes(cfg.sizes), _parse_sizes(cfg.overhead)
    rows = [bench_size(K, N, p, rounds=cfg.repeats, min_time=cfg.min_time, seed=cfg.seed)
            for K, N in common.progress(sizes, desc="sizes") for p in precisions]
    overhead = [r for K, N in overhead_sizes for r in bench_overhead(
        K, N, rounds=cfg.repeats, calls=cfg.overhead_calls, seed=cfg.seed)]
    res = {"config": dataclasses.asdict(cfg) | {"sizes": sizes, "overhead": overhead_sizes,
                                                "precisions": precisions},
           "environment": env, "precisions": precisions, "precisions_given": bool(cfg.precisions),
           "sizes": rows, "overhead": overhead}
    if cfg.memory_n:
        res["memory"] = bench_memory(cfg.memory_n, cfg.memory_k, cfg.chunk_size, cfg.seed)
    if cfg.grid:
        grid = [bench_chunking(K, N, cfg.grid_chunks, rounds=3, min_time=cfg.min_time,
                               seed=cfg.seed)
                for K, N in common.progress(_parse_sizes(cfg.grid), desc="chunking")]
        res["chunking"] = grid
        res["chunking_worst_auto_over_whole"] = max(r["auto_over_whole"] for r in grid)
    return res


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the three tables; write config.json, metrics.json, bench_step.csv, overhead.csv
    and bench_step.png."""
    cfg, env, rows, precisions = (res[k] for k in ("config", "environment", "sizes",
                                                   "precisions"))
    print(f"{NAME}: device {env['device_label']} x{env['device_count']}, jax "
          f"{env['jax_version']}, float32, precisions {', '.join(precisions)}")
    if jax.default_backend() != "gpu" and not res["precisions_given"]:
        print("(a CPU computes the same products at every precision: only 'highest' is timed)")
    if cfg["quick"]:
        print("--quick: a smoke run of few rounds at tiny sizes, not a measurement: the tables "
              "below show that the code runs, not how fast")
    common.print_table(*table_rows(rows), floatfmt=".3g")
    print("\nper-call cost: a loop of eager calls of the public function vs the same loop of a "
          "bare jax.jit(jax.grad(plain-jnp loss)), us per call, median of rounds; target <= 1.3x")
    over = (OVERHEAD, [[r[k] for k in OVERHEAD] for r in res["overhead"]])
    common.print_table(*over)
    if m := res.get("memory"):
        print(f"memory on {m['device']}, N={m['N']} K={m['K']} float32 (X itself "
              f"{m['X_bytes'] / 1e6:.3g} MB), {m['counter']}: chunked ({m['chunk_size']} rows) "
              f"{m['chunked_temp_bytes'] / 1e6:.3g} MB, unchunked "
              f"{m['unchunked_temp_bytes'] / 1e6:.3g} MB; time chunked/unchunked "
              f"{m['time_ratio']:.2f}; max rel diff {m['max_rel_diff']:.1e}")
    tables = {}
    if grid := res.get("chunking"):
        chunking = (CHUNKING, [[r[k] for k in CHUNKING] for r in grid])
        print("\nchunk_size='auto' against the whole batch and the best fixed size "
              "(batch_grad, float32, median of interleaved rounds; auto_rows None: the whole "
              "batch)")
        common.print_table(*chunking, floatfmt=".3g")
        print(f"auto is at most {res['chunking_worst_auto_over_whole']:.3f}x the whole batch's "
              "time over this grid")
        tables["chunking"] = chunking
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg,
        metrics={k: v for k, v in res.items() if k != "config"}, figures={NAME: plot(rows)},
        tables={NAME: (columns, [[r.get(k) for k in columns] for r in rows]), "overhead": over,
                **tables})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
