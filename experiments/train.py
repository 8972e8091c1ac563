"""Train the ABC model on your own samples (or synthetic ones) and save the results.

    python -m experiments.train --data X.csv --epochs 2000 --lr 0.05 --optimizer adam
    python -m experiments.train --n 4096 --in-dim 16 --hidden-dim 32 --out-dim 8
    python -m experiments.train --data XY.csv --target-cols -1 --eval-fraction 0.2 --patience 5

Targets t (L = ||C z - t||^2 per row; none: t = 0, the homework's loss) come from
--targets T.npy (N, O), or from --target-cols, columns of the --data file (the rest are X).
Held-out data: --eval-data (its targets: the same --target-cols, or --eval-targets) or
--eval-fraction, a fixed split of the rows drawn from --seed; its loss is measured at epoch
0 and every --eval-every epochs, and --patience stops after that many evaluations
without a new best, keeping the best params.

Writes config.json, metrics.json (its status; compile_seconds apart from epochs_per_second;
held-out losses with their epochs, and the best and the last evaluation each with its
training and held-out loss; runs: one entry per invocation, its seconds, epochs run and the
epoch it resumed from), losses.csv, loss.png (training and held-out curves) and params.npz
(arrays A, B, C; abc_jax.load_params and predict.py read it) into --out; its checkpoint/
makes the same command resume (a finished run returns at once, keeping the first run's
timing) and refuses other settings there (give another --out, or --restart to discard it).
A bad data file: one line on stderr, exit 2. A diverged run writes its losses, plot and
metrics (status "diverged", its epoch), no params, and ends with one line saying what to
add to the same command (exit 1); Ctrl-C ends with one line naming the epoch of the
checkpoint the same command resumes from (exit 130).

Several processes (JAX's multi-controller runtime) train on the rows they each read: one
process per host with the same flags and its own --process-id and --data (H:P: host and port
of process 0; on CPUs set devices per process, e.g. JAX_NUM_CPU_DEVICES=2),

    python -m experiments.train --data X0.npy --coordinator H:P --num-processes 2 --process-id 0
    python -m experiments.train --data X1.npy --coordinator H:P --num-processes 2 --process-id 1

Process 0 writes --out and the checkpoint; a process whose peer dies exits non-zero within
about --heartbeat-timeout seconds, and the same commands again resume from its checkpoint."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import (
    Batch,
    DataError,
    DivergenceError,
    batch_loss,
    init_params,
    parallel,
    train,
)
from abc_jax.checkpoint import checkpoint_epoch, checkpoint_path
from abc_jax.files import save_params, write_results
from experiments import common
from experiments.common import data as _data

QUICK = {"n": 32, "epochs": 40, "epochs_per_chunk": 20, "eval_every": 20,  # --quick's settings
         "checkpoint_every": 20}
SAVED = ("dtype seed epochs lr optimizer grad batch_size chunk_size epochs_per_chunk eval_every "
         "checkpoint_every quick "
         "eval_fraction patience").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=head,
                                epilog=rest.strip(), formatter_class=common.HelpFormatter)
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
    t.add_argument("--optimizer", choices=tuple(common.OPTIMIZERS), default="gd",
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
    p.add_argument("--restart", action="store_true",
                   help="discard the checkpoint in --out (and the history of its runs)")
    p.add_argument("--quick", action="store_true", help="a tiny run for a smoke test: "
                   "--n 32, --epochs 40, --epochs-per-chunk/--eval-every/--checkpoint-every 20 "
                   "unless given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none in a log)")
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in QUICK.items()  # --quick: flags left at the default
                       if args.quick and getattr(args, k) == p.get_default(k)})
    _check_flags(p, args)
    _check_target_flags(p, args)
    return args


def _check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for the processes' flags and for numbers out of range."""
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


