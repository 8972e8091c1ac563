"""How close is the manual batch gradient to the machine's matmul limit?

One process, one run, float32. For each (K, N) (D = H = O = K): the median time
of ``batch_grad`` as users call it, of jitted ``jax.grad`` of the batch loss, of
the naive vmap-of-outer-products-then-mean, and of one (N, K) x (K, K) matmul
(the faster of its two output layouts, (N, K) and (K, N)).
A gradient step is about 7 such matmuls (14 N K^2 flops). Prints achieved
GFLOP/s and the ratios to jax.grad and to 7 matmuls and, when torch is
importable, to PyTorch eager autograd of the same loss. Then the chunked
gradient's memory: peak resident memory above the already-resident X
(VmHWM after writing 5 to /proc/self/clear_refs), chunked vs unchunked.

    python experiments/bench_step.py                       # default sizes
    python experiments/bench_step.py --sizes 64x4096 --memory-n 0
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import abc_jax
from abc_jax import io
from abc_jax.model import _forward

DEFAULT_SIZES = "64x4096,256x65536,1024x8192"


def time_median(fn: Callable[[], Any], repeats: int, min_time: float = 0.2) -> float:
    """Median seconds of ``fn()`` (outputs blocked on), after one warm-up call."""
    return time_interleaved({"fn": fn}, repeats, min_time)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, min_time: float = 0.2
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Each function is compiled and warmed up, then every round times each of them in turn
    (a loop of calls lasting about ``min_time / repeats``, blocked on at the
    end), so a drift in the machine's speed hits all of them alike.
    """
    inner = {}
    for name, fn in fns.items():
        for _ in range(2):  # compile; batch_grad's first call on an X also reads its flag
            jax.block_until_ready(fn())
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < min_time / 2:  # warm up
            jax.block_until_ready(fn())
            calls += 1
        once = max((time.perf_counter() - t0) / calls, 1e-7)
        inner[name] = max(1, int(min_time / repeats / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def naive_grad(params: abc_jax.Params, X: jax.Array) -> abc_jax.Params:
    """vmap of per-sample outer products, then the mean: O(N H D) memory."""
    return jax.tree.map(lambda g: g.mean(0), abc_jax.per_sample_grads(params, X))


def torch_step(K: int, N: int, seed: int) -> Callable[[], Any] | None:
    """PyTorch eager autograd of the same batch loss, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    g = torch.Generator().manual_seed(seed)
    A, B, C = (torch.randn(K, K, generator=g, requires_grad=True) for _ in range(3))
    X = torch.randn(N, K, generator=g)

    def step() -> Any:
        W = (torch.sigmoid(X @ A.T) + X @ B.T) @ C.T
        L = (W * W).sum(1).mean()
        return torch.autograd.grad(L, (A, B, C))

    return step


def bench_size(K: int, N: int, repeats: int, seed: int) -> dict[str, Any]:
    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, K, dtype=jnp.float32)
    X = jax.random.normal(kx, (N, K), jnp.float32)
    oracle = jax.jit(jax.grad(lambda p, X: jnp.mean(jax.vmap(_forward, (None, 0))(p, X)[0])))
    matmul_nk = jax.jit(lambda X, A: X @ A.T)  # (N, K) x (K, K) -> (N, K)
    matmul_kn = jax.jit(lambda X, A: A @ X.T)  # the same product, output (K, N)
    naive = jax.jit(naive_grad)
    row: dict[str, Any] = {"K": K, "N": N, "flops": 14 * N * K * K}
    fns = {
        "batch_grad_s": lambda: abc_jax.batch_grad(params, X),
        "jax_grad_s": lambda: oracle(params, X),
        "matmul_nk_s": lambda: matmul_nk(X, params.A),
        "matmul_kn_s": lambda: matmul_kn(X, params.A),
    }
    row.update(time_interleaved(fns, repeats))
    # The limit is the faster layout of the same product (XLA:CPU runs them at
    # different speeds); batch_grad keeps its activations feature-major, (K, N).
    row["matmul_s"] = min(row["matmul_nk_s"], row["matmul_kn_s"])
    # Timed apart: the naive form streams N per-sample (K, K) matrices through
    # memory, evicting the others' data from the caches.
    if N * K * K * 4 <= 2**31:
        row["naive_vmap_s"] = time_median(lambda: naive(params, X), repeats)
    step = torch_step(K, N, seed)
    if step is not None:  # timed apart: torch's idle threads spin and would slow XLA's
        import torch

        row["torch_eager_s"] = time_median(step, repeats)
        row["torch_threads"] = torch.get_num_threads()
    b = row["batch_grad_s"]
    row["gflops"] = row["flops"] / b / 1e9
    row["ratio_jax_grad"] = b / row["jax_grad_s"]
    row["ratio_7_matmuls"] = b / (7 * row["matmul_s"])
    if "naive_vmap_s" in row:
        row["naive_over_batch_grad"] = row["naive_vmap_s"] / b
    if "torch_eager_s" in row:
        row["ratio_torch"] = b / row["torch_eager_s"]
    return row


def _rss_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_above_resident(fn: Callable[[], Any]) -> float:
    """Peak resident bytes reached by fn() above what is resident before it."""
    gc.collect()
    _reset_hwm()
    base = _rss_hwm_bytes()
    jax.block_until_ready(fn())
    return float(_rss_hwm_bytes() - base)


def bench_memory(N: int, K: int, chunk: int, seed: int) -> dict[str, Any]:
    """Peak memory and time of batch_grad over N rows, chunked vs not.

    Each variant is compiled and run once before it is measured, so the peak
    counts the gradient's working memory, not the compiler's.
    """
    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, K, dtype=jnp.float32)
    X = jax.random.normal(kx, (N, K), jnp.float32)
    jax.block_until_ready(X)
    out: dict[str, Any] = {"N": N, "K": K, "chunk_size": chunk, "X_bytes": N * K * 4}
    for name, kw in (("chunked", {"chunk_size": chunk}), ("unchunked", {})):
        jax.block_until_ready(abc_jax.batch_grad(params, X, **kw))  # compile, warm
        def call(kw: dict[str, Any] = kw) -> Any:
            return abc_jax.batch_grad(params, X, **kw)

        out[f"{name}_peak_bytes"] = peak_above_resident(call)
        out[f"{name}_s"] = time_median(call, 3, 0.0)
    g1 = abc_jax.batch_grad(params, X, chunk_size=chunk)
    g2 = abc_jax.batch_grad(params, X)
    out["max_rel_diff"] = max(e["rel"] for e in abc_jax.grad_errors(g1, g2).values())
    out["time_ratio"] = out["chunked_s"] / out["unchunked_s"]
    return out


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
        assert sizes and all(len(s) == 2 and min(s) > 0 for s in sizes)
    except (ValueError, AssertionError):
        msg = f"sizes must look like 64x4096,256x65536; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return sizes  # type: ignore[return-value]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table: times in ms and the ratios (batch_grad over the others)."""

    def ms(r: dict[str, Any], k: str, scale: int = 1) -> str:
        return f"{r[k] * scale * 1e3:9.2f}" if k in r else f"{'-':>9}"

    lines = [
        f"{'K':>5} {'N':>7} {'batch_grad':>10} {'jax.grad':>9} {'7 matmul':>9} {'torch':>9} "
        f"{'GFLOP/s':>8} {'/jax.grad':>9} {'/7mm':>6} {'/torch':>7} {'naive/bg':>8}   (ms)"
    ]
    for r in rows:
        lines.append(
            f"{r['K']:5d} {r['N']:7d} {ms(r, 'batch_grad_s'):>10} {ms(r, 'jax_grad_s')} "
            f"{ms(r, 'matmul_s', 7)} {ms(r, 'torch_eager_s')} {r['gflops']:8.1f} "
            f"{r['ratio_jax_grad']:9.2f} {r['ratio_7_matmuls']:6.2f} "
            f"{r.get('ratio_torch', float('nan')):7.2f} "
            f"{r.get('naive_over_batch_grad', float('nan')):8.1f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [
        ("batch_grad_s", "batch_grad (manual)"),
        ("jax_grad_s", "jax.grad (jit)"),
        ("torch_eager_s", "PyTorch eager"),
        ("naive_vmap_s", "vmap outer products"),
    ]
    methods = [m for m in methods if any(m[0] in r for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(methods) + 1)
    x = np.arange(len(rows))
    for i, (key, label) in enumerate(methods):
        ax.bar(x + i * width, [r.get(key, np.nan) * 1e3 for r in rows], width, label=label)
    ax.bar(
        x + len(methods) * width, [7 * r["matmul_s"] * 1e3 for r in rows], width,
        label="7 x (N,K)@(K,K) matmul (faster layout)", color="0.6",
    )
    ax.set_xticks(x + width * len(methods) / 2, [f"K={r['K']}\nN={r['N']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time per gradient (ms, log scale)")
    ax.set_title(f"Batch gradient, float32, {jax.devices()[0].device_kind}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    io.save_figure(path, fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes(DEFAULT_SIZES),
                    help=f"KxN list (default {DEFAULT_SIZES})")
    ap.add_argument("--repeats", type=int, default=7, help="timed samples per method")
    ap.add_argument("--memory-n", type=int, default=1_000_000,
                    help="N for the chunked-memory measurement (0 skips it)")
    ap.add_argument("--memory-k", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_step")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and memory check, seconds (for tests)")
    ap.add_argument("--docs", default=None, help="also copy the bar chart into this folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [(16, 256), (24, 512)], 3
        args.memory_n, args.memory_k, args.chunk_size = 20_000, 16, 3_000

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}")
    rows = [bench_size(K, N, args.repeats, args.seed)
            for K, N in tqdm(args.sizes, desc="sizes", leave=False)]
    print(format_table(rows))
    metrics: dict[str, Any] = {
        "device": f"{dev.platform} {dev.device_kind}",
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "dtype": "float32",
        "sizes": rows,
    }
    if args.memory_n:
        m = bench_memory(args.memory_n, args.memory_k, args.chunk_size, args.seed)
        metrics["memory"] = m
        print(f"memory, N={m['N']} K={m['K']} float32 (X itself {m['X_bytes'] / 1e9:.2f} GB): "
              f"peak above resident X: chunked ({m['chunk_size']}) "
              f"{m['chunked_peak_bytes'] / 1e9:.2f} GB, unchunked "
              f"{m['unchunked_peak_bytes'] / 1e9:.2f} GB; time chunked/unchunked "
              f"{m['time_ratio']:.2f}; max rel diff {m['max_rel_diff']:.1e}")
    io.write_json(f"{args.out}/config.json", dict(vars(args), sizes=[list(s) for s in args.sizes]))
    io.write_json(f"{args.out}/metrics.json", metrics)
    columns = list(rows[0])
    io.write_csv(f"{args.out}/bench_step.csv", columns, ([r.get(k) for k in columns] for r in rows))
    plot(rows, f"{args.out}/bench_step.png")
    if args.docs:
        plot(rows, f"{args.docs}/bench_step.png")
    print(f"wrote {args.out}/metrics.json, bench_step.csv, bench_step.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
