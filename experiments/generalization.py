"""Why did averaging not generalise? Per-sample training then averaging vs training on the mean.

The homework trained one copy of A, B, C on each sample x_i, averaged the N
copies, and found the average did not give a low loss on a new x. On one
training set and a held-out set from the same distribution this compares:

  average    train_per_sample, then the mean of the N copies (the homework's method)
  batch GD   train on the mean loss, p <- p - lr * grad (the same rule, all samples at once)
  adam       optax.adam on the mean loss

by their loss on held-out samples, epoch by epoch, next to the starting
point's. The loss has a trivial minimiser (w = 0, e.g. C = 0), so ||C|| is
reported too. The conclusion printed at the end is computed from the numbers.

    python experiments/generalization.py --k 3 --n-train 256 --epochs 1000
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # float64: one averaged epoch equals one GD step exactly

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax import DivergenceError, train, train_per_sample  # noqa: E402
from abc_jax import files as io  # noqa: E402

NAME = "generalization"
METHODS = ("average", "batch_gd", "adam")
LABELS = {
    "average": "average of per-sample copies (homework)",
    "batch_gd": "batch GD on the mean loss",
    "adam": "adam on the mean loss",
}


def checkpoints(epochs: int, n: int = 24) -> list[int]:
    """About n epoch counts from 0 to ``epochs``, log-spaced, always including 0, 1 and epochs."""
    if epochs <= 0:
        return [0]
    pts = np.unique(np.round(np.geomspace(1, epochs, max(n, 2))).astype(int))
    return [0, *(int(e) for e in pts)]


def average_params(stacked: abc_jax.Params) -> abc_jax.Params:
    """The homework's average: the mean over the leading N axis of each matrix."""
    return abc_jax.Params(*(jnp.mean(p, axis=0) for p in stacked))


def frobenius(a: Any) -> float:
    return float(jnp.sqrt(jnp.sum(jnp.square(a))))


def _trainers(
    params0: abc_jax.Params, X: jax.Array, lr: float, adam_lr: float
) -> dict[str, Callable[[int], Any]]:
    """method -> (epochs -> TrainResult), each run from params0.

    Every call restarts from params0: the compiled loop is reused (the epoch
    count is not static), and adam's state needs no saving between calls.
    """
    adam = optax.adam(adam_lr)
    return {
        "average": lambda e: train_per_sample(params0, X, lr=lr, epochs=e, progress=False),
        "batch_gd": lambda e: train(params0, X, lr=lr, epochs=e, progress=False),
        "adam": lambda e: train(params0, X, lr=adam_lr, epochs=e, optimizer=adam,
                                progress=False),
    }


