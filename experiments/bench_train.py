"""How fast does training run? The compiled epoch loop against the ways one would write it.

(a) The homework's scale, K = D = H = O = 3, N = 100, 1000 epochs of
    p <- p - lr g on the full batch, float64, three ways:

      train          epochs in lax.scan chunks, compiled once
      jitted steps   a Python loop calling one jitted (loss, update) step per epoch
      plain Python   the homework's lists of lists, math.exp and hand loops

    Plain Python takes seconds per hundred epochs, so it runs --python-epochs
    epochs and its time is scaled linearly to the full count (each epoch does
    the same work). All three trajectories are checked against each other.

(b) A large batch, K = 256, N = 65536, float32, a few epochs: epochs per
    second of train and of the loop of jitted steps.

Compile time (first call minus a warm call) is reported apart from the warm
run time. Ratios come from one run in one process.

    python experiments/bench_train.py
    python experiments/bench_train.py --large-k 512 --large-n 131072 --large-epochs 20
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
from bench_gradients import py_gradient_descent, time_call, to_lists  # enables float64

from abc_jax import init_params, io
from abc_jax.backward import _value_and_grad
from abc_jax.training import train

NAME = "bench_train"


def jitted_step(lr: float) -> Any:
    """One epoch as one jitted call: (params, X) -> (loss before the update, new params)."""

    @jax.jit
    def step(params: Any, X: jax.Array) -> tuple[jax.Array, Any]:
        loss, grads = _value_and_grad(params, X)
        return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)

    return step


def python_loop_of_jitted_steps(step: Any, params: Any, X: jax.Array, epochs: int) -> Any:
    """The Python-loop way: one dispatch per epoch, losses left on device until the end."""
    losses = []
    for _ in range(epochs):
        loss, params = step(params, X)
        losses.append(loss)
    return jnp.stack(losses), params


def homework_scale(epochs: int, n: int, k: int, python_epochs: int, lr: float,
                   seed: int) -> dict[str, Any]:
    params = init_params(jax.random.key(seed), k, dtype=jnp.float64)
    X = jax.random.normal(jax.random.key(seed + 1), (n, k), jnp.float64)
    per_chunk = min(epochs, 1000)

    compiled = time_call(
        lambda: train(params, X, lr=lr, epochs=epochs, progress=False,
                      epochs_per_chunk=per_chunk),
        min_time=0.5, min_repeats=5,
    )
    step = jitted_step(lr)
    loop = time_call(lambda: python_loop_of_jitted_steps(step, params, X, epochs),
                     min_time=0.5, min_repeats=3)

    A, B, C, Xl = to_lists(params, X)
    t0 = time.perf_counter()
    py_losses = py_gradient_descent(A, B, C, Xl, lr, python_epochs)
    py_seconds = time.perf_counter() - t0
    py_scaled = py_seconds * epochs / python_epochs

    ours = np.asarray(compiled["output"].losses)
    theirs = np.asarray(loop["output"][0])
    m = min(python_epochs, epochs)
    agree = {
        "jitted_steps_vs_train": float(np.max(np.abs(theirs - ours) / np.abs(ours))),
        "plain_python_vs_train": float(
            np.max(np.abs(np.asarray(py_losses[:m]) - ours[:m]) / np.abs(ours[:m]))
        ),
    }
    train_s, loop_s = compiled["median_s"], loop["median_s"]
    # first call = trace + compile + one run; the step's first call also runs one epoch
    rows = [
        {"method": "train (lax.scan)", "compile_s": compiled["first_s"] - train_s,
         "run_s": train_s, "measured": f"{epochs} epochs, median of {compiled['repeats']}"},
        {"method": "Python loop of jitted steps", "compile_s": loop["first_s"] - loop_s,
         "run_s": loop_s, "measured": f"{epochs} epochs, median of {loop['repeats']}"},
        {"method": "plain Python (lists, math.exp)", "compile_s": None, "run_s": py_scaled,
         "measured": f"{python_epochs} epochs in {py_seconds:.3g} s, x{epochs / python_epochs:g}"},
    ]
    for r in rows:
        r["epochs_per_s"] = epochs / r["run_s"]
        r["times_train"] = r["run_s"] / train_s
    return {"K": k, "N": n, "epochs": epochs, "lr": lr, "dtype": "float64",
            "python_epochs_timed": python_epochs, "rows": rows,
            "max_rel_loss_difference": agree,
            "speedup_vs_plain_python": py_scaled / train_s,
            "speedup_vs_jitted_steps": loop_s / train_s,
            "final_loss": float(ours[-1]), "initial_loss": float(ours[0])}


def large_scale(epochs: int, n: int, k: int, lr: float, seed: int) -> dict[str, Any]:
    params = init_params(jax.random.key(seed), k, dtype=jnp.float32)
    X = jax.random.normal(jax.random.key(seed + 1), (n, k), jnp.float32)
    # one warm call each (time_call repeats once when the first call is slow)
    compiled = time_call(
        lambda: train(params, X, lr=lr, epochs=epochs, progress=False, epochs_per_chunk=epochs),
        min_time=0.0, min_repeats=1,
    )
    step = jitted_step(lr)
    loop = time_call(lambda: python_loop_of_jitted_steps(step, params, X, epochs),
                     min_time=0.0, min_repeats=1)
    rows = [
        {"method": name, "compile_s": t["first_s"] - t["median_s"], "run_s": t["median_s"],
         "measured": f"{epochs} epochs, median of {t['repeats']}"}
        for name, t in (("train (lax.scan)", compiled), ("Python loop of jitted steps", loop))
    ]
    for r in rows:
        r["epochs_per_s"] = epochs / r["run_s"]
        r["times_train"] = r["run_s"] / compiled["median_s"]
    losses = np.asarray(compiled["output"].losses)
    return {"K": k, "N": n, "epochs": epochs, "lr": lr, "dtype": "float32", "rows": rows,
            "epochs_per_s": epochs / compiled["median_s"],
            "flops_per_epoch": 14 * n * k * k,  # 7 N K^2 multiply-adds
            "initial_loss": float(losses[0]), "final_loss": float(losses[-1])}


def print_part(title: str, part: dict[str, Any]) -> None:
    print(f"\n{title}")
    _common.print_table(
        ["method", "compile s", "run s", "epochs/s", "x train", "measured"],
        [[r["method"], r["compile_s"], r["run_s"], r["epochs_per_s"], r["times_train"],
          r["measured"]] for r in part["rows"]],
        floatfmt=".3g",
    )


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--epochs", type=int, default=1000, help="(a) epochs (default 1000)")
    ap.add_argument("--n", type=int, default=100, help="(a) samples (default 100)")
    ap.add_argument("--k", type=int, default=3, help="(a) K = D = H = O (default 3)")
    ap.add_argument("--python-epochs", type=int, default=100,
                    help="(a) epochs plain Python runs, scaled to --epochs (default 100)")
    ap.add_argument("--lr", type=float, default=0.1, help="(a) learning rate (default 0.1)")
    ap.add_argument("--large-k", type=int, default=256, help="(b) K (default 256)")
    ap.add_argument("--large-n", type=int, default=65536, help="(b) samples (default 65536)")
    ap.add_argument("--large-epochs", type=int, default=10, help="(b) epochs (default 10)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.python_epochs = 100, 10
        args.large_k, args.large_n, args.large_epochs = 16, 512, 3
    if min(args.epochs, args.n, args.k, args.python_epochs, args.large_k, args.large_n,
           args.large_epochs) < 1:
        ap.error("sizes and epoch counts must be >= 1")
    args.python_epochs = min(args.python_epochs, args.epochs)
    out = _common.out_dir(args.out)
    env = _common.environment()
    print(f"{NAME}: {env['device']} ({env['cpu_count']} CPUs), jax {env['jax_version']}")

    small = homework_scale(args.epochs, args.n, args.k, args.python_epochs, args.lr, args.seed)
    print_part(f"(a) homework scale: K = {small['K']}, N = {small['N']}, {small['epochs']} "
               f"epochs, float64, lr = {small['lr']:g}", small)
    print(f"plain Python ran {small['python_epochs_timed']} epochs; its time is scaled "
          f"linearly to {small['epochs']}.")
    print(f"train is {small['speedup_vs_plain_python']:.0f}x faster than plain Python and "
          f"{small['speedup_vs_jitted_steps']:.1f}x faster than the loop of jitted steps.")
    print("largest relative difference of the losses from train's: " + ", ".join(
        f"{k} {v:.1e}" for k, v in small["max_rel_loss_difference"].items()))

    large = large_scale(args.large_epochs, args.large_n, args.large_k, 1e-3, args.seed)
    print_part(f"(b) large batch: K = {large['K']}, N = {large['N']}, {large['epochs']} "
               "epochs, float32", large)
    print(f"train: {large['epochs_per_s']:.3g} epochs/s, "
          f"{large['epochs_per_s'] * large['flops_per_epoch'] / 1e9:.3g} GFLOP/s "
          "(14 N K^2 flops per epoch)")

    io.write_json(out / "config.json", {**vars(args), "out": str(args.out)})
    io.write_json(out / "metrics.json", {"environment": env, "homework_scale": small,
                                         "large_batch": large})
    print(f"wrote {out}/config.json, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
