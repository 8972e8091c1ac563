"""Train the ABC model on your own samples (or synthetic ones) and save the results.

    python experiments/train.py --data X.csv --epochs 2000 --lr 0.05 --optimizer adam
    python experiments/train.py --n 4096 --in-dim 16 --hidden-dim 32 --out-dim 8

Writes config.json, metrics.json (compile_seconds apart from epochs_per_second), losses.csv,
loss.png and params.npz (arrays A, B, C) into --out; its checkpoint/ makes the same command
resume (a finished run returns at once) and refuses other settings there (give another --out,
or --restart to discard it). A bad data file: one line on stderr, exit 2.

Several processes (JAX's multi-controller runtime) train on the rows they each read: one
process per host with the same flags and its own --process-id and --data (H:P: host and port
of process 0; on CPUs set devices per process, e.g. JAX_NUM_CPU_DEVICES=2),

    python experiments/train.py --data X0.npy --coordinator H:P --num-processes 2 --process-id 0
    python experiments/train.py --data X1.npy --coordinator H:P --num-processes 2 --process-id 1

Process 0 writes --out and the checkpoint; a process whose peer dies exits non-zero within
about --heartbeat-timeout seconds, and the same commands again resume from its checkpoint."""

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
from abc_jax.files import save_params, write_results