def _target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("targets and held-out data (no targets: t = 0, the homework)")
    g.add_argument("--targets", type=Path, metavar="FILE",
                   help="targets T (N, O) of --data's rows: .npy, .npz or .csv")
    g.add_argument("--target-cols", type=_data.columns, metavar="COLS",
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
    """Parse the flags and train, alone or as one process of a job (``parallel.run_job``:
    joining it, Ctrl-C, a lost peer); the exit code."""
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", args.dtype == "float64" or jax.config.jax_enable_x64)
    return parallel.run_job(lambda: run(args), checkpoint_dir=args.out / "checkpoint",
                            coordinator=args.coordinator, num_processes=args.num_processes,
                            process_id=args.process_id, heartbeat_timeout=args.heartbeat_timeout,
                            init_timeout=args.init_timeout)


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


def fit(args: argparse.Namespace, data: _data.Data, params: Any, directory: Path) -> Any:
    """abc_jax.train with the flags' settings. With held-out data a callback records the
    training loss of the params at each evaluation, beside their held-out loss, so the best
    and the last evaluated params are each described by both."""
    def train_loss(epoch: int, p: Any, metrics: dict[str, float]) -> dict[str, Any]:
        return {"train_loss": batch_loss(p, data.batch)}

    return jax.block_until_ready(train(
        params, data.batch, epochs=args.epochs, **common.rate_kwargs(args.optimizer, args.lr),
        grad=args.grad, batch_size=args.batch_size, chunk_size=args.chunk_size,
        key=jax.random.fold_in(jax.random.key(args.seed), 2) if args.batch_size else None,
        checkpoint_dir=directory,
        progress=not args.no_progress and sys.stdout.isatty(),  # no bar in a log
        epochs_per_chunk=args.epochs_per_chunk, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, eval_data=data.eval_data,
        patience=args.patience, callbacks=[train_loss] if data.eval_data is not None else []))


def refusal(args: argparse.Namespace, e: Exception) -> str:
    """The error line for settings train refused; a checkpoint of another run in --out names
    the settings that differ and the two ways on."""
    message = str(e)
    if "different run" in message or "unreadable checkpoint" in message:
        keys = re.findall(r"(?:\(|; )(\w+): ", message)
        what = f" (different {', '.join(keys)})" if keys else ""
        message = (f"{args.out} holds a run with other settings{what}: pass --out DIR to "
                   "train this one elsewhere, or --restart to start afresh, discarding the "
                   "old checkpoint")
    return f"error: {message}"


def advice(args: argparse.Namespace, e: DivergenceError) -> str:
    """The line a diverged run ends with: where its outputs are, and a command that works as
    printed (a smaller --lr alone would be refused by the checkpoint of this run)."""
    lr = f"{args.lr / 10:g}"
    return (f"error: training diverged: the loss is not finite at epoch {e.epoch} (--optimizer "
            f"{args.optimizer}, --lr {args.lr:g}); its losses, plot and metrics are in "
            f"{args.out}/. Try a smaller learning rate: the same command with --lr {lr} "
            f"--restart added (or with --lr {lr} --out NEW_DIR, keeping this run)")


def run(args: argparse.Namespace) -> int:
    """Load, train (resuming the checkpoint in --out), write the results; the exit code."""
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
        (args.out / "metrics.json").unlink(missing_ok=True)  # its history of runs goes too
    resumed_from = checkpoint_epoch(ckpt.parent)
    start, diverged = time.perf_counter(), None
    try:
        with common.compile_clock() as compiling:
            result = fit(args, data, params, ckpt.parent)
    except DivergenceError as e:
        result, diverged = e.result, e
    except (FloatingPointError, ValueError) as e:
        print(refusal(args, e), file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1  # bad settings, or an overflow at the start
    seconds = time.perf_counter() - start
    this = {"status": "finished" if diverged is None else "diverged",
            "resumed_from": resumed_from, "epochs_run": max(len(result.losses) - resumed_from, 0),
            "seconds": seconds, "compile_seconds": min(compiling[0], seconds)}
    if parallel.is_main_process():  # process 0 writes the results
        save(args, config, result, this, diverged)
    if diverged is not None:
        print(advice(args, diverged), file=sys.stderr)
        return 1
    return 0


def held_out_metrics(result: Any, epochs: int, finished: bool) -> dict[str, Any]:
    """The held-out losses with their epochs, ``best`` and ``last``: the epoch, training loss
    and held-out loss of the best and of the last (finite) evaluation, and whether patience
    stopped the run; empty without held-out data."""
    if result.eval_losses is None:
        return {}
    held, at = np.asarray(result.eval_losses, np.float64), np.asarray(result.eval_epochs).tolist()
    train_losses = (result.metrics or {}).get("train_loss", ())
    if len(train_losses) != len(at):  # a checkpoint of an older train.py did not record it
        train_losses = np.full(len(at), np.nan)

    def point(i: int) -> dict[str, Any]:
        return {"epoch": at[i], "train_loss": float(train_losses[i]), "eval_loss": float(held[i])}

    finite = np.flatnonzero(np.isfinite(held))
    last = int(finite[-1]) if len(finite) else len(at) - 1
    return {"eval_epochs": at, "eval_losses": held.tolist(), "best_epoch": result.best_epoch,
            "best_eval_loss": float(np.nanmin(held)) if len(finite) else None,
            "final_eval_loss": float(held[last]), "stopped_early": finished and
            len(result.losses) < epochs, "best": point(at.index(result.best_epoch)),
            "last": point(last)}


def runs_so_far(args: argparse.Namespace, this: dict[str, Any]) -> list[dict[str, Any]]:
    """Every invocation of this run, this one last: the earlier ones from --out's metrics.json
    when this one resumed its checkpoint (a fresh start, or --restart, begins anew)."""
    path, earlier = args.out / "metrics.json", []
    if this["resumed_from"] > 0 and path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            earlier = []
    return [*earlier, this]


def timing(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """seconds, compile_seconds and epochs_per_second over the invocations that trained (a
    rerun of a finished run trains nothing and leaves them as they were)."""
    trained = [r for r in runs if r["epochs_run"]]
    seconds, compiling = (sum(r[k] for r in trained) for k in ("seconds", "compile_seconds"))
    epochs = sum(r["epochs_run"] for r in trained)
    return {"seconds": seconds, "compile_seconds": compiling,  # compilation excluded:
            "epochs_per_second": epochs / max(seconds - compiling, 1e-9) if epochs else None}


def plot_losses(args: argparse.Namespace, config: dict, losses: np.ndarray,
                held: dict[str, Any]) -> Any:
    """The training loss per epoch and, if there is one, the held-out loss at its epochs."""
    fig, ax = common.figure(width=6, height=4)
    ax.plot(losses, label="training (mean over its rows)")
    if held:
        ax.plot(held["eval_epochs"], held["eval_losses"], "o-", ms=3, label="held-out")
        ax.axvline(held["best_epoch"], color="gray", ls=":", lw=1, label="best held-out")
        ax.legend(fontsize=8)
    ax.set(yscale="log", xlabel="epoch", ylabel="batch loss (mean over samples)",
           title=f"{args.optimizer}, lr={args.lr:g}, N={config['N']}, D={config['D']}, "
                 f"H={config['H']}, O={config['O']}, {args.dtype}")
    return fig


def save(args: argparse.Namespace, config: dict, result: Any, this: dict[str, Any],
         diverged: DivergenceError | None) -> None:
    """Write config, metrics (its ``status``; for a diverged run, its epoch and the message),
    losses and the plot, and for a run that did not diverge the params and a printed table."""
    losses = np.asarray(result.losses)
    held = held_out_metrics(result, args.epochs, diverged is None)
    runs = runs_so_far(args, this)
    metrics = {"status": this["status"],
               **({} if diverged is None else {"diverged_at_epoch": diverged.epoch,
                                               "error": advice(args, diverged)[7:]}),
               "final_loss": float(losses[-1]) if len(losses) else None,
               "initial_loss": float(losses[0]) if len(losses) else None,
               "epochs": args.epochs, "epochs_this_run": this["epochs_run"],
               "resumed_from_epoch": this["resumed_from"], **timing(runs), **held,
               "device": str(jax.devices()[0]), "device_count": jax.device_count(),
               "process_count": jax.process_count(), "platform": jax.default_backend(),
               "jax_version": jax.__version__, "runs": runs}
    write_results(args.out, config=config, metrics=metrics,
                  figures={"loss": plot_losses(args, config, losses, held)},
                  tables={"losses": (["epoch", "loss"], enumerate(losses.tolist()))})
    if diverged is not None:  # no params of a diverged run (nor an older run's) for predict.py
        (args.out / "params.npz").unlink(missing_ok=True)
        return
    save_params(args.out / "params.npz", result.params)
    report(args, metrics, held, len(losses))


def report(args: argparse.Namespace, metrics: dict[str, Any], held: dict[str, Any],
           epochs_done: int) -> None:
    """Print the run's numbers; with held-out data, the best and the last evaluation each with
    its training and held-out loss, and which of the two params.npz holds."""
    devices = (metrics["device"] if jax.device_count() == 1 else
               f"{jax.device_count()} devices, {jax.process_count()} process(es)")
    common.print_table(
        ["epochs", "initial loss", "final loss", "epochs/s", "compile s", "device"],
        [[epochs_done, metrics["initial_loss"], metrics["final_loss"], metrics["epochs_per_second"],
          metrics["compile_seconds"], devices]], ".6g")
    if held:
        kept = "best held-out" if args.patience is not None else "last"
        print()
        common.print_table(
            ["evaluation", "epoch", "training loss", "held-out loss", "params.npz"],
            [[name, p["epoch"], p["train_loss"], p["eval_loss"], "yes" if name == kept else ""]
             for name, p in (("best held-out", held["best"]), ("last", held["last"]))], ".6g")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
