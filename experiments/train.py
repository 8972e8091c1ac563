"""Train the ABC model on your own samples (or synthetic ones) and save the results.

    python experiments/train.py --data X.csv --epochs 2000 --lr 0.05 --optimizer adam
    python experiments/train.py --n 4096 --in-dim 16 --hidden-dim 32 --out-dim 8

Writes into --out (default results/train): config.json, metrics.json,
losses.csv, loss.png and params.npz (arrays A, B, C); the checkpoint lives in
--out/checkpoint/, so running the same command again resumes (and a finished
run returns at once). A bad data file is reported in one line on stderr,
exit code 2.

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
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import make_optimizer

from abc_jax import files as io
from abc_jax import init_params, parallel
from abc_jax.checkpoint import checkpoint_epoch
from abc_jax.data import DataError, load_data
from abc_jax.training import DivergenceError, train

OPTIMIZERS = ("gd", "sgd", "momentum", "adam")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = p.add_argument_group("data: a file, or synthetic samples ~ Normal(0, 1)")
    data.add_argument("--data", type=Path, help=".npy, .npz (array X or the first) or .csv (N, D)")
    data.add_argument("--n", type=int, default=256, help="synthetic samples N")
    data.add_argument("--in-dim", type=int, help="D (default: the data's columns, or 3)")
    data.add_argument("--hidden-dim", type=int, help="H (default D)")
    data.add_argument("--out-dim", type=int, help="O (default D)")
    data.add_argument("--seed", type=int, default=0, help="seed for the data and the params")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1000)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="gd",
                   help="gd: the homework's p <- p - lr g (default)")
    t.add_argument("--grad", choices=("manual", "oracle"), default="manual")
    t.add_argument("--batch-size", type=int, help="mini-batch size (default: full batch)")
    t.add_argument("--chunk-size", type=int, help="rows per gradient chunk (bounds memory)")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--epochs-per-chunk", type=int, default=100,
                   help="epochs per compiled chunk: how often to checkpoint (default 100)")
    m = p.add_argument_group(
        "several processes: all three flags or none; each process reads its own --data "
        "(synthetic: its own --n rows)"
    )
    m.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which runs the coordinator")
    m.add_argument("--num-processes", type=int, metavar="P")
    m.add_argument("--process-id", type=int, metavar="I", help="0 .. P-1")
    m.add_argument("--heartbeat-timeout", type=int, default=10, metavar="S",
                   help="seconds after which a silent process counts as dead and the others "
                        "exit (default 10)")
    m.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to join (default 300)")
    p.add_argument("--out", type=Path, default=Path("results/train"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    several = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in several) and any(v is None for v in several):
        p.error("--coordinator, --num-processes and --process-id go together: give all three "
                "or none")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
    for name in ("epochs_per_chunk", "num_processes", "heartbeat_timeout", "init_timeout"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("n", "in_dim", "hidden_dim", "out_dim", "batch_size", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.epochs < 0:
        p.error(f"--epochs must be >= 0, got {args.epochs}")
    if not (np.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
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


def plot_losses(losses: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(losses)), losses)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("batch loss (mean over samples)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
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


def run(args: argparse.Namespace) -> int:
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    X_local, X = load_batch(args)
    if X is None:
        return 2
    N, D = X.shape
    params = init_params(
        jax.random.fold_in(jax.random.key(args.seed), 1), D, args.hidden_dim, args.out_dim,
        dtype=dtype,
    )
    H, O = params.A.shape[0], params.C.shape[0]
    optimizer = make_optimizer(args.optimizer, args.lr)
    ckpt_dir = args.out / "checkpoint"
    config = {
        "data": str(args.data) if args.data else "synthetic",
        "N": N, "D": D, "H": H, "O": O, "dtype": args.dtype, "seed": args.seed,
        "epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer, "grad": args.grad,
        "batch_size": args.batch_size, "chunk_size": args.chunk_size,
        "epochs_per_chunk": args.epochs_per_chunk, "processes": jax.process_count(),
        "devices": jax.device_count(),
    }
    if args.coordinator is not None:
        config["data"] = f"{config['data']} (process 0's {len(X_local)} rows; each process its own)"
    resumed_from = checkpoint_epoch(ckpt_dir)
    start = time.perf_counter()
    try:
        result = train(
            params, X, lr=args.lr, epochs=args.epochs, optimizer=optimizer, grad=args.grad,
            batch_size=args.batch_size, key=jax.random.fold_in(jax.random.key(args.seed), 2),
            chunk_size=args.chunk_size, progress=not args.no_progress, checkpoint_dir=ckpt_dir,
            epochs_per_chunk=args.epochs_per_chunk,
        )
        jax.block_until_ready(result)
    except (DivergenceError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. a checkpoint from another run
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if not parallel.is_main_process():
        return 0  # process 0 writes the results
    write_results(args, config, result, resumed_from, seconds)
    return 0


def write_results(args: argparse.Namespace, config: dict, result, resumed_from: int,
                  seconds: float) -> None:
    losses = np.asarray(result.losses)
    ran = args.epochs - resumed_from
    metrics = {
        "final_loss": float(losses[-1]) if len(losses) else None,
        "initial_loss": float(losses[0]) if len(losses) else None,
        "epochs": args.epochs,
        "epochs_this_run": ran,
        "resumed_from_epoch": resumed_from,
        "seconds": seconds,
        "epochs_per_second": ran / seconds if ran else None,
        "device": str(jax.devices()[0]),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
    }
    io.write_json(args.out / "config.json", config)
    io.write_json(args.out / "metrics.json", metrics)
    io.write_csv(args.out / "losses.csv", ["epoch", "loss"], enumerate(losses.tolist()))
    io.write_npz(args.out / "params.npz", **{k: np.asarray(v) for k, v in
                                              result.params._asdict().items()})
    N, D, H, O = (config[k] for k in "NDHO")
    title = f"{args.optimizer}, lr={args.lr:g}, N={N}, D={D}, H={H}, O={O}, {args.dtype}"
    io.save_figure(args.out / "loss.png", plot_losses(losses, title), dpi=150)

    print(f"{'epochs':>8} {'initial loss':>14} {'final loss':>14} {'epochs/s':>10}  device")
    rate = f"{metrics['epochs_per_second']:10.1f}" if ran else f"{'-':>10}"
    first = f"{losses[0]:14.6g}" if len(losses) else f"{'-':>14}"
    last = f"{losses[-1]:14.6g}" if len(losses) else f"{'-':>14}"
    devices = (f"{metrics['device']}" if jax.device_count() == 1 else
               f"{jax.device_count()} devices, {jax.process_count()} process(es)")
    print(f"{args.epochs:>8} {first} {last} {rate}  {devices}")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
