"""Why did averaging not generalise? Per-sample training then averaging vs training on the mean.

The homework trained one copy of A, B, C on each sample x_i, averaged the N
copies, and found the average did not give a low loss on a new x. This trains
the average of per-sample copies, batch GD on the mean loss and adam on the
mean loss on one training set, and compares their loss on held-out samples
epoch by epoch (averaging.run_generalization). The conclusion printed at the
end is computed from the numbers (averaging.conclusion).

    python experiments/generalization.py --k 3 --n-train 256 --epochs 1000
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax

jax.config.update("jax_enable_x64", True)  # float64: one averaged epoch equals one GD step exactly

import _common  # noqa: E402
import averaging  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from abc_jax.files import write_results  # noqa: E402

NAME = "generalization"


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--k", type=int, default=3, help="K = D = H = O (default 3, the homework)")
    ap.add_argument("--n-train", type=int, default=256, help="training samples (default 256)")
    ap.add_argument("--n-test", type=int, default=1024, help="held-out samples (default 1024)")
    ap.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    ap.add_argument("--lr", type=float, default=0.01,
                    help="learning rate of per-sample and batch GD (default 0.01)")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="adam's learning rate (0.01)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs = 16, 32, 20
    res = averaging.run_generalization(
        args.k, args.n_train, args.n_test, args.epochs, lr=args.lr, adam_lr=args.adam_lr,
        seed=args.seed, n_checkpoints=8 if args.quick else 24)
    print(f"{NAME}: K = {args.k}, N_train = {args.n_train}, N_held-out = {args.n_test}, "
          f"{args.epochs} epochs, lr = {args.lr:g}, adam lr = {args.adam_lr:g}, float64")
    _common.print_table(*averaging.summary_rows(res), floatfmt=".4g")
    text = averaging.conclusion(res)
    print("\n" + "\n".join(text))
    tl = res["train_losses"]
    written = write_results(
        _common.out_dir(args.out),
        config=vars(args),
        metrics={"environment": _common.environment(jnp.float64), **averaging.metrics(res),
                 "conclusion": text},
        tables={"curves": averaging.curve_rows(res),
                "train_losses": (["epoch", *tl],
                                 [[e, *(float(tl[m][e]) for m in tl)]
                                  for e in range(args.epochs if tl else 0)])},
        figures={NAME: averaging.plot(res)},
    )
    if args.docs is not None:
        _common.docs_copy(written[f"{NAME}.png"], args.docs)
    print(f"\nwrote {args.out}/: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
