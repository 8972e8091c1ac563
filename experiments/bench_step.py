"""How close is the manual batch gradient to the machine's matmul limit?

One process, float32, D = H = O = K, everything on the device JAX runs on. For
each (K, N) and each matmul precision timed (on a GPU "highest", exact float32,
and "default", which lets it use TF32; on a CPU every precision computes the
same float32 products, so only "highest"): the median time of ``batch_grad`` as
users call it, of jitted ``jax.grad`` of the batch loss and of one
(N, K) x (K, K) matmul (the faster of its two output layouts, (N, K) and
(K, N)), in interleaved rounds; then, timed apart, the naive
vmap-of-outer-products-then-mean and, when torch is importable, PyTorch eager
autograd of the same loss on the same device (CUDA for a GPU) with TF32
allowed exactly when the JAX precision allows it. A gradient step is about 7
such matmuls (14 N K^2 flops). Prints achieved GFLOP/s and the ratios.

Then the chunked gradient's memory against the whole batch at once (above the
already-resident X): on a GPU by the device's own counter (peak_bytes_in_use,
each variant in a fresh process, since a peak cannot be reset); on a CPU by
the host's peak resident memory (VmHWM, reset by writing 5 to
/proc/self/clear_refs).

    python experiments/bench_step.py                       # default sizes
    python experiments/bench_step.py --sizes 64x4096 --memory-n 0
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax import files as io
from abc_jax.validation import PRECISIONS

NAME = "bench_step"
HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "64x4096,256x65536,1024x8192"


def jit_at(precision: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(f)`` with its matrix products traced at matmul ``precision``."""

    def at_precision(*args: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return f(*args)

    return jax.jit(at_precision)


def naive_grad(params: abc_jax.Params, X: jax.Array, precision: str) -> abc_jax.Params:
    """vmap of per-sample outer products, then the mean: O(N H D) memory."""
    per_sample = abc_jax.per_sample_grads(params, X, precision=precision)
    return jax.tree.map(lambda g: g.mean(0), per_sample)


def torch_step(K: int, N: int, seed: int, device: str, precision: str) -> Callable[[], Any]:
    """PyTorch eager autograd of the same batch loss on ``device``, float32, with
    ``torch.backends.cuda.matmul.allow_tf32`` matched to the JAX ``precision``."""
    import torch

    tf32 = _common.torch_allow_tf32(precision)
    g = torch.Generator().manual_seed(seed)
    A, B, C = (torch.randn(K, K, generator=g).to(device).requires_grad_() for _ in range(3))
    X = torch.randn(N, K, generator=g).to(device)

    def step() -> Any:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # read when each product runs
        W = (torch.sigmoid(X @ A.T) + X @ B.T) @ C.T
        L = (W * W).sum(1).mean()
        return torch.autograd.grad(L, (A, B, C))

    return step


def bench_size(
    K: int, N: int, precision: str, *, rounds: int, min_time: float, seed: int,
    torch_device: str | None,
) -> dict[str, Any]:
    """One row: times (s), GFLOP/s and ratios of batch_grad at (K, N) and ``precision``."""
    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, K, dtype=jnp.float32)
    X = jax.random.normal(kx, (N, K), jnp.float32)
    oracle = jax.jit(lambda p, X: abc_jax.oracle_grad(p, X, precision=precision))
    matmul_nk = jit_at(precision, lambda X, A: X @ A.T)  # (N, K) x (K, K) -> (N, K)
    matmul_kn = jit_at(precision, lambda X, A: A @ X.T)  # the same product, output (K, N)
    naive = jax.jit(naive_grad, static_argnums=2)
    row: dict[str, Any] = {"device": _common.device_label(), "precision": precision,
                           "dtype": "float32", "K": K, "N": N, "flops": 14 * N * K * K}
    fns = {
        "batch_grad": lambda: abc_jax.batch_grad(params, X, precision=precision),
        "jax_grad": lambda: oracle(params, X),
        "matmul_nk": lambda: matmul_nk(X, params.A),
        "matmul_kn": lambda: matmul_kn(X, params.A),
    }
    times = _common.time_interleaved(fns, rounds=rounds, min_time=min_time)
    row.update({f"{name}_s": t.median_s for name, t in times.items()})
    row["batch_grad_compile_s"] = times["batch_grad"].compile_s
    # The limit is the faster layout of the same product (XLA:CPU runs them at
    # different speeds); batch_grad keeps its activations feature-major, (K, N).
    row["matmul_s"] = min(row["matmul_nk_s"], row["matmul_kn_s"])
    # Timed apart: the naive form streams N per-sample (K, K) matrices through
    # memory, evicting the others' data from the caches.
    if N * K * K * 4 <= 2**31:
        t = _common.time_interleaved({"naive": lambda: naive(params, X, precision)},
                                     rounds=rounds, min_time=min_time)
        row["naive_vmap_s"] = t["naive"].median_s
    row["torch_device"] = torch_device
    if torch_device is not None:
        try:
            row["torch_allow_tf32"] = _common.torch_allow_tf32(precision)
        except ValueError as err:
            row["torch_device"], row["torch_skipped"] = None, str(err)
    if row["torch_device"] is not None:
        # timed apart: torch's idle CPU threads spin and would slow XLA's
        import torch

        step = torch_step(K, N, seed, torch_device, precision)
        t = _common.time_interleaved({"torch": step}, rounds=rounds, min_time=min_time)
        row["torch_eager_s"] = t["torch"].median_s
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


