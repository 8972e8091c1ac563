"""How fast does training run? The compiled epoch loop against the ways one would write it.

Full-batch gradient descent p <- p - lr g, timed as users call it, in interleaved rounds
(common.time_interleaved; compile time apart from the warm median), each row naming its
device and matmul precision, all in one process:
(a) The homework's scale, K = D = H = O = 3, N = 100, float64, at 1, 10 and 1000 epochs:
    train (abc_jax.train: epochs compiled into lax.while_loop chunks), jitted steps (a Python
    loop of one jitted (loss, update) step per epoch over the whole batch) and plain Python
    (the homework's lists, math.exp and loops, on the host CPU; --python-epochs epochs, time
    scaled linearly to the largest count). The three trajectories are checked to agree.
    At few epochs this is the fixed cost of a call to train: its time over the loop's, and
    the milliseconds it adds.
(b) A large batch, K = 256, N = 65536, float32: train against the loop of jitted steps at 10
    epochs (and 1000 on a GPU; --large-epochs).
(c) Held-out evaluation every epoch, at (a)'s scale and largest epoch count up to 100: train
    with eval_data (N held-out rows, evaluated inside the compiled loop) against train without.
The claims: a call to train costs little (10 epochs at most 2x the loop of jitted steps, one
epoch at most 0.5 ms over one jitted step), train is faster than the loop at many epochs, and
evaluating every epoch costs well under twice a run without evaluation."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax import train
from abc_jax.edge import PRECISIONS
from experiments import common
from experiments.common.homework import py_gradient_descent, to_lists

NAME = "bench_train"
LOOPS = {"train": "train (compiled loop)", "loop": "Python loop of jitted steps"}
PYTHON = "plain Python (lists, math.exp)"
FIELDS = "method device precision epochs compile_s run_s epochs_per_s times_train measured".split()


@dataclasses.dataclass(frozen=True)
class Config:
    """(a) the homework's scale and (b) a large batch; ``QUICK``: the --quick values."""

    epochs: tuple[int, ...] = common.flag((1, 10, 1000), "(a) epochs")
    n: int = common.flag(100, "(a) samples")
    k: int = common.flag(3, "(a) K = D = H = O")
    python_epochs: int = common.flag(100, "(a) epochs plain Python runs")
    lr: float = common.flag(0.1, "(a) learning rate")
    large_k: int = common.flag(256, "(b) K")
    large_n: int = common.flag(65536, "(b) samples")
    large_epochs: tuple[int, ...] | None = common.flag(
        None, "(b) epoch counts (default 10 on a CPU, 10 1000 on a GPU)")
    precision: str = common.flag("highest", common.cli.PRECISION_HELP, choices=PRECISIONS)
    seed: int = common.flag(0, "random seed")
    min_time: float = 0.5  # (a) timed seconds per point
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(min(*self.epochs, self.n, self.k, self.python_epochs, self.large_k,
                         self.large_n, *(self.large_epochs or (1,))) >= 1,
                     "sizes and epoch counts must be >= 1")


QUICK = Config(epochs=(1, 10, 100), python_epochs=10, large_k=16, large_n=512, large_epochs=(3,),
               min_time=0.05, quick=True)


def compare_loops(params: Any, X: jax.Array, lr: float, epochs: int, precision: str, *,
                  rounds: int, min_time: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """train against a Python loop of one jitted step per epoch (``batch_value_and_grad`` over
    the whole batch, p - lr g), interleaved: two rows, outputs (TrainResult, (losses, params))."""

    @jax.jit
    def step(params: Any, X: jax.Array) -> tuple[jax.Array, Any]:
        loss, grads = abc_jax.batch_value_and_grad(params, X, precision=precision)
        return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)

    def loop() -> tuple[jax.Array, Any]:
        p, losses = params, []
        for _ in range(epochs):
            loss, p = step(p, X)
            losses.append(loss)
        return jnp.stack(losses), p

    times = common.time_interleaved({"train": lambda: train(
        params, X, lr=lr, epochs=epochs, progress=False, precision=precision), "loop": loop},
        rounds=rounds, min_time=min_time)
    rows = [{"method": LOOPS[name], "device": common.device_label(), "precision": precision,
             "epochs": epochs, "compile_s": t.compile_s, "run_s": t.median_s,
             "measured": f"median of {t.rounds} rounds x {t.calls_per_round}",
             "epochs_per_s": epochs / t.median_s,
             "times_train": t.median_s / times["train"].median_s} for name, t in times.items()]
    return rows, {name: t.output for name, t in times.items()}


def _rel_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.subtract(a, b, dtype=float) / np.asarray(b, float)), initial=0))


