"""Timing: one helper (``time_interleaved``), a compile clock, and the gradient methods timed
against each other (bench_gradients, reproduce_seed)."""

from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from experiments.common import homework
from experiments.common.problems import problem
from experiments.common.results import device_label, progress


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