# -- per-call overhead ----------------------------------------------------------------


def bench_overhead(K: int, N: int, *, rounds: int, min_time: float, seed: int) -> list[dict]:
    """What abc_jax's checks cost per call, where the computation itself is tiny.

    Each public function as users call it (validated, value-checked: it reads
    its all-finite flag) against the bare jitted computation it runs, both
    waited for after every call, in interleaved rounds; the fastest round of
    each (as ``timeit`` reports: at tens of microseconds a busy machine's
    noise only ever adds time), and the medians too. Two ways of calling:
    the same arrays again (a benchmark loop), and new params every call (a
    training loop: each call's values are new to the check).
    """
    from abc_jax.model import _batch_loss

    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, K, dtype=jnp.float32)
    X = jax.random.normal(kx, (N, K), jnp.float32)
    steps = [jax.tree.map(lambda p, i=i: p * (1 + 1e-3 * i), params) for i in range(8)]
    bare_grad = jit_at("highest", jax.grad(_batch_loss))
    bare_loss = jit_at("highest", _batch_loss)
    bare_per_sample = jit_at("highest", jax.vmap(jax.grad(lambda p, x: _batch_loss(p, x[None])),
                                                 in_axes=(None, 0)))
    pairs = {
        "batch_grad": (abc_jax.batch_grad, bare_grad),
        "oracle_grad": (abc_jax.oracle_grad, bare_grad),
        "batch_loss": (abc_jax.batch_loss, bare_loss),
        "per_sample_grads": (abc_jax.per_sample_grads, bare_per_sample),
    }
    rows = []
    for calling in ("same arrays", "new params"):
        fns: dict[str, Callable[[], Any]] = {}
        for name, (public, bare) in pairs.items():
            if calling == "same arrays":
                fns[name] = lambda f=public: jax.block_until_ready(f(params, X))
                fns["bare " + name] = lambda f=bare: jax.block_until_ready(f(params, X))
            else:
                it = iter(range(1 << 62))
                fns[name] = lambda f=public, it=it: jax.block_until_ready(
                    f(steps[next(it) % 8], X))
                fns["bare " + name] = lambda f=bare, it=it: jax.block_until_ready(
                    f(steps[next(it) % 8], X))
        times = _common.time_interleaved(fns, rounds=rounds, min_time=min_time)
        for name in pairs:
            rows.append({
                "device": _common.device_label(), "K": K, "N": N, "calling": calling,
                "function": name, "public_us": times[name].min_s * 1e6,
                "bare_us": times["bare " + name].min_s * 1e6,
                "ratio": times[name].min_s / times["bare " + name].min_s,
                "ratio_of_medians": times[name].median_s / times["bare " + name].median_s,
            })
    return rows