def loop_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per epoch count: time of the loop of jitted steps / time of train (> 1: train faster)."""
    by = {(r["epochs"], r["method"]): r["run_s"] for r in rows}
    return {str(e): by[(e, LOOPS["loop"])] / by[(e, LOOPS["train"])]
            for e in dict.fromkeys(r["epochs"] for r in rows) if (e, LOOPS["loop"]) in by}


def call_cost(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per epoch count: train's time over the loop of jitted steps' (the fixed cost of a call,
    at few epochs), and the milliseconds train adds to it."""
    by = {(r["epochs"], r["method"]): r["run_s"] for r in rows}
    return {str(e): {"train_over_loop": by[(e, LOOPS["train"])] / by[(e, LOOPS["loop"])],
                     "extra_ms": 1e3 * (by[(e, LOOPS["train"])] - by[(e, LOOPS["loop"])])}
            for e in dict.fromkeys(r["epochs"] for r in rows) if (e, LOOPS["loop"]) in by}


def bench_part(epochs: Sequence[int], n: int, k: int, lr: float, seed: int, precision: str,
               dtype: Any, rounds: int, min_time: float, python_epochs: int = 0) -> dict:
    """train vs the loop of jitted steps at each epoch count, both trajectories compared; and
    with ``python_epochs`` the homework's plain Python for that many epochs, its time scaled
    linearly to the largest count (each epoch does the same work)."""
    params, X = common.problem(jax.random.key(seed), n, k, dtype=dtype)
    rows, agree, e = [], {}, max(epochs)
    for ep in epochs:
        part, outs = compare_loops(params, X, lr, ep, precision, rounds=rounds, min_time=min_time)
        rows += part
        ours = np.asarray(outs["train"].losses)  # at the end: over e epochs
        agree[f"jitted_steps_vs_train_{ep}"] = _rel_diff(outs["loop"][0], ours)
    train_s = next(r["run_s"] for r in rows if r["epochs"] == e and r["method"] == LOOPS["train"])
    out = {"K": k, "N": n, "epochs": list(epochs), "lr": lr, "dtype": jnp.dtype(dtype).name,
           "precision": precision, "rows": rows, "epochs_per_s": e / train_s,
           "flops_per_epoch": 14 * n * k * k, "max_rel_loss_difference": agree,  # 7 N K^2 FMA
           "initial_loss": float(ours[0]), "final_loss": float(ours[-1])}
    if python_epochs:
        py = common.time_interleaved({"python": lambda: py_gradient_descent(
            *to_lists(params, X), lr, python_epochs)}, rounds=1, min_time=0.0, warmup=0)["python"]
        agree["plain_python_vs_train"] = _rel_diff(py.output[:e], ours[:python_epochs])
        py_s = py.median_s * e / python_epochs
        rows.append({"method": PYTHON, "device": "host cpu (Python)",
                     "precision": None, "epochs": e, "compile_s": None, "run_s": py_s, "measured":
                     f"{python_epochs} epochs in {py.median_s:.3g} s, x{e / python_epochs:g}",
                     "epochs_per_s": e / py_s, "times_train": py_s / train_s})
        out |= {"python_epochs_timed": python_epochs, "speedup_vs_plain_python": py_s / train_s}
    return out | {"loop_over_train": loop_ratios(rows), "call_cost": call_cost(rows)}


def bench_evaluation(n: int, k: int, lr: float, epochs: int, seed: int, precision: str, *,
                     rounds: int, min_time: float) -> dict[str, Any]:
    """train with held-out data evaluated every epoch (n rows; eval_every=1) against train
    without, interleaved, float64: both times and their ratio."""
    params, X = common.problem(jax.random.key(seed), n, k, dtype=jnp.float64)
    held = jax.random.normal(jax.random.key(seed + 7), (n, k), jnp.float64)
    kw = dict(lr=lr, epochs=epochs, progress=False, precision=precision)
    times = common.time_interleaved(
        {"without": lambda: train(params, X, **kw),
         "every epoch": lambda: train(params, X, eval_data=held, eval_every=1, **kw)},
        rounds=rounds, min_time=min_time)
    evaluated = times["every epoch"].output
    assert len(evaluated.eval_epochs) == epochs + 1  # epoch 0 .. epochs: each one evaluated
    return {"K": k, "N": n, "N_eval": n, "epochs": epochs,
            "without_s": times["without"].median_s,
            "every_epoch_s": times["every epoch"].median_s,
            "ratio": times["every epoch"].median_s / times["without"].median_s,
            "measured": f"median of {times['without'].rounds} rounds x "
                        f"{times['without'].calls_per_round}"}


def print_part(title: str, part: dict[str, Any], note: str) -> None:
    print(f"\n{title}")
    common.print_table([*FIELDS[:4], "compile s", "run s", "epochs/s", "x train", "measured"],
                        [[r[f] for f in FIELDS] for r in part["rows"]], floatfmt=".3g")
    for e, ratio in part["loop_over_train"].items():
        print(f"{e} epoch{'s' * (e != '1')}: loop of jitted steps / train = {ratio:.2f} (train "
              f"{'at least as fast' if ratio >= 1 else 'SLOWER than the loop'})")
    print(note)


