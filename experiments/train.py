"""Train the ABC model on your own samples (or synthetic ones) and save the results.

    python experiments/train.py --data X.csv --epochs 2000 --lr 0.05 --optimizer adam
    python experiments/train.py --n 4096 --in-dim 16 --hidden-dim 32 --out-dim 8
    python experiments/train.py --data XY.csv --target-cols -1 --eval-fraction 0.2 --patience 5

Targets t (L = ||C z - t||^2 per row; none: t = 0, the homework's loss) come from
--targets T.npy (N, O), or from --target-cols, columns of the --data file (the rest are X).
Held-out data: --eval-data (its targets: the same --target-cols, or --eval-targets) or
--eval-fraction, a fixed split of the rows drawn from --seed; its loss is measured at epoch
0 and every --eval-every epochs, and --patience stops after that many evaluations
without a new best, keeping the best params.

Writes config.json, metrics.json (compile_seconds apart from epochs_per_second; held-out
losses with their epochs and the best epoch), losses.csv, loss.png (training and held-out
curves) and params.npz (arrays A, B, C; abc_jax.load_params reads it) into --out; its
checkpoint/ makes the same command resume (a finished run returns at once) and refuses other
settings there (give another --out, or --restart to discard it). A bad data file: one line
on stderr, exit 2.

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
from typing import Any

import _common
import _data
import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import Batch, DataError, DivergenceError, init_params, parallel, train
from abc_jax.checkpoint import checkpoint_epoch, checkpoint_path
from abc_jax.files import save_params, write_results

QUICK = {"n": 32, "epochs": 40, "epochs_per_chunk": 20, "eval_every": 20,  # --quick's settings
         "checkpoint_every": 20}
SAVED = ("dtype seed epochs lr optimizer grad batch_size chunk_size epochs_per_chunk eval_every "
         "checkpoint_every quick "
         "eval_fraction patience").split()


def _columns(text: str) -> tuple[int, ...]:
    """--target-cols: comma-separated 1-based column numbers, negative ones from the end."""
    try:
        cols = tuple(int(c) for c in text.split(","))
    except ValueError:
        cols = ()
    if not cols or 0 in cols:
        raise argparse.ArgumentTypeError(
            f"expected column numbers like 11 or 9,10 (1-based; -1 the last), got {text!r}")
    return cols


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
    _target_flags(p)
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
                   help="epochs per compiled call between returns to the host")
    t.add_argument("--eval-every", type=int, default=100,
                   help="epochs between held-out evaluations (and one at the end)")
    t.add_argument("--checkpoint-every", type=int, default=100,
                   help="epochs between checkpoints (and one at the end)")
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
                   "--n 32, --epochs 40, --epochs-per-chunk/--eval-every/--checkpoint-every 20 "
                   "unless given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none in a log)")
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in QUICK.items()  # --quick: flags left at the default
                       if args.quick and getattr(args, k) == p.get_default(k)})
    if len({v is None for v in (args.coordinator, args.num_processes, args.process_id)}) > 1:
        p.error("--coordinator, --num-processes and --process-id go together: give all three "
                "or none")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
    for name in ("epochs_per_chunk", "eval_every", "checkpoint_every", "num_processes",
                 "heartbeat_timeout", "init_timeout", "n", "in_dim", "hidden_dim", "out_dim",
                 "batch_size", "chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs < 0 or not (np.isfinite(args.lr) and args.lr > 0):
        p.error("--epochs must be >= 0 and --lr must be a finite number > 0, got "
                f"{args.epochs} and {args.lr}")
    _check_target_flags(p, args)
    return args


def _target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("targets and held-out data (no targets: t = 0, the homework)")
    g.add_argument("--targets", type=Path, metavar="FILE",
                   help="targets T (N, O) of --data's rows: .npy, .npz or .csv")
    g.add_argument("--target-cols", type=_columns, metavar="COLS",
                   help="columns of --data that are targets, the rest X: 1-based, negative from "
                   "the end, e.g. 11, 9,10 or -1 (the last)")
    g.add_argument("--eval-data", type=Path, metavar="FILE", help="held-out samples, as --data "
                   "(with --target-cols its targets are the same columns)")
    g.add_argument("--eval-targets", type=Path, metavar="FILE",
                   help="targets of --eval-data's rows (with --targets)")
    g.add_argument("--eval-fraction", type=float, metavar="F", help="hold out this fraction "
                   "of the rows instead (a fixed split drawn from --seed)")
    g.add_argument("--patience", type=int, metavar="P", help="stop after P held-out evaluations "
                   "(one every --eval-every epochs) without a new best; keep the best")


def _check_target_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for the targets' and held-out flags that do not go together."""
    if args.targets is not None and args.target_cols is not None:
        p.error("--targets and --target-cols are two ways to give targets: give one")
    for flag in ("targets", "target_cols"):
        if getattr(args, flag) is not None and args.data is None:
            p.error(f"--{flag.replace('_', '-')} needs --data (targets of the data's rows)")
    if args.eval_data is not None and args.eval_fraction is not None:
        p.error("--eval-data and --eval-fraction are two ways to hold out data: give one")
    if args.eval_targets is not None and (args.targets is None or args.eval_data is None):
        p.error("--eval-targets goes with --targets and --eval-data (the targets of its rows)")
    if args.targets is not None and args.eval_data is not None and args.eval_targets is None:
        p.error("--eval-data with --targets needs --eval-targets (the held-out rows' targets)")
    if args.eval_fraction is not None and not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    if args.eval_fraction is not None and args.coordinator is not None:
        p.error("--eval-fraction splits one process's rows; with several processes give "
                "every process the same --eval-data")
    if args.patience is not None and args.patience < 1:
        p.error(f"--patience must be >= 1, got {args.patience}")
    if args.patience is not None and args.eval_data is None and args.eval_fraction is None:
        p.error("--patience needs held-out data: --eval-data or --eval-fraction")