# -- memory --------------------------------------------------------------------------


def memory_problem(N: int, K: int, seed: int) -> tuple[abc_jax.Params, jax.Array]:
    """Params and an X (N, K) float32 made on the host, so X's creation leaves no
    temporary peak on the device."""
    params = abc_jax.init_params(jax.random.key(seed), K, dtype=jnp.float32)
    X = np.random.default_rng(seed).standard_normal((N, K), dtype=np.float32)
    return params, _common.wait(jax.device_put(X))


def _rss_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def host_peak_above_resident(fn: Callable[[], Any]) -> float:
    """Peak resident bytes of this process reached by fn() above what is resident before."""
    gc.collect()
    _reset_hwm()
    base = _rss_hwm_bytes()
    _common.wait(fn())
    return float(_rss_hwm_bytes() - base)


def _memory_stats() -> dict[str, int]:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        raise RuntimeError(f"{_common.device_label()} reports no memory counters")
    return stats


def device_peak(N: int, K: int, chunk_size: int, seed: int) -> dict[str, Any]:
    """Device bytes one ``batch_grad`` needs above the resident X, by the device's counters.

    Meant for a fresh process (``in_fresh_process``): the peak cannot be reset. The
    gradient is compiled ahead of time before X is placed, then run once;
    ``compile_peak_bytes`` is the peak compilation (autotuning) alone reached. If it is
    not below the run's peak, the figure is an upper bound (``upper_bound``).
    """
    params = abc_jax.init_params(jax.random.key(seed), K, dtype=jnp.float32)
    grad = jax.jit(lambda p, X: abc_jax.batch_grad(p, X, chunk_size=chunk_size))
    compiled = grad.lower(params, jax.ShapeDtypeStruct((N, K), jnp.float32)).compile()
    compile_peak = _memory_stats()["peak_bytes_in_use"]
    _, X = memory_problem(N, K, seed)
    resident = _memory_stats()["bytes_in_use"]
    _common.wait(compiled(params, X))
    peak = _memory_stats()["peak_bytes_in_use"]
    return {"peak_above_resident": peak - resident, "resident_bytes": resident,
            "compile_peak_bytes": compile_peak, "upper_bound": compile_peak >= peak}


def in_fresh_process(function: str, *args: Any, timeout: float = 600) -> Any:
    """``bench_step.<function>(*args)`` run in a new Python process; its JSON result.

    The child allocates device memory on demand (no preallocation), since this
    process already holds its own share of the device.
    """
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_step; "
            f"print(json.dumps(bench_step.{function}(*{list(args)!r})))")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in a fresh process:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_memory(N: int, K: int, chunk: int, seed: int, rounds: int = 3) -> dict[str, Any]:
    """Peak memory above the resident X, and time, of batch_grad over N rows: chunked
    (``chunk_size=chunk``) vs unchunked (``chunk_size=N``: the whole batch at once; None
    would let abc_jax pick cache-sized chunks on a CPU).

    On a GPU each variant runs in a fresh process and is read from the device's
    ``peak_bytes_in_use``; on a CPU, the host's VmHWM after a compiled, warm call.
    """
    on_gpu = jax.default_backend() == "gpu"
    params, X = memory_problem(N, K, seed)
    out: dict[str, Any] = {
        "device": _common.device_label(), "precision": "highest", "N": N, "K": K,
        "chunk_size": chunk, "X_bytes": N * K * 4,
        "counter": ("device peak_bytes_in_use, a fresh process per variant" if on_gpu
                    else "host peak resident memory (VmHWM), reset before each variant"),
    }
    sizes = {"chunked": chunk, "unchunked": N}
    calls = {name: (lambda c=c: abc_jax.batch_grad(params, X, chunk_size=c))
             for name, c in sizes.items()}
    for name, c in sizes.items():
        if on_gpu:
            r = in_fresh_process("device_peak", N, K, c, seed)
            out[f"{name}_peak_bytes"] = float(r["peak_above_resident"])
            out[f"{name}_compile_peak_bytes"] = float(r["compile_peak_bytes"])
            out[f"{name}_upper_bound"] = bool(r["upper_bound"])
        else:
            _common.wait(calls[name]())  # compile and warm: the peak is the gradient's
            out[f"{name}_peak_bytes"] = host_peak_above_resident(calls[name])
    t = _common.time_interleaved(calls, rounds=rounds, min_time=0.0)
    out["chunked_s"], out["unchunked_s"] = t["chunked"].median_s, t["unchunked"].median_s
    errs = abc_jax.grad_errors(t["chunked"].output, t["unchunked"].output)
    out["max_rel_diff"] = max(e["rel"] for e in errs.values())
    out["time_ratio"] = out["chunked_s"] / out["unchunked_s"]
    return out