def run_generalization(
    k: int = 3,
    n_train: int = 256,
    n_test: int = 1024,
    epochs: int = 1000,
    *,
    lr: float = 0.01,
    adam_lr: float = 0.01,
    seed: int = 0,
    dtype: Any = jnp.float64,
    n_checkpoints: int = 24,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train the three ways and measure train and held-out loss at log-spaced epochs.

    Returns a dict with ``curves`` (one row per method and checkpoint epoch:
    train loss, held-out loss, ||A||, ||B||, ||C||), ``train_losses``
    (method -> per-epoch training objective: the mean loss for batch GD and
    adam; for the per-sample copies the mean over i of copy i's loss on its
    own sample x_i), ``final`` (method -> the last checkpoint's row),
    ``initial`` (the starting point's row) and diagnostics: ``own_sample_loss``
    (copies on their own samples at the end), ``single_copy_heldout`` (mean
    held-out loss of the individual copies) and ``one_epoch_gap`` (max
    |average - batch GD| after one epoch: the mean of N single steps from the
    same start is one step on the mean loss, so this is rounding only).
    """
    kp, ktr, kte = jax.random.split(jax.random.key(seed), 3)
    params0 = abc_jax.init_params(kp, k, dtype=dtype)
    Xtr = jax.random.normal(ktr, (n_train, k), dtype)
    Xte = jax.random.normal(kte, (n_test, k), dtype)

    def row(method: str, e: int, p: abc_jax.Params) -> dict[str, Any]:
        return {
            "method": method, "epoch": e,
            "train_loss": float(abc_jax.batch_loss(p, Xtr)),
            "heldout_loss": float(abc_jax.batch_loss(p, Xte)),
            "norm_A": frobenius(p.A), "norm_B": frobenius(p.B), "norm_C": frobenius(p.C),
            "singular_values_C": [float(s) for s in jnp.linalg.svd(p.C, compute_uv=False)],
        }

    initial = row("initial", 0, params0)
    trainers = _trainers(params0, Xtr, lr, adam_lr)
    sched = checkpoints(epochs, n_checkpoints)
    curves: list[dict[str, Any]] = []
    train_losses: dict[str, np.ndarray] = {}
    diverged: dict[str, str] = {}
    finals: dict[str, Any] = {}
    jobs = [(m, e) for m in METHODS for e in sched[1:]]
    bar = _common.progress(jobs, desc="train", unit="run") if show_progress else jobs
    for m, e in bar:
        if m in diverged:
            continue
        if e == sched[1]:
            curves.append({**initial, "method": m})
        try:
            res = trainers[m](e)
        except DivergenceError as err:
            diverged[m] = str(err)
            continue
        p = average_params(res.params) if m == "average" else res.params
        curves.append(row(m, e, p))
        if e == sched[-1]:
            losses = np.asarray(res.losses)
            train_losses[m] = losses.mean(axis=0) if m == "average" else losses
            finals[m] = res
    out: dict[str, Any] = {
        "config": dict(k=k, n_train=n_train, n_test=n_test, epochs=epochs, lr=lr,
                       adam_lr=adam_lr, seed=seed, dtype=jnp.dtype(dtype).name),
        "initial": initial, "curves": curves, "train_losses": train_losses,
        "diverged": diverged,
        "final": {m: [r for r in curves if r["method"] == m][-1] for m in METHODS
                  if m not in diverged},
    }
    if "average" in finals:
        copies = finals["average"].params
        own = jax.vmap(abc_jax.loss)(copies, Xtr)  # copy i on its own sample x_i
        held = jax.vmap(abc_jax.batch_loss, in_axes=(0, None))(copies, Xte)
        out["own_sample_loss"] = float(jnp.mean(own))
        out["single_copy_heldout"] = float(jnp.mean(held))
        out["single_copy_heldout_median"] = float(jnp.median(held))
    if epochs >= 1 and not {"average", "batch_gd"} & set(diverged):
        one_avg = average_params(trainers["average"](1).params)
        one_gd = trainers["batch_gd"](1).params
        out["one_epoch_gap"] = max(float(jnp.max(jnp.abs(a - b)))
                                   for a, b in zip(one_avg, one_gd, strict=True))
    return out


def conclusion(res: dict[str, Any]) -> list[str]:
    """Sentences stating what the measured numbers show (every claim is a comparison of them)."""
    init = res["initial"]
    fin = res["final"]
    L0 = init["heldout_loss"]
    lines = []
    for m in res["diverged"]:
        lines.append(f"{LABELS[m]} diverged: {res['diverged'][m].splitlines()[0]}")
    if "average" in fin:
        a = fin["average"]["heldout_loss"]
        verdict = "lower" if a < L0 else "higher"
        lines.append(
            f"Averaging the per-sample copies gives a held-out loss of {a:.4g}, {verdict} than "
            f"the starting point's {L0:.4g} ({_change(a, L0)})."
        )
        if "own_sample_loss" in res:
            own, single = res["own_sample_loss"], res["single_copy_heldout"]
            lines.append(
                f"Each copy fits its own sample (mean loss {own:.3g} there), but a single copy "
                f"scores {single:.4g} on held-out samples on average ({_change(single, L0)} vs "
                f"the start): "
                + ("fitting one x does not carry over to other x."
                   if single > 10 * max(own, 1e-300) else "it carries over to other x.")
            )
    for m in ("batch_gd", "adam"):
        if m in fin:
            g, t = fin[m]["heldout_loss"], fin[m]["train_loss"]
            name = LABELS[m][0].upper() + LABELS[m][1:]
            lines.append(
                f"{name}: held-out {g:.4g} ({_change(g, L0)}), training {t:.4g}; "
                f"held-out / training = {g / t:.3g}."
                if t > 0 else f"{name}: held-out {g:.4g}."
            )
    if "average" in fin and "batch_gd" in fin:
        a, g = fin["average"]["heldout_loss"], fin["batch_gd"]["heldout_loss"]
        if a > g:
            lines.append(
                f"So the average generalises worse than batch GD with the same rule, lr and "
                f"epochs: {a / g:.3g}x its held-out loss. Averaging minimisers of the N "
                "separate losses is not minimising their mean; gradient descent on the mean "
                "loss is."
            )
        else:
            lines.append(
                f"Here the average does as well as batch GD or better ({a:.4g} vs {g:.4g} "
                "held-out): averaging did not hurt on this data."
            )
        if "one_epoch_gap" in res:
            lines.append(
                f"After one epoch the two are the same point (max difference "
                f"{res['one_epoch_gap']:.1e}: the mean of N single steps is one step on the mean "
                "loss); they part as each copy keeps following its own sample."
            )
    best = min(fin, key=lambda m: fin[m]["heldout_loss"]) if fin else None
    if best is not None:
        c0, c = init["norm_C"], fin[best]["norm_C"]
        scale_only = (c / c0) ** 2  # the loss factor if C had only been scaled
        measured = fin[best]["heldout_loss"] / L0
        sv = ", ".join(f"{v:.2g}" for v in fin[best]["singular_values_C"])
        sv0 = ", ".join(f"{v:.2g}" for v in init["singular_values_C"])
        lines.append(
            f"The loss is minimised by w = 0 for every x: by C = 0 (trivially) or by any C whose "
            f"null space holds every z(x). The lowest held-out loss ({LABELS[best]}) has "
            f"||C|| = {c:.3g} (start {c0:.3g}); scaling C by that much alone would multiply the "
            f"loss by {scale_only:.2g}, against the {measured:.2g} measured, so "
            + (
                "most of the reduction is C shrinking towards the trivial minimiser."
                if measured > 0 and np.log(scale_only) / np.log(measured) > 0.5
                else f"most of it is not C shrinking: C's singular values went from [{sv0}] to "
                f"[{sv}], mapping the z(x) into (near) null directions of C."
            )
        )
    return lines


def _change(new: float, old: float) -> str:
    if old == 0:
        return "n/a"
    frac = 1 - new / old
    return f"{100 * frac:.1f}% reduction" if frac >= 0 else f"{100 * -frac:.1f}% increase"


def plot(res: dict[str, Any], path: Any) -> None:
    """Training objective, held-out loss and ||C|| against epochs (log axes)."""
    fig, (ax1, ax2, ax3) = _common.figure(ncols=3, width=4.6, height=3.9)
    colors = {"average": "C3", "batch_gd": "C0", "adam": "C2"}
    for m, losses in res["train_losses"].items():
        e = np.arange(1, len(losses))  # losses[e]: after e updates; e = 0 is the start
        label = ("per-sample copies, own sample (mean)" if m == "average" else LABELS[m])
        ax1.plot(e, losses[1:], color=colors[m], ls=":" if m == "average" else "-", label=label)
    for m in METHODS:
        pts = [r for r in res["curves"] if r["method"] == m and r["epoch"] > 0]
        if not pts:
            continue
        e = [r["epoch"] for r in pts]
        if m == "average":
            ax1.plot(e, [r["train_loss"] for r in pts], "o-", ms=3, color=colors[m],
                     label="average of copies, on the training set")
        ax2.plot(e, [r["heldout_loss"] for r in pts], "o-", ms=3, color=colors[m],
                 label=LABELS[m])
        ax3.plot(e, [r["norm_C"] for r in pts], "o-", ms=3, color=colors[m], label=LABELS[m])
    c = res["config"]
    L0 = res["initial"]["heldout_loss"]
    ax2.axhline(L0, color="gray", ls="--", lw=1, label="starting point")
    if "single_copy_heldout" in res:
        ax2.axhline(res["single_copy_heldout"], color="C3", ls=":", lw=1,
                    label="single copies at the end (mean)")
    ax3.axhline(res["initial"]["norm_C"], color="gray", ls="--", lw=1, label="starting point")
    for ax, ylabel, title in (
        (ax1, "training loss [mean ||w||², log]", "Training objective"),
        (ax2, "held-out loss [mean ||w||², log]", f"Held-out samples (N = {c['n_test']})"),
        (ax3, "||C||_F (Frobenius norm)", "Norm of C (C = 0 is a trivial minimiser)"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("epoch (updates done, log)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    fig.suptitle(f"K = {c['k']}, N_train = {c['n_train']}, lr = {c['lr']:g} "
                 f"(adam {c['adam_lr']:g}), {c['dtype']}", fontsize=10)
    io.save_figure(path, fig, dpi=_common.DPI)


CURVE_FIELDS = ["method", "epoch", "train_loss", "heldout_loss", "norm_A", "norm_B", "norm_C"]


def summary_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["method", "train loss", "held-out loss", "held-out change", "||C||"]
    rows = [["starting point", res["initial"]["train_loss"], res["initial"]["heldout_loss"],
             "-", res["initial"]["norm_C"]]]
    for m in METHODS:
        if m in res["final"]:
            f = res["final"][m]
            rows.append([m, f["train_loss"], f["heldout_loss"],
                         _change(f["heldout_loss"], res["initial"]["heldout_loss"]), f["norm_C"]])
    return header, rows


def metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The numbers a README quotes."""
    init = res["initial"]
    fin = res["final"]
    out = {
        "initial_heldout_loss": init["heldout_loss"],
        "initial_train_loss": init["train_loss"],
        "initial_norm_C": init["norm_C"],
        "heldout_loss": {m: fin[m]["heldout_loss"] for m in fin},
        "train_loss": {m: fin[m]["train_loss"] for m in fin},
        "norm_C": {m: fin[m]["norm_C"] for m in fin},
        "singular_values_C": {"initial": init["singular_values_C"],
                              **{m: fin[m]["singular_values_C"] for m in fin}},
        "heldout_reduction": {m: 1 - fin[m]["heldout_loss"] / init["heldout_loss"] for m in fin},
        "diverged": res["diverged"],
    }
    if "average" in fin:
        out["average_better_than_start"] = fin["average"]["heldout_loss"] < init["heldout_loss"]
        if "batch_gd" in fin:
            out["average_over_batch_gd_heldout"] = (
                fin["average"]["heldout_loss"] / fin["batch_gd"]["heldout_loss"])
    for k in ("own_sample_loss", "single_copy_heldout", "single_copy_heldout_median",
              "one_epoch_gap"):
        if k in res:
            out[k] = res[k]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--k", type=int, default=3, help="K = D = H = O (default 3, the homework)")
    ap.add_argument("--n-train", type=int, default=256, help="training samples (default 256)")
    ap.add_argument("--n-test", type=int, default=1024, help="held-out samples (default 1024)")
    ap.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    ap.add_argument("--lr", type=float, default=0.01,
                    help="learning rate of per-sample and batch GD (default 0.01)")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="adam's learning rate (0.01)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.n_train, args.n_test, args.epochs = 16, 32, 20
    out = _common.out_dir(args.out)
    env = _common.environment(jnp.float64)
    res = run_generalization(args.k, args.n_train, args.n_test, args.epochs, lr=args.lr,
                             adam_lr=args.adam_lr, seed=args.seed,
                             n_checkpoints=8 if args.quick else 24)
    print(f"{NAME}: K = {args.k}, N_train = {args.n_train}, N_held-out = {args.n_test}, "
          f"{args.epochs} epochs, lr = {args.lr:g}, adam lr = {args.adam_lr:g}, float64")
    header, rows = summary_rows(res)
    _common.print_table(header, rows, floatfmt=".4g")
    print()
    text = conclusion(res)
    for line in text:
        print(line)

    io.write_json(out / "config.json", {**vars(args), "out": str(args.out)})
    io.write_json(out / "metrics.json", {"environment": env, **metrics(res), "conclusion": text})
    io.write_csv(out / "curves.csv", CURVE_FIELDS,
                 ([r[f] for f in CURVE_FIELDS] for r in res["curves"]))
    tl = res["train_losses"]
    io.write_csv(out / "train_losses.csv", ["epoch", *tl],
                 ([e, *(float(tl[m][e]) for m in tl)] for e in range(args.epochs)) if tl else [])
    plot(res, out / "generalization.png")
    if args.docs is not None:
        _common.docs_copy(out / "generalization.png", args.docs)
    print(f"\nwrote {out}/config.json, metrics.json, curves.csv, train_losses.csv, "
          "generalization.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