def load_batch(args: argparse.Namespace) -> _data.Data | None:
    """This process's rows and the batches to train and evaluate on, from --data (and its
    targets) or synthetic (--n rows of --in-dim, or 3, columns ~ Normal(0, 1), drawn from
    (seed, process id) with several processes); None if any process failed to load."""
    try:
        (X, T), held = _data.read_data(args)
        error = None
    except DataError as e:
        X, T, held, error = None, None, None, e
    if failed := parallel.failed_processes(error is None):  # all processes stop together
        print(f"error: {error}" if error else f"error: process {', '.join(map(str, failed))} "
              "could not load its data; see its message", file=sys.stderr)
        return None
    batch = X if T is None else Batch(X, T=T)
    held = None if held is None else held[0] if held[1] is None else Batch(held[0], T=held[1])
    batch = batch if args.coordinator is None else parallel.shard_local_batch(batch)
    return _data.Data(X, T, batch, held)


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


def describe(args: argparse.Namespace, data: _data.Data, params: Any) -> dict[str, Any]:
    """config.json: the data, targets, held-out data, shapes and the flags that set the run."""
    X = data.batch  # the global batch's real rows: the weighted ones, counted on the devices
    sharded = isinstance(X, Batch) and X.weights is not None
    N = int(jnp.sum(X.weights > 0)) if sharded else len(data.X)
    held = data.eval_data
    targets = (None if data.T is None else str(args.targets) if args.targets is not None else
               f"columns {','.join(map(str, args.target_cols))} of the data")
    config = {"data": str(args.data) if args.data else "synthetic", "N": N,
              "D": params.A.shape[1], "H": params.A.shape[0], "O": params.C.shape[0],
              "targets": targets or "none (t = 0)",
              "eval_data": None if held is None else str(args.eval_data or "--eval-fraction"),
              "N_eval": None if held is None else len(held.X if isinstance(held, Batch) else held),
              **{k: vars(args)[k] for k in SAVED},
              "processes": jax.process_count(), "devices": jax.device_count()}
    if args.coordinator is not None:
        config["data"] += f" (process 0's {len(data.X)} rows; each process its own)"
    return config