def memory_line(m: dict[str, Any]) -> str:
    """The printed memory result, naming the counter it was read from."""
    bound = " (upper bounds: compilation peaked higher)" if (
        m.get("chunked_upper_bound") or m.get("unchunked_upper_bound")) else ""
    return (f"memory on {m['device']}, N={m['N']} K={m['K']} float32 (X itself "
            f"{m['X_bytes'] / 1e9:.2f} GB), {m['counter']}, above the resident X: chunked "
            f"({m['chunk_size']} rows) {m['chunked_peak_bytes'] / 1e9:.3g} GB, unchunked "
            f"{m['unchunked_peak_bytes'] / 1e9:.3g} GB{bound}; time chunked/unchunked "
            f"{m['time_ratio']:.2f}; max rel diff {m['max_rel_diff']:.1e}")


# -- output --------------------------------------------------------------------------


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
        assert sizes and all(len(s) == 2 and min(s) > 0 for s in sizes)
    except (ValueError, AssertionError):
        msg = f"sizes must look like 64x4096,256x65536; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return sizes  # type: ignore[return-value]


TABLE = [  # (header, row key, scale): times in ms
    ("batch_grad ms", "batch_grad_s", 1e3), ("jax.grad ms", "jax_grad_s", 1e3),
    ("7 matmul ms", "matmul_s", 7e3), ("torch ms", "torch_eager_s", 1e3),
    ("GFLOP/s", "gflops", 1.0), ("/jax.grad", "ratio_jax_grad", 1.0),
    ("/7mm", "ratio_7_matmuls", 1.0), ("/torch", "ratio_torch", 1.0),
    ("naive/bg", "naive_over_batch_grad", 1.0),
]


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of the terminal table: device, precision, K, N, times in ms and the
    ratios (batch_grad over the others); None where a method did not run."""
    header = ["device", "precision", "K", "N", *(h for h, _, _ in TABLE)]
    cells = [[r["device"], r["precision"], r["K"], r["N"],
              *(float(r[k] * s) if k in r else None for _, k, s in TABLE)] for r in rows]
    return header, cells


def plot(rows: Sequence[dict[str, Any]], path: Any) -> None:
    methods = [
        ("batch_grad_s", "batch_grad (manual)"),
        ("jax_grad_s", "jax.grad (jit)"),
        ("torch_eager_s", "PyTorch eager (same device)"),
        ("naive_vmap_s", "vmap outer products"),
    ]
    methods = [m for m in methods if any(m[0] in r for r in rows)]
    fig, ax = _common.figure(width=7.5, height=4.2)
    width = 0.8 / (len(methods) + 1)
    x = np.arange(len(rows))
    for i, (key, label) in enumerate(methods):
        ax.bar(x + i * width, [r.get(key, np.nan) * 1e3 for r in rows], width, label=label)
    ax.bar(
        x + len(methods) * width, [7 * r["matmul_s"] * 1e3 for r in rows], width,
        label="7 x (N,K)@(K,K) matmul (faster layout)", color="0.6",
    )
    ax.set_xticks(x + width * len(methods) / 2,
                  [f"K={r['K']}\nN={r['N']}\n{r['precision']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time per gradient (ms, log scale)")
    ax.set_title(f"Batch gradient, float32, all on {rows[0]['device']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    io.save_figure(path, fig, dpi=_common.DPI)


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes(DEFAULT_SIZES),
                    help=f"KxN list (default {DEFAULT_SIZES})")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                    help="matmul precisions to time (default: highest and default on a GPU, "
                         "highest on a CPU)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="timed seconds per method and size, about (default 0.2)")
    ap.add_argument("--memory-n", type=int, default=1_000_000,
                    help="N for the chunked-memory measurement (0 skips it)")
    ap.add_argument("--memory-k", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--overhead", type=_parse_sizes, default=_parse_sizes("3x8"),
                    help="KxN list for the per-call overhead table (default 3x8)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.min_time, args.overhead = [(16, 256)], 3, 0.02, []
        args.memory_n, args.memory_k, args.chunk_size = 20_000, 16, 3_000
    if args.repeats < 1 or args.memory_n < 0 or args.chunk_size < 1:
        ap.error("--repeats and --chunk-size must be >= 1, --memory-n >= 0")
    precisions = tuple(args.precisions or _common.precisions_to_time())
    out = _common.out_dir(args.out)
    env = _common.environment(jnp.float32)
    print(f"{NAME}: device {env['device_label']} x{env['device_count']}, jax "
          f"{env['jax_version']}, float32, precisions {', '.join(precisions)}")
    if jax.default_backend() != "gpu" and args.precisions is None:
        print(f"({_common.CPU_PRECISION_NOTE})")
    torch_dev, why = _common.torch_device()
    print(f"PyTorch: {torch_dev} (the device JAX runs on)" if torch_dev
          else f"PyTorch: not timed ({why})")

    jobs = [(K, N, p) for K, N in args.sizes for p in precisions]
    rows = [bench_size(K, N, p, rounds=args.repeats, min_time=args.min_time, seed=args.seed,
                       torch_device=torch_dev)
            for K, N, p in _common.progress(jobs, desc="sizes")]
    header, cells = table_rows(rows)
    _common.print_table(header, cells, floatfmt=".3g")
    metrics: dict[str, Any] = {"environment": env, "precisions": list(precisions),
                               "torch_device": torch_dev, "torch_not_timed": why or None,
                               "sizes": rows}
    overhead = [r for K, N in args.overhead
                for r in bench_overhead(K, N, rounds=args.repeats, min_time=4 * args.min_time,
                                        seed=args.seed)]
    metrics["overhead"] = overhead
    if overhead:
        print("per-call overhead: the public function (validated, value-checked) vs the bare "
              "jitted computation, each waited for; us of the fastest round")
        _common.print_table(
            ["device", "K", "N", "calling", "function", "public us", "bare us", "ratio",
             "ratio of medians"],
            [[r["device"], r["K"], r["N"], r["calling"], r["function"], r["public_us"],
              r["bare_us"], r["ratio"], r["ratio_of_medians"]] for r in overhead],
            floatfmt=".3g")
    if args.memory_n:
        m = bench_memory(args.memory_n, args.memory_k, args.chunk_size, args.seed)
        metrics["memory"] = m
        print(memory_line(m))
    io.write_json(out / "config.json",
                  dict(vars(args), out=str(args.out), docs=args.docs and str(args.docs),
                       sizes=[list(s) for s in args.sizes], precisions=list(precisions)))
    io.write_json(out / "metrics.json", metrics)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    io.write_csv(out / "bench_step.csv", columns, ([r.get(k) for k in columns] for r in rows))
    plot(rows, out / "bench_step.png")
    if args.docs is not None:
        _common.docs_copy(out / "bench_step.png", args.docs)
    print(f"wrote {out}/config.json, metrics.json, bench_step.csv, bench_step.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