def plot(parts: dict[str, dict[str, Any]]) -> Any:
    """Per part, a panel: epochs per second of each method at each epoch count (a log axis
    where they span more than a decade)."""
    fig, axes = common.figure(ncols=len(parts), width=4.6, height=3.6)
    methods = [*LOOPS.values(), PYTHON]  # the order within an epoch count, and the colours
    for ax, (title, part) in zip(np.atleast_1d(axes), parts.items(), strict=True):
        rows = sorted(part["rows"], key=lambda r: (r["epochs"], methods.index(r["method"])))
        y = np.arange(len(rows))[::-1]
        for yi, r in zip(y, rows, strict=True):
            v = r["epochs_per_s"]
            ax.plot(v, yi, "o", ms=8, color=f"C{methods.index(r['method'])}")
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (v, yi), xytext=(0, 7),
                        textcoords="offset points", fontsize=7, ha="center")
        ax.set_yticks(y, [f"{r['method']}\n{r['epochs']} epochs" for r in rows], fontsize=7)
        values = [r["epochs_per_s"] for r in rows]
        wide = max(values) > 10 * min(values)  # a log axis only where the values span decades
        ax.set(xscale="log" if wide else "linear", ylim=(-0.7, len(rows) - 0.3),
               xlabel="epochs per second" + (" (log)" if wide else ""),
               title=f"{title}: K = {part['K']}, N = {part['N']}, {part['dtype']}")
        if not wide:
            ax.set_xlim(0, 1.2 * max(values))
        else:
            ax.margins(x=0.15)
    precision = next(iter(parts.values()))["precision"]
    fig.suptitle(f"Full-batch gradient descent on {common.device_label()} (precision "
                 f"{precision}; plain Python on the host CPU)", fontsize=10)
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """Both parts, timed: (a) in float64, (b) in float32."""
    jax.config.update("jax_enable_x64", True)  # (a) runs in float64
    large_epochs = cfg.large_epochs or ((10, 1000) if jax.default_backend() == "gpu" else (10,))
    python_epochs = min(cfg.python_epochs, max(cfg.epochs))
    env = common.environment(precision=cfg.precision)
    small = bench_part(cfg.epochs, cfg.n, cfg.k, cfg.lr, cfg.seed, cfg.precision,
                       jnp.float64, rounds=5, min_time=cfg.min_time, python_epochs=python_epochs)
    large = bench_part(large_epochs, cfg.large_n, cfg.large_k, 1e-3, cfg.seed,
                       cfg.precision, jnp.float32, rounds=3, min_time=0.0)
    evaluation = bench_evaluation(cfg.n, cfg.k, cfg.lr, min(max(cfg.epochs), 100), cfg.seed,
                                  cfg.precision, rounds=7, min_time=cfg.min_time)
    return {"config": dataclasses.asdict(cfg) | {"python_epochs": python_epochs,
                                                 "large_epochs": large_epochs},
            "environment": env, "homework_scale": small, "large_batch": large,
            "evaluation": evaluation}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print both parts' tables; write config.json, metrics.json, bench_train.csv and
    bench_train.png (epochs per second)."""
    cfg, env = res["config"], res["environment"]
    small, large = res["homework_scale"], res["large_batch"]
    print(f"{NAME}: device {env['device_label']} ({env['cpu_count']} CPUs), jax "
          f"{env['jax_version']}, precision {cfg['precision']}")
    print_part(f"(a) homework scale: K = {cfg['k']}, N = {cfg['n']}, float64, lr = {cfg['lr']:g}",
               small, f"plain Python ran {small['python_epochs_timed']} epochs on the host "
               f"CPU; its time is scaled linearly to {max(cfg['epochs'])}; train is "
               f"{small['speedup_vs_plain_python']:.0f}x faster.")
    print("the cost of a call: " + "; ".join(
        f"{e} epoch{'s' * (e != '1')}: train {c['train_over_loop']:.2f}x the loop "
        f"({c['extra_ms']:+.3f} ms)" for e, c in small["call_cost"].items()))
    print("largest relative difference of the losses from train's: " + ", ".join(
        f"{k} {v:.1e}" for k, v in small["max_rel_loss_difference"].items()))
    print_part(f"(b) large batch: K = {cfg['large_k']}, N = {cfg['large_n']}, float32", large,
               f"train: {large['epochs_per_s']:.3g} epochs/s, "
               f"{large['epochs_per_s'] * large['flops_per_epoch'] / 1e9:.3g} GFLOP/s "
               "(14 N K^2 flops per epoch)")
    ev = res["evaluation"]
    print(f"\n(c) held-out evaluation every epoch: K = {ev['K']}, N = {ev['N']}, "
          f"{ev['N_eval']} held-out rows, {ev['epochs']} epochs: {ev['every_epoch_s'] * 1e3:.3g} "
          f"ms against {ev['without_s'] * 1e3:.3g} ms without, {ev['ratio']:.2f}x "
          f"({ev['measured']})")
    rows = [[name, part["K"], part["N"], part["dtype"], *(r[f] for f in FIELDS)]
            for name, part in (("homework", small), ("large", large)) for r in part["rows"]]
    fig = plot({"(a) homework scale": small, "(b) large batch": large})
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg,
        metrics={k: v for k, v in res.items() if k != "config"},
        tables={NAME: (["part", "K", "N", "dtype", *FIELDS], rows)}, figures={NAME: fig})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