QUICK = {"n": 32, "epochs": 40, "epochs_per_chunk": 20}  # --quick's settings
SAVED = "dtype seed epochs lr optimizer grad batch_size chunk_size epochs_per_chunk quick".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(prog="train.py", description=head, epilog=rest.strip(),
                                formatter_class=_common.HelpFormatter)
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
    t.add_argument("--epochs-per-chunk", type=int, default=100, help="epochs between checkpoints")
    m = p.add_argument_group("several processes: all three flags or none; each process reads "
                             "its own --data (synthetic: its own --n rows)")
    m.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (coordinator)")
    m.add_argument("--num-processes", type=int, metavar="P", help="processes")
    m.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. P-1")
    m.add_argument("--heartbeat-timeout", type=int, default=10, metavar="S",
                   help="seconds after which a silent process counts as dead")
    m.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to join")
    p.add_argument("--out", type=Path, default=Path("results/train"), help="results folder")
    p.add_argument("--restart", action="store_true", help="discard the checkpoint in --out")
    p.add_argument("--quick", action="store_true", help="a tiny run for a smoke test: "
                   "--n 32, --epochs 40, --epochs-per-chunk 20 unless given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none in a log)")
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in QUICK.items()  # --quick: flags left at the default
                       if args.quick and getattr(args, k) == p.get_default(k)})
    if len({v is None for v in (args.coordinator, args.num_processes, args.process_id)}) > 1:
        p.error("--coordinator, --num-processes and --process-id go together: give all three "
                "or none")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
    for name in ("epochs_per_chunk", "num_processes", "heartbeat_timeout", "init_timeout", "n",
                 "in_dim", "hidden_dim", "out_dim", "batch_size", "chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs < 0 or not (np.isfinite(args.lr) and args.lr > 0):
        p.error("--epochs must be >= 0 and --lr must be a finite number > 0, got "
                f"{args.epochs} and {args.lr}")
    return args


def load_batch(args: argparse.Namespace) -> tuple[np.ndarray | None, object]:
    """(this process's rows, the batch to train on), from --data or synthetic (--n rows of
    --in-dim, or 3, columns ~ Normal(0, 1), drawn from (seed, process id) with several
    processes); (None, None) if any process failed to load its rows."""
    try:
        if args.data is None:
            seed = args.seed if args.coordinator is None else [args.seed, args.process_id]
            X = np.random.default_rng(seed).standard_normal((args.n, args.in_dim or 3))
        else:
            X = load_data(args.data)
            if args.in_dim is not None and args.in_dim != X.shape[1]:
                raise DataError(f"{args.data}: --in-dim {args.in_dim} but the data have "
                                f"D = {X.shape[1]}")
        error = None
    except DataError as e:
        X, error = None, e
    if failed := parallel.failed_processes(error is None):  # all processes stop together
        print(f"error: {error}" if error else f"error: process {', '.join(map(str, failed))} "
              "could not load its data; see its message", file=sys.stderr)
        return None, None
    return X, X if args.coordinator is None else parallel.shard_local_batch(X)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", args.dtype == "float64" or jax.config.jax_enable_x64)
    if args.coordinator is not None:  # join the job of several processes
        try:
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                            heartbeat_timeout=args.heartbeat_timeout,
                                            initialization_timeout=args.init_timeout)
        except (ConnectionError, ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        return run(args)
    except BaseException as e:
        if jax.process_count() == 1:
            raise
        # One of several processes ends at once, after one line on stderr (a normal exit waits
        # in JAX's exit barrier for the others, which wait for it): its heartbeats stop and JAX
        # ends the others in the timeout.
        if isinstance(e, KeyboardInterrupt):
            code, what = 130, "interrupted"
        elif isinstance(e, jax.errors.JaxRuntimeError):  # a collective failed: a peer died
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            code, what = 1, f"lost a peer process ({first[:200]})"
        else:
            traceback.print_exc()
            code, what = 1, f"process {jax.process_index()} failed ({type(e).__name__})"
        print(f"error: {what}; run the same commands again to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(code)


def run(args: argparse.Namespace) -> int:
    X_local, X = load_batch(args)
    if X is None:
        return 2
    D = X_local.shape[1]  # the global batch's real rows: the weighted ones, counted on the devices
    N = int(jnp.sum(X.weights > 0)) if isinstance(X, Batch) else X.shape[0]
    params = init_params(jax.random.fold_in(jax.random.key(args.seed), 1), D, args.hidden_dim,
                         args.out_dim, dtype=jnp.dtype(args.dtype))
    config = {"data": str(args.data) if args.data else "synthetic", "N": N, "D": D,
              "H": params.A.shape[0], "O": params.C.shape[0], **{k: vars(args)[k] for k in SAVED},
              "processes": jax.process_count(), "devices": jax.device_count()}
    if args.coordinator is not None:
        config["data"] += f" (process 0's {len(X_local)} rows; each process its own)"
    ckpt = checkpoint_path(args.out / "checkpoint")
    if args.restart and parallel.is_main_process():
        ckpt.unlink(missing_ok=True)
    resumed_from = checkpoint_epoch(ckpt.parent)
    start = time.perf_counter()
    try:
        with _common.compile_clock() as compiling:
            result = jax.block_until_ready(train(
                params, X, lr=args.lr, epochs=args.epochs,
                optimizer=_common.make_optimizer(args.optimizer, args.lr), grad=args.grad,
                batch_size=args.batch_size, chunk_size=args.chunk_size,
                key=jax.random.fold_in(jax.random.key(args.seed), 2), checkpoint_dir=ckpt.parent,
                progress=not args.no_progress and sys.stdout.isatty(),  # no bar in a log
                epochs_per_chunk=args.epochs_per_chunk))
    except (DivergenceError, FloatingPointError, ValueError) as e:
        message = str(e)
        if "different run" in message or "unreadable checkpoint" in message:  # say what differs
            keys = re.findall(r"(?:\(|; )(\w+): ", message)
            what = f" (different {', '.join(keys)})" if keys else ""
            message = (f"{args.out} holds a run with other settings{what}: pass --out DIR to "
                       "train this one elsewhere, or --restart to start afresh, discarding the "
                       "old checkpoint")
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1  # bad settings, or a diverged run
    seconds = time.perf_counter() - start
    if parallel.is_main_process():  # process 0 writes the results
        save(args, config, result, resumed_from, seconds, min(compiling[0], seconds))
    return 0


def save(args: argparse.Namespace, config: dict, result: object, resumed_from: int,
         seconds: float, compile_seconds: float) -> None:
    """Write config, metrics, losses, the plot and the params; print one line of results."""
    losses, ran = np.asarray(result.losses), args.epochs - resumed_from
    metrics = {"final_loss": float(losses[-1]) if len(losses) else None,
               "initial_loss": float(losses[0]) if len(losses) else None,
               "epochs": args.epochs, "epochs_this_run": ran, "resumed_from_epoch": resumed_from,
               "seconds": seconds, "compile_seconds": compile_seconds,  # compilation excluded:
               "epochs_per_second": ran / max(seconds - compile_seconds, 1e-9) if ran else None,
               "device": str(jax.devices()[0]), "device_count": jax.device_count(),
               "process_count": jax.process_count(), "platform": jax.default_backend(),
               "jax_version": jax.__version__}
    fig, ax = _common.figure(width=6, height=4)
    ax.plot(losses)
    ax.set(yscale="log", xlabel="epoch", ylabel="batch loss (mean over samples)",
           title=f"{args.optimizer}, lr={args.lr:g}, N={config['N']}, D={config['D']}, "
                 f"H={config['H']}, O={config['O']}, {args.dtype}")
    write_results(args.out, config=config, metrics=metrics, figures={"loss": fig},
                  tables={"losses": (["epoch", "loss"], enumerate(losses.tolist()))})
    save_params(args.out / "params.npz", result.params)
    devices = (metrics["device"] if jax.device_count() == 1 else
               f"{jax.device_count()} devices, {jax.process_count()} process(es)")
    _common.print_table(["epochs", "initial loss", "final loss", "epochs/s", "compile s", "device"],
                        [[args.epochs, metrics["initial_loss"], metrics["final_loss"],
                          metrics["epochs_per_second"], compile_seconds, devices]], ".6g")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
