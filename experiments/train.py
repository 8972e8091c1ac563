"""Train the ABC model on your own samples (or synthetic ones) and save the results.

    python experiments/train.py --data X.csv --epochs 2000 --lr 0.05 --optimizer adam
    python experiments/train.py --n 4096 --in-dim 16 --hidden-dim 32 --out-dim 8

Writes into --out (default results/train): config.json, metrics.json,
losses.csv, loss.png and params.npz (arrays A, B, C); the checkpoint lives in
--out/checkpoint/, so running the same command again resumes (and a finished
run returns at once); other settings with the same --out are refused (pass
another --out, or --restart to discard the checkpoint). metrics.json gives
compile_seconds apart from epochs_per_second. A bad data file is reported in
one line on stderr, exit code 2.

Several processes (one per host, JAX's multi-controller runtime) train on
the rows they each read: start one process per host with the same flags and
its own --process-id and --data (H:P: host and port of process 0),

    python experiments/train.py --data X0.npy --coordinator H:P --num-processes 2 --process-id 0
    python experiments/train.py --data X1.npy --coordinator H:P --num-processes 2 --process-id 1

(on CPUs, set the devices per process with e.g. JAX_NUM_CPU_DEVICES=2).
Process 0 writes --out and the checkpoint; a process whose peer dies exits
non-zero within about --heartbeat-timeout seconds, and the same commands
again resume from process 0's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import Batch, DataError, DivergenceError, init_params, load_data, parallel, train
from abc_jax.checkpoint import checkpoint_epoch, checkpoint_path
from abc_jax.files import write_npz, write_results

QUICK = {"n": 32, "epochs": 40, "epochs_per_chunk": 20}  # --quick: flags left at the default


def _flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data: a file, or synthetic samples ~ Normal(0, 1)")
    data.add_argument("--data", type=Path, help=".npy, .npz (its array X) or .csv (N, D)")
    data.add_argument("--n", type=int, default=256, help="synthetic samples N")
    data.add_argument("--in-dim", type=int, help="D (default: the data's columns, or 3)")
    data.add_argument("--hidden-dim", type=int, help="H (default D)")
    data.add_argument("--out-dim", type=int, help="O (default D)")
    data.add_argument("--seed", type=int, default=0, help="seed for the data and the params")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1000, help="epochs")
    t.add_argument("--lr", type=float, default=0.05, help="learning rate")
    t.add_argument("--optimizer", choices=tuple(_common.OPTIMIZERS), default="gd",
                   help="gd: the homework's p <- p - lr g; the others Optax's")
    t.add_argument("--grad", choices=("manual", "oracle"), default="manual",
                   help="manual: the hand-derived gradient; oracle: jax.grad")
    t.add_argument("--batch-size", type=int, help="mini-batch size (default: full batch)")
    t.add_argument("--chunk-size", type=int, help="rows per gradient chunk (bounds memory)")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype")
    t.add_argument("--epochs-per-chunk", type=int, default=100,
                   help="epochs per compiled chunk: how often to checkpoint")
    m = p.add_argument_group(
        "several processes: all three flags or none; each process reads its own --data "
        "(synthetic: its own --n rows)")
    m.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which runs the coordinator")
    m.add_argument("--num-processes", type=int, metavar="P", help="processes")
    m.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. P-1")
    m.add_argument("--heartbeat-timeout", type=int, default=10, metavar="S",
                   help="seconds after which a silent process counts as dead")
    m.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to join")
    p.add_argument("--out", type=Path, default=Path("results/train"), help="results folder")
    p.add_argument("--restart", action="store_true",
                   help="start afresh, discarding the checkpoint in --out")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run for a smoke test: " + ", ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " unless given")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway when stdout is not a terminal)")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    several = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in several) and any(v is None for v in several):
        p.error("--coordinator, --num-processes and --process-id go together: give all three "
                "or none")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
    for name in ("epochs_per_chunk", "num_processes", "heartbeat_timeout", "init_timeout", "n",
                 "in_dim", "hidden_dim", "out_dim", "batch_size", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.epochs < 0:
        p.error(f"--epochs must be >= 0, got {args.epochs}")
    if not (np.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    lines = __doc__.strip().splitlines()
    p = argparse.ArgumentParser(prog="train.py", description=lines[0],
                                epilog="\n".join(lines[1:]).strip(),
                                formatter_class=_common.HelpFormatter)
    _flags(p)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    _check(p, args)
    return args


def load_samples(args: argparse.Namespace) -> np.ndarray:
    """X (N, D) from --data, or synthetic from --n, --in-dim and --seed.

    With several processes, these are this process's rows; synthetic rows
    are drawn from (seed, process id).
    """
    if args.data is None:
        D = args.in_dim or 3
        seed = args.seed if args.coordinator is None else [args.seed, args.process_id]
        return np.random.default_rng(seed).standard_normal((args.n, D))
    X = load_data(args.data)
    if args.in_dim is not None and args.in_dim != X.shape[1]:
        raise DataError(f"{args.data}: --in-dim {args.in_dim} but the data have D = {X.shape[1]}")
    return X


def plot_losses(losses: np.ndarray, title: str) -> object:
    fig, ax = _common.figure(width=6, height=4)
    ax.plot(np.arange(len(losses)), losses)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("batch loss (mean over samples)")
    ax.set_title(title)
    return fig


def start_processes(args: argparse.Namespace) -> bool:
    """Join the job of several processes, if the flags ask for one; False if that failed."""
    if args.coordinator is None:
        return True
    try:
        parallel.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id,
            heartbeat_timeout=args.heartbeat_timeout, initialization_timeout=args.init_timeout,
        )
    except (ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def load_batch(args: argparse.Namespace) -> tuple[np.ndarray | None, object]:
    """(this process's rows, the batch to train on); rows None if any process failed."""
    try:
        X, error = load_samples(args), None
    except DataError as e:
        X, error = None, e
    failed = parallel.failed_processes(error is None)  # all processes stop together
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    elif failed:
        print(f"error: process {', '.join(map(str, failed))} could not load its data; "
              "see its message", file=sys.stderr)
    if failed:
        return None, None
    return X, X if args.coordinator is None else parallel.shard_local_batch(X)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if not start_processes(args):
        return 2
    try:
        return run(args)
    except BaseException as e:
        if jax.process_count() == 1:
            raise
        leave(e)


def leave(e: BaseException) -> None:
    """End this process of several at once, after one line on stderr.

    A normal exit would wait in JAX's exit barrier for the other processes,
    which wait in their next collective for this one: both would hang. Gone
    without the barrier, this process stops sending heartbeats, and JAX ends
    the others within the heartbeat timeout.
    """
    resume = "run the same commands again to resume from the last checkpoint"
    if isinstance(e, KeyboardInterrupt):
        code, what = 130, "interrupted"
    elif isinstance(e, jax.errors.JaxRuntimeError):  # a collective failed: a peer died
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        code, what = 1, f"lost a peer process ({first[:200]})"
    else:
        traceback.print_exc()
        code, what = 1, f"process {jax.process_index()} failed ({type(e).__name__})"
    print(f"error: {what}; {resume}", file=sys.stderr, flush=True)
    os._exit(code)


def mismatch(e: ValueError, out: Path) -> str:
    """One line for a checkpoint of another run: which settings differ and what to do."""
    keys = re.findall(r"(?:\(|; )(\w+): ", str(e))
    what = f" (different {', '.join(keys)})" if keys else ""
    return (f"{out} holds a run with other settings{what}: pass --out DIR to train this one "
            "elsewhere, or --restart to start afresh, discarding the old checkpoint")


def fit(args: argparse.Namespace, params: object, X: object) -> tuple[object, float, float]:
    """``(TrainResult, seconds, compile seconds)`` of train with the flags' settings."""
    ckpt_dir = args.out / "checkpoint"
    start = time.perf_counter()
    with _common.compile_clock() as compiling:
        result = train(
            params, X, lr=args.lr, epochs=args.epochs,
            optimizer=_common.make_optimizer(args.optimizer, args.lr), grad=args.grad,
            batch_size=args.batch_size, key=jax.random.fold_in(jax.random.key(args.seed), 2),
            chunk_size=args.chunk_size, checkpoint_dir=ckpt_dir,
            progress=not args.no_progress and sys.stdout.isatty(),  # no bar in a log
            epochs_per_chunk=args.epochs_per_chunk)
        jax.block_until_ready(result)
    seconds = time.perf_counter() - start
    return result, seconds, min(compiling[0], seconds)


def run(args: argparse.Namespace) -> int:
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    X_local, X = load_batch(args)
    if X is None:
        return 2
    D = X_local.shape[1]  # the global batch's real rows: the weighted ones, counted on the devices
    N = int(jnp.sum(X.weights > 0)) if isinstance(X, Batch) else X.shape[0]
    params = init_params(jax.random.fold_in(jax.random.key(args.seed), 1), D, args.hidden_dim,
                         args.out_dim, dtype=dtype)
    config = {"data": str(args.data) if args.data else "synthetic",
              "N": N, "D": D, "H": params.A.shape[0], "O": params.C.shape[0]}
    config |= {k: v for k, v in vars(args).items() if k in (
        "dtype", "seed", "epochs", "lr", "optimizer", "grad", "batch_size", "chunk_size",
        "epochs_per_chunk", "quick")}
    config |= {"processes": jax.process_count(), "devices": jax.device_count()}
    if args.coordinator is not None:
        config["data"] = f"{config['data']} (process 0's {len(X_local)} rows; each process its own)"
    ckpt = checkpoint_path(args.out / "checkpoint")
    if args.restart and parallel.is_main_process():
        ckpt.unlink(missing_ok=True)
    resumed_from = checkpoint_epoch(ckpt.parent)
    try:
        result, seconds, compile_seconds = fit(args, params, X)
    except (DivergenceError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. a checkpoint from another run
        different = "different run" in str(e) or "unreadable checkpoint" in str(e)
        print(f"error: {mismatch(e, args.out) if different else e}", file=sys.stderr)
        return 2
    if parallel.is_main_process():  # process 0 writes the results
        save(args, config, result, resumed_from, seconds, compile_seconds)
    return 0


def save(args: argparse.Namespace, config: dict, result: object, resumed_from: int,
         seconds: float, compile_seconds: float) -> None:
    """Write config, metrics, losses, the plot and the params; print one line of results."""
    losses = np.asarray(result.losses)
    ran = args.epochs - resumed_from
    running = max(seconds - compile_seconds, 1e-9)
    metrics = {
        "final_loss": float(losses[-1]) if len(losses) else None,
        "initial_loss": float(losses[0]) if len(losses) else None,
        "epochs": args.epochs, "epochs_this_run": ran, "resumed_from_epoch": resumed_from,
        "seconds": seconds, "compile_seconds": compile_seconds,
        "epochs_per_second": ran / running if ran else None,  # compilation excluded
        "device": str(jax.devices()[0]), "device_count": jax.device_count(),
        "process_count": jax.process_count(), "platform": jax.default_backend(),
        "jax_version": jax.__version__,
    }
    N, D, H, O = (config[k] for k in "NDHO")
    title = f"{args.optimizer}, lr={args.lr:g}, N={N}, D={D}, H={H}, O={O}, {args.dtype}"
    write_results(args.out, config=config, metrics=metrics,
                  tables={"losses": (["epoch", "loss"], enumerate(losses.tolist()))},
                  figures={"loss": plot_losses(losses, title)})
    write_npz(args.out / "params.npz", **{k: np.asarray(v) for k, v in
                                         result.params._asdict().items()})
    devices = (metrics["device"] if jax.device_count() == 1 else
               f"{jax.device_count()} devices, {jax.process_count()} process(es)")
    _common.print_table(
        ["epochs", "initial loss", "final loss", "epochs/s", "compile s", "device"],
        [[args.epochs, metrics["initial_loss"], metrics["final_loss"],
          metrics["epochs_per_second"], compile_seconds, devices]], floatfmt=".6g")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
