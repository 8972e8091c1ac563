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
about --heartbeat-timeout seconds, and the same commands again resume from its checkpoint.
--quick: --n 32, --epochs 40, --epochs-per-chunk/--eval-every/--checkpoint-every 20 unless
given."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import (
    Batch,
    DataError,
    DivergenceError,
    apply_preprocessing,
    batch_loss,
    fit_preprocessing,
    init_params,
    parallel,
    save_preprocessing,
    train,
)
from abc_jax.checkpoint import CheckpointError, checkpoint_epoch, checkpoint_path
from abc_jax.files import save_params, write_results
from experiments import common
from experiments.common import job as job_module
from experiments.common.cli import Failed
from experiments.common.data import Data, columns, read_data

NAME = "train"
SAVED = ("dtype seed epochs lr optimizer grad batch_size chunk_size epochs_per_chunk eval_every "
         "checkpoint_every quick eval_fraction patience standardize bias").split()  # config.json
POSITIVE = ("epochs_per_chunk eval_every checkpoint_every num_processes heartbeat_timeout "
            "init_timeout n in_dim hidden_dim out_dim batch_size chunk_size patience").split()
# the flags of each group of --help
data_flag = functools.partial(
    common.flag, group="data: a file, or synthetic samples ~ Normal(0, 1)")
target_flag = functools.partial(
    common.flag, group="targets and held-out data (no targets: t = 0, the homework)")
train_flag = functools.partial(common.flag, group="training")
process_flag = functools.partial(
    common.flag, group="several processes: all three flags or none; each process reads its own "
    "--data (synthetic: its own --n rows)")