def run(args: argparse.Namespace) -> int:
    data = load_batch(args)
    if data is None:
        return 2
    O = args.out_dim if data.T is None else data.T.shape[1]
    params = init_params(jax.random.fold_in(jax.random.key(args.seed), 1), data.X.shape[1],
                         args.hidden_dim, O, dtype=jnp.dtype(args.dtype))
    config = describe(args, data, params)
    ckpt = checkpoint_path(args.out / "checkpoint")
    if args.restart and parallel.is_main_process():
        ckpt.unlink(missing_ok=True)
    resumed_from = checkpoint_epoch(ckpt.parent)
    start = time.perf_counter()
    try:
        with _common.compile_clock() as compiling:
            result = jax.block_until_ready(train(
                params, data.batch, epochs=args.epochs,
                **_common.rate_kwargs(args.optimizer, args.lr), grad=args.grad,
                batch_size=args.batch_size, chunk_size=args.chunk_size,
                key=jax.random.fold_in(jax.random.key(args.seed), 2), checkpoint_dir=ckpt.parent,
                progress=not args.no_progress and sys.stdout.isatty(),  # no bar in a log
                epochs_per_chunk=args.epochs_per_chunk, eval_every=args.eval_every,
                checkpoint_every=args.checkpoint_every, eval_data=data.eval_data,
                patience=args.patience))
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


def held_out_metrics(result: Any, epochs: int) -> dict[str, Any]:
    """The held-out losses with their epochs, the best one, and whether patience stopped the
    run; empty without held-out data."""
    if result.eval_losses is None:
        return {}
    held = np.asarray(result.eval_losses).tolist()
    return {"eval_epochs": np.asarray(result.eval_epochs).tolist(), "eval_losses": held,
            "best_epoch": result.best_epoch, "best_eval_loss": min(held),
            "final_eval_loss": held[-1], "stopped_early": len(result.losses) < epochs}


def plot_losses(args: argparse.Namespace, config: dict, losses: np.ndarray,
                held: dict[str, Any]) -> Any:
    """The training loss per epoch and, if there is one, the held-out loss at its epochs."""
    fig, ax = _common.figure(width=6, height=4)
    ax.plot(losses, label="training (mean over its rows)")
    if held:
        ax.plot(held["eval_epochs"], held["eval_losses"], "o-", ms=3, label="held-out")
        ax.axvline(held["best_epoch"], color="gray", ls=":", lw=1, label="best held-out")
        ax.legend(fontsize=8)
    ax.set(yscale="log", xlabel="epoch", ylabel="batch loss (mean over samples)",
           title=f"{args.optimizer}, lr={args.lr:g}, N={config['N']}, D={config['D']}, "
                 f"H={config['H']}, O={config['O']}, {args.dtype}")
    return fig


def save(args: argparse.Namespace, config: dict, result: Any, resumed_from: int,
         seconds: float, compile_seconds: float) -> None:
    """Write config, metrics, losses, the plot and the params; print one line of results."""
    losses = np.asarray(result.losses)
    ran = len(losses) - resumed_from if len(losses) > resumed_from else 0
    held = held_out_metrics(result, args.epochs)
    metrics = {"final_loss": float(losses[-1]) if len(losses) else None,
               "initial_loss": float(losses[0]) if len(losses) else None,
               "epochs": args.epochs, "epochs_this_run": ran, "resumed_from_epoch": resumed_from,
               "seconds": seconds, "compile_seconds": compile_seconds,  # compilation excluded:
               "epochs_per_second": ran / max(seconds - compile_seconds, 1e-9) if ran else None,
               **held,
               "device": str(jax.devices()[0]), "device_count": jax.device_count(),
               "process_count": jax.process_count(), "platform": jax.default_backend(),
               "jax_version": jax.__version__}
    write_results(args.out, config=config, metrics=metrics,
                  figures={"loss": plot_losses(args, config, losses, held)},
                  tables={"losses": (["epoch", "loss"], enumerate(losses.tolist()))})
    save_params(args.out / "params.npz", result.params)
    devices = (metrics["device"] if jax.device_count() == 1 else
               f"{jax.device_count()} devices, {jax.process_count()} process(es)")
    header = ["epochs", "initial loss", "final loss", "epochs/s", "compile s", "device"]
    row = [len(losses), metrics["initial_loss"], metrics["final_loss"],
           metrics["epochs_per_second"], compile_seconds, devices]
    if held:
        header[3:3], row[3:3] = ["best held-out", "best epoch"], [min(held["eval_losses"]),
                                                                  held["best_epoch"]]
    _common.print_table(header, [row], ".6g")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
