"""Why did averaging not generalise? Per-sample training then averaging vs training on the mean.

The homework trained one copy of A, B, C on each sample x_i, averaged the N
copies, and found the average did not give a low loss on a new x. This trains
the average of per-sample copies, batch GD on the mean loss and adam on the
mean loss on one training set, and compares their loss on held-out samples
epoch by epoch (averaging.run_generalization). The conclusion printed at the
end is computed from the numbers (averaging.conclusion).

With t = 0 the best answer is C = 0, so there is nothing to learn. The second part
(common/teacher.py) gives the same three methods a task with something to learn: targets from a
fixed random teacher network plus Gaussian noise of std --sigma, whose noise floor (the
teacher's own mean loss on fresh samples) is O sigma^2; it prints each method's held-out
loss over that floor.

    python -m experiments.generalization --k 3 --n-train 256 --epochs 1000
    python -m experiments.generalization --teacher-dims 5,8,3 --sigma 0.1 --teacher-epochs 40000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # float64: one averaged epoch equals one GD step exactly

import jax.numpy as jnp  # noqa: E402

from experiments import common  # noqa: E402
from experiments.common import averaging, teacher  # noqa: E402

NAME = "generalization"
def _dims(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected D,H,O such as 5,8,3, got {text!r}")
    return dims


TEACHER = "the teacher task (t = f_teacher(x) + noise)"  # its flags' heading in --help


@dataclasses.dataclass(frozen=True)
class Config:
    """The zero-target task, then the teacher task; ``QUICK``: the --quick values."""

    k: int = common.flag(3, "K = D = H = O (default 3, the homework)")
    n_train: int = common.flag(256, "training samples (default 256)")
    n_test: int = common.flag(1024, "held-out samples (default 1024)")
    epochs: int = common.flag(1000, "epochs (default 1000)")
    lr: float = common.flag(0.01, "learning rate of per-sample and batch GD (default 0.01)")
    adam_lr: float = common.flag(0.01, "adam's learning rate")
    seed: int = common.flag(0, "random seed")
    n_checkpoints: int = 24  # epochs at which the curves are recorded
    teacher_dims: tuple[int, int, int] = common.flag(
        (5, 8, 3), "shapes of the teacher and the student (default: 5,8,3)", type=_dims,
        metavar="D,H,O", nargs=None, group=TEACHER)
    sigma: float = common.flag(0.1, "std of the targets' noise", group=TEACHER)
    gain: float = common.flag(3.0, "the teacher's A scaled by this: sigmoids that bend",
                              group=TEACHER)
    teacher_n_train: int = common.flag(1024, "training samples", group=TEACHER)
    teacher_n_test: int = common.flag(4096, "fresh held-out samples", group=TEACHER)
    teacher_epochs: int = common.flag(40000, "epochs of GD and adam", group=TEACHER)
    teacher_lr: float = common.flag(0.2, "GD's learning rate", group=TEACHER)
    teacher_adam_lr: float = common.flag(0.01, "adam's learning rate", group=TEACHER)
    per_sample_lr: float = common.flag(
        0.01, "GD's learning rate for each per-sample copy (stable on every sample)",
        group=TEACHER)
    per_sample_epochs: int = common.flag(1000, "epochs of each per-sample copy", group=TEACHER)
    quick: bool = False


QUICK = Config(n_train=16, n_test=32, epochs=20, n_checkpoints=8, teacher_n_train=64,
               teacher_n_test=256, teacher_epochs=400, per_sample_epochs=50, quick=True)


def run(cfg: Config) -> dict[str, Any]:
    """Both tasks: ``averaging.run_generalization`` and ``teacher.run_teacher``."""
    res = averaging.run_generalization(
        cfg.k, cfg.n_train, cfg.n_test, cfg.epochs, lr=cfg.lr, adam_lr=cfg.adam_lr,
        seed=cfg.seed, n_checkpoints=cfg.n_checkpoints)
    taught = teacher.run_teacher(
        cfg.teacher_dims, cfg.sigma, cfg.gain, cfg.teacher_n_train, cfg.teacher_n_test,
        cfg.teacher_epochs, cfg.teacher_lr, cfg.teacher_adam_lr, cfg.per_sample_lr,
        cfg.per_sample_epochs, seed=cfg.seed)
    taught["conclusion"] = teacher.conclusion(taught)
    return {"config": dataclasses.asdict(cfg), "environment": common.environment(jnp.float64),
            "zero_target": res, "teacher": taught}


def report(results: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print both tasks' tables and conclusions; write config.json, metrics.json, curves.csv,
    train_losses.csv, teacher_curves.csv, generalization.png and teacher.png."""
    cfg = types.SimpleNamespace(**results["config"])
    res, taught = results["zero_target"], results["teacher"]
    print(f"{NAME}: K = {cfg.k}, N_train = {cfg.n_train}, N_held-out = {cfg.n_test}, "
          f"{cfg.epochs} epochs, lr = {cfg.lr:g}, adam lr = {cfg.adam_lr:g}, float64")
    common.print_table(*averaging.summary_rows(res), floatfmt=".4g")
    text = averaging.conclusion(res)
    print("\n" + "\n".join(text))
    D, H, O = cfg.teacher_dims
    print(f"\nteacher task: D, H, O = {D}, {H}, {O}, gain {cfg.gain:g}, sigma = {cfg.sigma:g} "
          f"(noise floor O sigma^2 = {taught['noise_floor']:.4g}), N_train = "
          f"{cfg.teacher_n_train}, N_held-out = {cfg.teacher_n_test}, {cfg.teacher_epochs} "
          f"epochs (GD lr {cfg.teacher_lr:g}, adam lr {cfg.teacher_adam_lr:g}); copies: "
          f"{cfg.per_sample_epochs} epochs at lr {cfg.per_sample_lr:g}")
    common.print_table(*teacher.summary_rows(taught), floatfmt=".4g")
    print(taught["conclusion"])
    tl = res["train_losses"]
    return common.write_and_report(
        NAME, out, docs, [NAME, "teacher"], config=results["config"],
        metrics={"environment": results["environment"], **averaging.metrics(res),
                 "conclusion": text,
                 "teacher": {k: v for k, v in taught.items() if k != "curves"}},
        tables={"curves": averaging.curve_rows(res),
                "train_losses": (["epoch", *tl],
                                 [[e, *(float(tl[m][e]) for m in tl)]
                                  for e in range(cfg.epochs if tl else 0)]),
                "teacher_curves": teacher.curve_rows(taught)},
        figures={NAME: averaging.plot(res), "teacher": teacher.plot(taught)},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
