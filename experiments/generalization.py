"""Why did averaging not generalise? Per-sample training then averaging vs training on the mean.

The homework trained one copy of A, B, C on each sample x_i, averaged the N
copies, and found the average did not give a low loss on a new x. This trains
the average of per-sample copies, batch GD on the mean loss and adam on the
mean loss on one training set, and compares their loss on held-out samples
epoch by epoch (averaging.run_generalization). The conclusion printed at the
end is computed from the numbers (averaging.conclusion).

With t = 0 the best answer is C = 0, so there is nothing to learn. The second part
(teacher.py) gives the same three methods a task with something to learn: targets from a
fixed random teacher network plus Gaussian noise of std --sigma, whose noise floor (the
teacher's own mean loss on fresh samples) is O sigma^2; it prints each method's held-out
loss over that floor.

    python experiments/generalization.py --k 3 --n-train 256 --epochs 1000
    python experiments/generalization.py --teacher-dims 5,8,3 --sigma 0.1 --teacher-epochs 40000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

jax.config.update("jax_enable_x64", True)  # float64: one averaged epoch equals one GD step exactly

import _common  # noqa: E402
import averaging  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import teacher  # noqa: E402

NAME = "generalization"
QUICK_TEACHER = dict(teacher_n_train=64, teacher_n_test=256, teacher_epochs=400,
                     per_sample_epochs=50)


def _dims(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected D,H,O such as 5,8,3, got {text!r}")
    return dims


def teacher_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("the teacher task (t = f_teacher(x) + noise)")
    g.add_argument("--teacher-dims", type=_dims, default=(5, 8, 3), metavar="D,H,O",
                   help="shapes of the teacher and the student (default: 5,8,3)")
    g.add_argument("--sigma", type=float, default=0.1, help="std of the targets' noise")
    g.add_argument("--gain", type=float, default=3.0,
                   help="the teacher's A scaled by this: sigmoids that bend")
    g.add_argument("--teacher-n-train", type=int, default=1024, help="training samples")
    g.add_argument("--teacher-n-test", type=int, default=4096, help="fresh held-out samples")
    g.add_argument("--teacher-epochs", type=int, default=40000, help="epochs of GD and adam")
    g.add_argument("--teacher-lr", type=float, default=0.2, help="GD's learning rate")
    g.add_argument("--teacher-adam-lr", type=float, default=0.01, help="adam's learning rate")
    g.add_argument("--per-sample-lr", type=float, default=0.01,
                   help="GD's learning rate for each per-sample copy (stable on every sample)")
    g.add_argument("--per-sample-epochs", type=int, default=1000,
                   help="epochs of each per-sample copy")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--k", type=int, default=3, help="K = D = H = O (default 3, the homework)")
    ap.add_argument("--n-train", type=int, default=256, help="training samples (default 256)")
    ap.add_argument("--n-test", type=int, default=1024, help="held-out samples (default 1024)")
    ap.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    ap.add_argument("--lr", type=float, default=0.01,
                    help="learning rate of per-sample and batch GD (default 0.01)")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="adam's learning rate (0.01)")
    teacher_flags(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs = 16, 32, 20
        vars(args).update(QUICK_TEACHER)
    res = averaging.run_generalization(
        args.k, args.n_train, args.n_test, args.epochs, lr=args.lr, adam_lr=args.adam_lr,
        seed=args.seed, n_checkpoints=8 if args.quick else 24)
    print(f"{NAME}: K = {args.k}, N_train = {args.n_train}, N_held-out = {args.n_test}, "
          f"{args.epochs} epochs, lr = {args.lr:g}, adam lr = {args.adam_lr:g}, float64")
    _common.print_table(*averaging.summary_rows(res), floatfmt=".4g")
    text = averaging.conclusion(res)
    print("\n" + "\n".join(text))
    taught = run_teacher(args)
    tl = res["train_losses"]
    _common.write_and_report(
        args.out, args.docs, [NAME, "teacher"],
        config=vars(args),
        metrics={"environment": _common.environment(jnp.float64), **averaging.metrics(res),
                 "conclusion": text,
                 "teacher": {k: v for k, v in taught.items() if k != "curves"}},
        tables={"curves": averaging.curve_rows(res),
                "train_losses": (["epoch", *tl],
                                 [[e, *(float(tl[m][e]) for m in tl)]
                                  for e in range(args.epochs if tl else 0)]),
                "teacher_curves": teacher.curve_rows(taught)},
        figures={NAME: averaging.plot(res), "teacher": teacher.plot(taught)},
    )
    return 0


def run_teacher(args: argparse.Namespace) -> dict:
    """The teacher task with the flags' settings; prints its table and conclusion."""
    taught = teacher.run_teacher(
        args.teacher_dims, args.sigma, args.gain, args.teacher_n_train, args.teacher_n_test,
        args.teacher_epochs, args.teacher_lr, args.teacher_adam_lr, args.per_sample_lr,
        args.per_sample_epochs, seed=args.seed)
    D, H, O = args.teacher_dims
    print(f"\nteacher task: D, H, O = {D}, {H}, {O}, gain {args.gain:g}, sigma = {args.sigma:g} "
          f"(noise floor O sigma^2 = {taught['noise_floor']:.4g}), N_train = "
          f"{args.teacher_n_train}, N_held-out = {args.teacher_n_test}, {args.teacher_epochs} "
          f"epochs (GD lr {args.teacher_lr:g}, adam lr {args.teacher_adam_lr:g}); copies: "
          f"{args.per_sample_epochs} epochs at lr {args.per_sample_lr:g}")
    _common.print_table(*teacher.summary_rows(taught), floatfmt=".4g")
    taught["conclusion"] = teacher.conclusion(taught)
    print(taught["conclusion"])
    return taught


if __name__ == "__main__":
    sys.exit(main())
