"""How fast does training run? The compiled epoch loop against the ways one would write it.

Full-batch gradient descent p <- p - lr g, timed as users call it, in
interleaved rounds (_common.time_interleaved; compile time apart from the warm
median), each row naming its device and matmul precision:

(a) The homework's scale, K = D = H = O = 3, N = 100, float64, at 10 and at
    1000 epochs (--epochs):

      train          abc_jax.train: epochs compiled into lax.while_loop chunks
      jitted steps   a Python loop calling one jitted (loss, update) step per
                     epoch: the same loss and gradient over the whole batch
      plain Python   the homework's lists of lists, math.exp and hand loops,
                     on the host CPU whatever JAX's device

    Plain Python takes seconds per hundred epochs, so it runs --python-epochs
    epochs and its time is scaled linearly to the largest count (each epoch does
    the same work). All three trajectories are checked against each other.

(b) A large batch, K = 256, N = 65536, float32: train against the loop of
    jitted steps at 10 epochs (and 1000 on a GPU; --large-epochs).

The claim to check: train is at least as fast as the loop of jitted steps, at
few epochs and at many. Ratios come from one run in one process.

    python experiments/bench_train.py
    python experiments/bench_train.py --large-k 512 --large-n 131072 --large-epochs 10 100
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
from homework import py_gradient_descent, to_lists

import abc_jax
from abc_jax import init_params, train
from abc_jax.files import write_results

NAME = "bench_train"
LOOPS = {"train": "train (compiled loop)", "loop": "Python loop of jitted steps"}


def jitted_step(lr: float, precision: str) -> Any:
    """One epoch as one jitted call: (params, X) -> (loss before the update, new params).

    The loss and gradient train computes per epoch: ``batch_value_and_grad`` over the
    whole batch (train's chunk_size=None), at matmul ``precision``.
    """

    @jax.jit
    def step(params: Any, X: jax.Array) -> tuple[jax.Array, Any]:
        loss, grads = abc_jax.batch_value_and_grad(params, X, precision=precision)
        return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)

    return step


def python_loop_of_jitted_steps(step: Any, params: Any, X: jax.Array, epochs: int) -> Any:
    """The Python-loop way: one dispatch per epoch, losses left on device until the end."""
    losses = []
    for _ in range(epochs):
        loss, params = step(params, X)
        losses.append(loss)
    return jnp.stack(losses), params


def compare_loops(
    params: Any, X: jax.Array, lr: float, epochs: int, precision: str, *, rounds: int,
    min_time: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """train against the loop of jitted steps at ``epochs``, timed in interleaved rounds.

    Returns the two rows and the two outputs (TrainResult, (losses, params)).
    """
    step = jitted_step(lr, precision)
    fns = {
        "train": lambda: train(params, X, lr=lr, epochs=epochs, progress=False,
                               precision=precision),
        "loop": lambda: python_loop_of_jitted_steps(step, params, X, epochs),
    }
    times = _common.time_interleaved(fns, rounds=rounds, min_time=min_time)
    rows = [{"method": LOOPS[name], "device": _common.device_label(), "precision": precision,
             "epochs": epochs, "compile_s": t.compile_s, "run_s": t.median_s,
             "measured": f"median of {t.rounds} rounds x {t.calls_per_round}"}
            for name, t in times.items()]
    for r in rows:
        r["epochs_per_s"] = epochs / r["run_s"]
        r["times_train"] = r["run_s"] / times["train"].median_s
    return rows, {name: t.output for name, t in times.items()}


def _rel_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b))) if b.size else 0.0


def loop_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per epoch count: time of the loop of jitted steps / time of train (> 1: train faster)."""
    by = {(r["epochs"], r["method"]): r["run_s"] for r in rows}
    return {str(e): by[(e, LOOPS["loop"])] / by[(e, LOOPS["train"])]
            for e in dict.fromkeys(r["epochs"] for r in rows) if (e, LOOPS["loop"]) in by}


def homework_scale(epochs: Sequence[int], n: int, k: int, python_epochs: int, lr: float,
                   seed: int, precision: str, min_time: float = 0.5) -> dict[str, Any]:
    """(a): train vs the loop of jitted steps at each epoch count, and plain Python."""
    params = init_params(jax.random.key(seed), k, dtype=jnp.float64)
    X = jax.random.normal(jax.random.key(seed + 1), (n, k), jnp.float64)
    rows: list[dict[str, Any]] = []
    agree: dict[str, float] = {}
    ours = np.zeros(0)
    for e in epochs:
        part, outputs = compare_loops(params, X, lr, e, precision, rounds=5, min_time=min_time)
        rows += part
        ours = np.asarray(outputs["train"].losses)
        agree[f"jitted_steps_vs_train_{e}"] = _rel_diff(outputs["loop"][0], ours)
    e = max(epochs)  # ours: train's losses over e epochs
    A, B, C, Xl = to_lists(params, X)
    py = _common.time_interleaved(
        {"python": lambda: py_gradient_descent(A, B, C, Xl, lr, python_epochs)},
        rounds=1, min_time=0.0, warmup=0,
    )["python"]
    m = min(python_epochs, e)
    agree["plain_python_vs_train"] = _rel_diff(py.output[:m], ours[:m])
    py_scaled = py.median_s * e / python_epochs
    train_s = next(r["run_s"] for r in rows if r["epochs"] == e and r["method"] == LOOPS["train"])
    rows.append({"method": "plain Python (lists, math.exp)", "device": "host cpu (Python)",
                 "precision": None, "epochs": e, "compile_s": None, "run_s": py_scaled,
                 "measured": f"{python_epochs} epochs in {py.median_s:.3g} s, "
                             f"x{e / python_epochs:g}",
                 "epochs_per_s": e / py_scaled, "times_train": py_scaled / train_s})
    return {"K": k, "N": n, "epochs": list(epochs), "lr": lr, "dtype": "float64",
            "precision": precision, "python_epochs_timed": python_epochs, "rows": rows,
            "max_rel_loss_difference": agree,
            "speedup_vs_plain_python": py_scaled / train_s,
            "loop_over_train": loop_ratios(rows),
            "final_loss": float(ours[-1]), "initial_loss": float(ours[0])}


def large_scale(epochs: Sequence[int], n: int, k: int, lr: float, seed: int,
                precision: str) -> dict[str, Any]:
    """(b): train vs the loop of jitted steps on a large float32 batch."""
    params = init_params(jax.random.key(seed), k, dtype=jnp.float32)
    X = jax.random.normal(jax.random.key(seed + 1), (n, k), jnp.float32)
    rows: list[dict[str, Any]] = []
    losses = np.zeros(0)
    for e in epochs:
        part, outputs = compare_loops(params, X, lr, e, precision, rounds=3, min_time=0.0)
        rows += part
        losses = np.asarray(outputs["train"].losses)
    e = max(epochs)
    train_s = next(r["run_s"] for r in rows if r["epochs"] == e and r["method"] == LOOPS["train"])
    return {"K": k, "N": n, "epochs": list(epochs), "lr": lr, "dtype": "float32",
            "precision": precision, "rows": rows, "loop_over_train": loop_ratios(rows),
            "epochs_per_s": e / train_s,
            "flops_per_epoch": 14 * n * k * k,  # 7 N K^2 multiply-adds
            "initial_loss": float(losses[0]), "final_loss": float(losses[-1])}


COLUMNS = ["method", "device", "precision", "epochs", "compile s", "run s", "epochs/s",
           "x train", "measured"]
FIELDS = ["method", "device", "precision", "epochs", "compile_s", "run_s", "epochs_per_s",
          "times_train", "measured"]


def print_part(title: str, part: dict[str, Any]) -> None:
    print(f"\n{title}")
    _common.print_table(COLUMNS, [[r[f] for f in FIELDS] for r in part["rows"]],
                        floatfmt=".3g")
    for e, ratio in part["loop_over_train"].items():
        verdict = "at least as fast" if ratio >= 1 else "SLOWER than the loop"
        print(f"{e} epochs: loop of jitted steps / train = {ratio:.2f} (train {verdict})")


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 1000],
                    help="(a) epoch counts")
    ap.add_argument("--n", type=int, default=100, help="(a) samples")
    ap.add_argument("--k", type=int, default=3, help="(a) K = D = H = O")
    ap.add_argument("--python-epochs", type=int, default=100,
                    help="(a) epochs plain Python runs, scaled to the largest --epochs")
    ap.add_argument("--lr", type=float, default=0.1, help="(a) learning rate")
    ap.add_argument("--large-k", type=int, default=256, help="(b) K")
    ap.add_argument("--large-n", type=int, default=65536, help="(b) samples")
    ap.add_argument("--large-epochs", type=int, nargs="+", default=None,
                    help="(b) epoch counts (default 10 on a CPU, 10 1000 on a GPU)")
    _common.add_precision_flag(ap)
    args = ap.parse_args(argv)
    if args.large_epochs is None:
        args.large_epochs = [10, 1000] if jax.default_backend() == "gpu" else [10]
    if args.quick:
        args.epochs, args.python_epochs = [10, 100], 10
        args.large_k, args.large_n, args.large_epochs = 16, 512, [3]
    if min(*args.epochs, args.n, args.k, args.python_epochs, args.large_k, args.large_n,
           *args.large_epochs) < 1:
        ap.error("sizes and epoch counts must be >= 1")
    args.python_epochs = min(args.python_epochs, max(args.epochs))
    jax.config.update("jax_enable_x64", True)  # (a) runs in float64
    out = _common.out_dir(args.out)
    env = _common.environment(precision=args.precision)
    print(f"{NAME}: device {env['device_label']} ({env['cpu_count']} CPUs), jax "
          f"{env['jax_version']}, precision {args.precision}")

    small = homework_scale(args.epochs, args.n, args.k, args.python_epochs, args.lr, args.seed,
                           args.precision, min_time=0.05 if args.quick else 0.5)
    print_part(f"(a) homework scale: K = {small['K']}, N = {small['N']}, float64, "
               f"lr = {small['lr']:g}", small)
    print(f"plain Python ran {small['python_epochs_timed']} epochs on the host CPU; its time "
          f"is scaled linearly to {max(args.epochs)}; train is "
          f"{small['speedup_vs_plain_python']:.0f}x faster.")
    print("largest relative difference of the losses from train's: " + ", ".join(
        f"{k} {v:.1e}" for k, v in small["max_rel_loss_difference"].items()))

    large = large_scale(args.large_epochs, args.large_n, args.large_k, 1e-3, args.seed,
                        args.precision)
    print_part(f"(b) large batch: K = {large['K']}, N = {large['N']}, float32", large)
    print(f"train: {large['epochs_per_s']:.3g} epochs/s, "
          f"{large['epochs_per_s'] * large['flops_per_epoch'] / 1e9:.3g} GFLOP/s "
          "(14 N K^2 flops per epoch)")

    rows = ([name, part["K"], part["N"], part["dtype"], *(r[f] for f in FIELDS)]
            for name, part in (("homework", small), ("large", large)) for r in part["rows"])
    written = write_results(out, config=_common.config_of(args),
                            metrics={"environment": env, "homework_scale": small,
                                     "large_batch": large},
                            tables={NAME: (["part", "K", "N", "dtype", *FIELDS], rows)})
    print(f"wrote {out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