@dataclasses.dataclass(frozen=True)
class Config:
    """The data, targets, held-out data, training and processes of a run; ``out`` holds it."""

    data: Path | None = data_flag(None, ".npy, .npz (its array X) or .csv (N, D)")  # noqa: RUF009
    n: int = data_flag(256, "synthetic samples N")
    in_dim: int | None = data_flag(None, "D (default: the data's columns, or 3)")
    hidden_dim: int | None = data_flag(None, "H (default D)")
    out_dim: int | None = data_flag(None, "O (default D)")
    seed: int = data_flag(0, "seed for the data and the params")
    targets: Path | None = target_flag(  # noqa: RUF009
        None, "targets T (N, O) of --data's rows: .npy, .npz or .csv", metavar="FILE")
    target_cols: tuple[int, ...] | None = target_flag(
        None, "columns of --data that are targets, the rest X: 1-based, negative from the end, "
        "e.g. 11, 9,10 or -1 (the last)", type=columns, nargs=None, metavar="COLS")
    eval_data: Path | None = target_flag(  # noqa: RUF009
        None, "held-out samples, as --data (with --target-cols its targets are the same "
        "columns)", metavar="FILE")
    eval_targets: Path | None = target_flag(  # noqa: RUF009
        None, "targets of --eval-data's rows (with --targets)", metavar="FILE")
    eval_fraction: float | None = target_flag(
        None, "hold out this fraction of the rows instead (a fixed split drawn from --seed)",
        metavar="F")
    patience: int | None = target_flag(
        None, "stop after P held-out evaluations (one every --eval-every epochs: epochs by "
        "default) without a new best; keep the best", metavar="P")
    epochs: int = train_flag(1000, "epochs")
    lr: float = train_flag(0.05, "learning rate")
    optimizer: str = train_flag("gd", "gd: the homework's p <- p - lr g; the others Optax's",
                                choices=tuple(common.OPTIMIZERS))
    standardize: bool = train_flag(
        False, "standardise X and the targets with the training rows' mean and scale (stored "
        "with the params; predict.py applies it and gives predictions in the targets' units)")
    bias: bool = train_flag(False, "append a constant input column: a bias for A, B and the "
                            "output, the graph's equations unchanged (stored as --standardize)")
    grad: str = train_flag("manual", "manual: the hand-derived gradient; oracle: jax.grad",
                           choices=("manual", "oracle"))
    batch_size: int | None = train_flag(None, "mini-batch size (default: full batch)")
    chunk_size: int | None = train_flag(None, "rows per gradient chunk (bounds memory)")
    dtype: str = train_flag("float32", "dtype", choices=("float32", "float64"))
    epochs_per_chunk: int = train_flag(100, "epochs per compiled call between returns to the host")
    eval_every: int = train_flag(1, "epochs between held-out evaluations (and one at the end)")
    checkpoint_every: int = train_flag(100, "epochs between checkpoints (and one at the end)")
    coordinator: str | None = process_flag(None, "address of process 0 (coordinator)",
                                           metavar="HOST:PORT")
    num_processes: int | None = process_flag(None, "processes", metavar="P")
    process_id: int | None = process_flag(None, "this process, 0 .. P-1", metavar="I")
    heartbeat_timeout: int = process_flag(10, "seconds after which a silent process counts as "
                                          "dead", metavar="S")
    init_timeout: int = process_flag(300, "seconds to wait for every process to join",
                                     metavar="S")
    out: Path = common.flag(Path("results/train"), "results folder")  # noqa: RUF009
    restart: bool = common.flag(False, "discard the checkpoint in --out (and its runs' history)")
    progress: bool = common.flag(True, "a progress bar, on a terminal only (none in a log)")
    quick: bool = False

    def __post_init__(self) -> None:
        """The usage errors: flags out of range or that do not go together."""
        check, P, i = common.check, self.num_processes, self.process_id
        check(len({v is None for v in (self.coordinator, P, i)}) == 1, "--coordinator, "
              "--num-processes and --process-id go together: give all three or none")
        check(P is None or 0 <= i < P, f"--process-id must be in 0 .. {(P or 0) - 1}, got {i}")
        for name in POSITIVE:
            value = getattr(self, name)
            check(value is None or value >= 1,
                  f"--{name.replace('_', '-')} must be >= 1, got {value}")
        check(self.epochs >= 0 and math.isfinite(self.lr) and self.lr > 0, "--epochs must be "
              f">= 0 and --lr must be a finite number > 0, got {self.epochs} and {self.lr}")
        check(self.targets is None or self.target_cols is None,
              "--targets and --target-cols are two ways to give targets: give one")
        for name in ("targets", "target_cols"):
            check(getattr(self, name) is None or self.data is not None,
                  f"--{name.replace('_', '-')} needs --data (targets of the data's rows)")
        check(self.eval_data is None or self.eval_fraction is None,
              "--eval-data and --eval-fraction are two ways to hold out data: give one")
        check(self.eval_targets is None or None not in (self.targets, self.eval_data),
              "--eval-targets goes with --targets and --eval-data (the targets of its rows)")
        check(None in (self.targets, self.eval_data) or self.eval_targets is not None,
              "--eval-data with --targets needs --eval-targets (the held-out rows' targets)")
        check(self.eval_fraction is None or 0 < self.eval_fraction < 1,
              f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        check(self.eval_fraction is None or self.coordinator is None, "--eval-fraction splits "
              "one process's rows; with several processes give every process the same "
              "--eval-data")
        check(not (self.standardize or self.bias) or self.coordinator is None,
              "--standardize and --bias fit on the training rows of one process; with several "
              "processes preprocess the data files beforehand")
        check(self.patience is None or self.eval_data is not None or
              self.eval_fraction is not None,
              "--patience needs held-out data: --eval-data or --eval-fraction")


QUICK = Config(n=32, epochs=40, epochs_per_chunk=20, eval_every=20, checkpoint_every=20,
               quick=True)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The config of a command line (a failed check: ``ValueError``)."""
    return common.cli.parse(__name__, argv, docs=False)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report (as one process of a job: ``job``); the exit code."""
    return common.cli.main(__name__, argv, docs=False, job=job)


def job(config: Config, body: Callable[[], int]) -> int:
    """``body`` (run, report) alone or as one process of a job (``common.job.run_job``: joining
    it, Ctrl-C, a lost peer); the exit code."""
    names = "coordinator num_processes process_id heartbeat_timeout init_timeout".split()
    return job_module.run_job(body, checkpoint_dir=config.out / "checkpoint",
                              **{k: getattr(config, k) for k in names})


def load(config: Config) -> Data:
    """This process's rows and the batches to train and evaluate on, from --data (and its
    targets) or synthetic (--n rows of --in-dim, or 3, columns ~ Normal(0, 1), drawn from
    (seed, process id) with several processes); ``Failed`` (exit 2) if any process failed."""
    try:
        (X, T), held = read_data(config)
        error = None
    except DataError as e:
        X, T, held, error = None, None, None, e
    if failed := parallel.failed_processes(error is None):  # all processes stop together
        raise Failed(str(error) if error else f"process {', '.join(map(str, failed))} could "
                     "not load its data; see its message", 2)
    batch = X if T is None else Batch(X, T=T)
    held = None if held is None else held[0] if held[1] is None else Batch(held[0], T=held[1])
    batch = batch if config.coordinator is None else parallel.shard_local_batch(batch)
    return Data(X, T, batch, held)


def describe(config: Config, data: Data, params: Any) -> dict[str, Any]:
    """config.json: the data, targets, held-out data, shapes and the flags that set the run."""
    X = data.batch  # the global batch's real rows: the weighted ones, counted on the devices
    sharded = isinstance(X, Batch) and X.weights is not None
    N = int(jnp.sum(X.weights > 0)) if sharded else len(data.X)
    held = data.eval_data
    targets = (None if data.T is None else str(config.targets) if config.targets is not None
               else f"columns {','.join(map(str, config.target_cols))} of the data")
    described = {
        "data": str(config.data) if config.data else "synthetic", "N": N,
        "D": params.A.shape[1], "H": params.A.shape[0], "O": params.C.shape[0],
        "targets": targets or "none (t = 0)",
        "eval_data": None if held is None else str(config.eval_data or "--eval-fraction"),
        "N_eval": None if held is None else len(held.X if isinstance(held, Batch) else held),
        **{k: getattr(config, k) for k in SAVED},
        "processes": jax.process_count(), "devices": jax.device_count()}
    if config.coordinator is not None:
        described["data"] += f" (process 0's {len(data.X)} rows; each process its own)"
    return described


def fit(config: Config, data: Data, params: Any, directory: Path) -> Any:
    """abc_jax.train with the config's settings; a Ctrl-C that Python dropped is raised
    after the chunk (``common.job.interrupt_check``)."""
    return jax.block_until_ready(train(
        params, data.batch, epochs=config.epochs, **common.rate_kwargs(config.optimizer, config.lr),
        grad=config.grad, batch_size=config.batch_size, chunk_size=config.chunk_size,
        key=jax.random.fold_in(jax.random.key(config.seed), 2) if config.batch_size else None,
        checkpoint_dir=directory,
        progress=config.progress and sys.stdout.isatty(),  # no bar in a log
        epochs_per_chunk=config.epochs_per_chunk, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, eval_data=data.eval_data,
        patience=config.patience, callbacks=[job_module.interrupt_check]))


def refusal(config: Config, e: Exception) -> str:
    """The error for settings train refused; a checkpoint of another run in --out names the
    settings that differ and the two ways on."""
    message = str(e)
    if isinstance(e, CheckpointError):
        what = f" (different {', '.join(e.settings)})" if e.settings else ""
        message = (f"{config.out} holds a run with other settings{what}: pass --out DIR to "
                   "train this one elsewhere, or --restart to start afresh, discarding the "
                   "old checkpoint")
    return message


def advice(config: Config, e: DivergenceError) -> str:
    """The error a diverged run ends with: where its outputs are, and a command that works as
    printed (a smaller --lr alone would be refused by the checkpoint of this run)."""
    lr = f"{config.lr / 10:g}"
    scales = "" if e.column_scales is None or config.standardize else (
        f" The columns of the data have scales from {e.column_scales[0]:.3g} to "
        f"{e.column_scales[1]:.3g}: add --standardize first (with --restart), then lower --lr "
        "if it still diverges.")
    return (f"training diverged: the loss is not finite at epoch {e.epoch} (--optimizer "
            f"{config.optimizer}, --lr {config.lr:g}); its losses, plot and metrics are in "
            f"{config.out}/.{scales} Try a smaller learning rate: the same command with --lr {lr} "
            f"--restart added (or with --lr {lr} --out NEW_DIR, keeping this run)")


def run(config: Config) -> dict[str, Any]:
    """Load, train (resuming the checkpoint in ``config.out``; ``restart``: discarding it):
    config.json's and metrics.json's contents, the losses and the params (None if the run
    diverged). ``Failed``, writing nothing: bad data or settings refused (exit 2), an overflow
    at the start (exit 1)."""
    jax.config.update("jax_enable_x64", config.dtype == "float64" or jax.config.jax_enable_x64)
    data = load(config)
    O = config.out_dim if data.T is None else data.T.shape[1]
    prep = None
    if config.standardize or config.bias:  # fitted on the training rows, stored with the params
        prep = fit_preprocessing(data.batch, standardize=config.standardize, bias=config.bias)
        data = data._replace(batch=apply_preprocessing(prep, data.batch),
                             eval_data=None if data.eval_data is None else
                             apply_preprocessing(prep, data.eval_data))
        if parallel.is_main_process():  # a diverged run has no params.npz, but predict.py
            save_preprocessing(config.out / "preprocessing.npz", prep)  # still reads it
    D = data.X.shape[1] + (0 if prep is None else int(prep.constant.shape[0]))
    params = init_params(jax.random.fold_in(jax.random.key(config.seed), 1), D,
                         config.hidden_dim, O, dtype=jnp.dtype(config.dtype))
    described = describe(config, data, params)
    ckpt = checkpoint_path(config.out / "checkpoint")
    if config.restart and parallel.is_main_process():
        ckpt.unlink(missing_ok=True)
        (config.out / "metrics.json").unlink(missing_ok=True)  # its history of runs goes too
    resumed_from = checkpoint_epoch(ckpt.parent)
    start, diverged = time.perf_counter(), None
    try:
        with common.compile_clock() as compiling:
            result = fit(config, data, params, ckpt.parent)
    except DivergenceError as e:
        result, diverged = e.result, e
    except (FloatingPointError, ValueError) as e:  # bad settings, or an overflow at the start
        raise Failed(refusal(config, e), 2 if isinstance(e, ValueError) else 1) from None
    seconds = time.perf_counter() - start
    this = {"status": "finished" if diverged is None else "diverged",
            "resumed_from": resumed_from, "epochs_run": max(len(result.losses) - resumed_from, 0),
            "seconds": seconds, "compile_seconds": min(compiling[0], seconds)}
    losses = np.asarray(result.losses)
    metrics = {"status": this["status"],
               **({} if diverged is None else {"diverged_at_epoch": diverged.epoch,
                                               "error": advice(config, diverged)}),
               "final_loss": float(losses[-1]) if len(losses) else None,
               "initial_loss": float(losses[0]) if len(losses) else None,
               "epochs": config.epochs, "epochs_this_run": this["epochs_run"],
               "resumed_from_epoch": resumed_from,
               **held_out_metrics(result, data.batch, config.epochs, diverged is None,
                                 config.patience),
               "device": str(jax.devices()[0]), "device_count": jax.device_count(),
               "process_count": jax.process_count(), "platform": jax.default_backend(),
               "jax_version": jax.__version__, **history(config.out, this)}
    return {"config": described, "metrics": metrics, "losses": losses,
            "params": None if diverged else result.params, "preprocessing": prep}


def held_out_metrics(result: Any, batch: Any, epochs: int, finished: bool,
                     patience: int | None) -> dict[str, Any]:
    """The held-out losses with their epochs, ``best`` and ``last``: the epoch, training loss
    and held-out loss of the best and of the last (finite) evaluation whose params' training
    loss the run measured, and whether patience stopped the run; empty without held-out data.
    The training loss of the params at epoch e is losses[e]; at the run's end that of the
    params it returns, where they are those (patience's stop: the best, not the last)."""
    if result.eval_losses is None:
        return {}
    held, at = np.asarray(result.eval_losses, np.float64), np.asarray(result.eval_epochs).tolist()
    losses = np.asarray(result.losses, np.float64)
    end = None  # the training loss of the returned params, if they are those at len(losses)
    returned_last = finished and (patience is None or result.best_epoch == len(losses))

    def train_loss(e: int) -> float | None:
        nonlocal end
        if e < len(losses):
            return float(losses[e])
        if not returned_last:
            return None
        if end is None:
            end = float(batch_loss(result.params, batch))
        return end

    def point(i: int) -> dict[str, Any]:
        return {"epoch": at[i], "train_loss": train_loss(at[i]), "eval_loss": float(held[i])}

    finite = np.flatnonzero(np.isfinite(held))
    known = [i for i in finite if train_loss(at[i]) is not None]  # training loss measured
    last = int(known[-1]) if known else len(at) - 1
    return {"eval_epochs": at, "eval_losses": held.tolist(), "best_epoch": result.best_epoch,
            "best_eval_loss": float(np.nanmin(held)) if len(finite) else None,
            "final_eval_loss": float(held[last]), "stopped_early": finished and
            len(result.losses) < epochs, "best": point(at.index(result.best_epoch)),
            "last": point(last)}


def history(out: Path, this: dict[str, Any]) -> dict[str, Any]:
    """``runs``: every invocation of this run, this one last, the earlier ones from ``out``'s
    metrics.json when this one resumed its checkpoint (a fresh start, or --restart, begins
    anew); seconds, compile_seconds and epochs_per_second over those that trained (a rerun of
    a finished run trains nothing and leaves them as they were)."""
    path, runs = out / "metrics.json", []
    if this["resumed_from"] > 0 and path.is_file():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            runs = []
    runs = [*runs, this]
    trained = [r for r in runs if r["epochs_run"]]
    seconds, compiling = (sum(r[k] for r in trained) for k in ("seconds", "compile_seconds"))
    epochs = sum(r["epochs_run"] for r in trained)
    return {"seconds": seconds, "compile_seconds": compiling,  # compilation excluded:
            "epochs_per_second": epochs / max(seconds - compiling, 1e-9) if epochs else None,
            "runs": runs}


def plot_losses(config: dict[str, Any], losses: np.ndarray, metrics: dict[str, Any]) -> Any:
    """The training loss per epoch and, if there is one, the held-out loss at its epochs."""
    fig, ax = common.figure(width=6, height=4)
    def shown(values: Any) -> np.ndarray:  # a diverging curve drawn up to 1e30, where a log
        return np.minimum(np.asarray(values, np.float64), 1e30)  # axis still places its ticks

    ax.plot(shown(losses), label="training (mean over its rows)")
    if "eval_epochs" in metrics:
        held = [np.nan if v is None else v for v in metrics["eval_losses"]]
        ax.plot(metrics["eval_epochs"], shown(held), "o-", ms=3, label="held-out")
        ax.axvline(metrics["best_epoch"], color="gray", ls=":", lw=1, label="best held-out")
        ax.legend(fontsize=8)
    ax.set(yscale="log", xlabel="epoch", ylabel="batch loss (mean over samples)",
           title=f"{config['optimizer']}, lr={config['lr']:g}, N={config['N']}, D={config['D']}, "
                 f"H={config['H']}, O={config['O']}, {config['dtype']}")
    return fig


def report(res: dict[str, Any], out: Path, docs: Any = None) -> None:
    """Process 0 writes config.json, metrics.json (its ``status``), losses.csv, loss.png and,
    unless the run diverged, params.npz into ``out`` and prints the run's numbers: with
    held-out data, the best and the last evaluation each with its training and held-out loss,
    and which of the two params.npz holds. A diverged run ends with its advice (exit 1)."""
    config, metrics, losses, params = res["config"], res["metrics"], res["losses"], res["params"]
    if writes := parallel.is_main_process():  # process 0 writes the results
        write_results(out, config=config, metrics=metrics,
                      figures={"loss": plot_losses(config, losses, metrics)},
                      tables={"losses": (["epoch", "loss"], enumerate(losses.tolist()))})
        if params is None:  # diverged: no params (nor an older run's) for predict.py
            (out / "params.npz").unlink(missing_ok=True)
        else:
            save_params(out / "params.npz", params, preprocessing=res.get("preprocessing"))
    if params is None:
        raise Failed(metrics["error"])
    if not writes:
        return
    devices = (metrics["device"] if metrics["device_count"] == 1 else
               f"{metrics['device_count']} devices, {metrics['process_count']} process(es)")
    common.print_table(
        ["epochs", "initial loss", "final loss", "epochs/s", "compile s", "device"],
        [[len(losses), metrics["initial_loss"], metrics["final_loss"],
          metrics["epochs_per_second"], metrics["compile_seconds"], devices]], ".6g")
    if "eval_epochs" in metrics:
        kept = "best held-out" if config["patience"] is not None else "last"
        print()
        common.print_table(
            ["evaluation", "epoch", "training loss", "held-out loss", "params.npz"],
            [[name, p["epoch"], p["train_loss"], p["eval_loss"], "yes" if name == kept else ""]
             for name, p in (("best held-out", metrics["best"]), ("last", metrics["last"]))],
            ".6g")
    print(f"results in {out}/")


if __name__ == "__main__":
    sys.exit(main())
