"""Which optimizer reaches a target loss first? Hand-rolled GD, optax.sgd, momentum, adam.

Trains the batch loss from one starting point with each optimizer over a few
learning rates each:

  gd        the hand-rolled rule p <- p - lr * g (train's optimizer=None)
  sgd       optax.sgd(lr): the same rule through Optax; its curve must equal gd's
  momentum  optax.sgd(lr, momentum=0.9)
  adam      optax.adam(lr)

and reports, per run, the first epoch whose loss is at or below the target
(a fraction of the starting loss) and the wall time to get there: a run of
exactly that many epochs, after compilation, every run that reached the target
timed against the others in interleaved rounds (_common.time_interleaved), on
the device JAX runs on at one matmul precision (--precision, default highest).
The best lr of each optimizer is the one that reaches the target in the fewest
epochs (else the lowest final loss).

    python experiments/optimizers.py --k 16 --n 1024 --epochs 500 --target 0.001
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax import DivergenceError, train
from abc_jax.files import write_results

NAME = "optimizers"
LRS: dict[str, tuple[float, ...]] = {
    "gd": (0.01, 0.03, 0.1, 0.3),
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "momentum": (0.003, 0.01, 0.03, 0.1),
    "adam": (0.003, 0.01, 0.03, 0.1),
}
COLORS = {"gd": "C0", "sgd": "k", "momentum": "C1", "adam": "C2"}
LABELS = {name: label for name, (label, _) in _common.OPTIMIZERS.items()}


def first_hit(losses: Sequence[float], target: float) -> int | None:
    """The first epoch e with losses[e] <= target (losses[e] is before update e), else None."""
    hit = np.flatnonzero(np.asarray(losses) <= target)
    return int(hit[0]) if hit.size else None


def run_one(name: str, lr: float, params: abc_jax.Params, X: jax.Array, epochs: int,
            target: float, repeats: int = 5, precision: str = "highest") -> dict[str, Any]:
    """One (optimizer, lr) run: losses, epochs to the target, divergence, time per run.

    The first call compiles (the same optimizer object is reused, so later calls hit
    the cache); ``wall_s`` is the median of ``repeats`` timed runs of all epochs. The
    seconds to the target come later, from ``time_to_target``, which reuses ``fit``
    (kept in the record, a run of e epochs).
    """
    opt = _common.make_optimizer(name, lr)  # the same object each call: one compilation

    def fit(e: int) -> Any:
        return train(params, X, lr=lr, epochs=e, optimizer=opt, progress=False,
                     precision=precision)

    rec: dict[str, Any] = {"optimizer": name, "lr": lr, "epochs": epochs,
                           "device": _common.device_label(), "precision": precision,
                           "seconds_to_target": None, "fit": fit}
    try:
        t = _common.time_interleaved({"run": lambda: fit(epochs)}, rounds=repeats,
                                     min_time=0.0)["run"]
    except DivergenceError as err:
        losses = np.asarray(err.result.losses, np.float64)
        return {**rec, "diverged_at": err.epoch, "losses": losses, "final_loss": None,
                "epochs_to_target": first_hit(losses, target), "wall_s": None,
                "compile_s": None, "params": None}
    res, losses = t.output, np.asarray(t.output.losses, np.float64)
    return {**rec, "diverged_at": None, "losses": losses,
            "final_loss": float(abc_jax.batch_loss(res.params, X, precision=precision)),
            "epochs_to_target": first_hit(losses, target), "wall_s": t.median_s,
            "compile_s": t.compile_s, "params": res.params}


def time_to_target(runs: Sequence[dict[str, Any]], repeats: int = 5,
                   min_time: float = 0.05) -> None:
    """Set ``seconds_to_target`` of every run that reached the target and did not diverge.

    losses[hit] is the loss after ``hit`` updates, so a run of exactly ``hit`` epochs
    ends at that point; all such runs are timed against each other in interleaved
    rounds, compile time excluded.
    """
    fns = {f"{r['optimizer']}@{r['lr']:g}": (lambda r=r: r["fit"](r["epochs_to_target"]))
           for r in runs if r["epochs_to_target"] is not None and r["diverged_at"] is None}
    if not fns:
        return
    times = _common.time_interleaved(fns, rounds=repeats, min_time=min_time)
    for r in runs:
        t = times.get(f"{r['optimizer']}@{r['lr']:g}")
        if t is not None:
            r["seconds_to_target"] = t.median_s


def run_sweep(k: int = 8, n: int = 512, epochs: int = 500, *, target: float = 0.01,
              lrs: dict[str, Sequence[float]] | None = None, seed: int = 0,
              dtype: Any = jnp.float32, precision: str = "highest", repeats: int = 5,
              min_time: float = 0.05, show_progress: bool = True) -> dict[str, Any]:
    """Every optimizer at every lr from one start; target = ``target`` * initial loss.

    Returns ``runs`` (one dict per run), ``best`` (optimizer -> its best run),
    ``initial_loss``, ``target_loss`` and ``gd_vs_sgd`` (max |loss difference|
    and max |parameter difference| of gd and optax.sgd at each shared lr).
    """
    lrs = dict(LRS if lrs is None else lrs)
    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, k, dtype=dtype)
    X = jax.random.normal(kx, (n, k), dtype)
    L0 = float(abc_jax.batch_loss(params, X, precision=precision))
    target_loss = target * L0
    jobs = [(m, lr) for m, grid in lrs.items() for lr in grid]
    bar = _common.progress(jobs, desc="sweep", unit="run") if show_progress else jobs
    runs = [run_one(m, lr, params, X, epochs, target_loss, repeats, precision)
            for m, lr in bar]
    time_to_target(runs, repeats, min_time)
    return {"runs": runs, "best": best_runs(runs), "initial_loss": L0,
            "target_loss": target_loss, "gd_vs_sgd": gd_vs_sgd(runs)}


def best_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: the run reaching the target in the fewest epochs, else the lowest final loss.

    Diverged runs are never best unless every run of that optimizer diverged.
    """
    best: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == m]
        ok = [r for r in mine if r["diverged_at"] is None] or mine

        def rank(r: dict[str, Any]) -> tuple[float, float]:
            hit = r["epochs_to_target"]
            final = r["final_loss"] if r["final_loss"] is not None else float("inf")
            return (hit if hit is not None else float("inf"), final)

        best[m] = min(ok, key=rank)
    return best


def gd_vs_sgd(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """At each lr run by both: max |loss_gd - loss_sgd| over epochs and max |param difference|."""
    by = {(r["optimizer"], r["lr"]): r for r in runs}
    out = {}
    for (m, lr), r in by.items():
        s = by.get(("sgd", lr))
        if m != "gd" or s is None or len(r["losses"]) != len(s["losses"]):
            continue
        d_loss = float(np.max(np.abs(r["losses"] - s["losses"]))) if len(r["losses"]) else 0.0
        d_par = None
        if r["params"] is not None and s["params"] is not None:
            d_par = max(float(jnp.max(jnp.abs(a - b)))
                        for a, b in zip(r["params"], s["params"], strict=True))
        out[f"{lr:g}"] = {"max_abs_loss_diff": d_loss, "max_abs_param_diff": d_par}
    return out


def winners(best: dict[str, dict[str, Any]],
            runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Who reached the target first, in epochs (ties listed together) and in seconds, from
    each optimizer's best run; and which run of all ended with the lowest loss."""
    hits = {m: r for m, r in best.items() if r["epochs_to_target"] is not None}
    out: dict[str, Any] = {"by_epochs": None, "by_seconds": None, "lowest_final_loss": None}
    if hits:
        fewest = min(r["epochs_to_target"] for r in hits.values())
        tied = [m for m, r in hits.items() if r["epochs_to_target"] == fewest]
        out["by_epochs"] = {"optimizers": tied, "lrs": [hits[m]["lr"] for m in tied],
                            "epochs": fewest}
        m = min(hits, key=lambda m: hits[m]["seconds_to_target"])
        out["by_seconds"] = {"optimizer": m, "lr": hits[m]["lr"],
                             "seconds": hits[m]["seconds_to_target"]}
    finished = [r for r in (runs or best.values()) if r["final_loss"] is not None]
    if finished:
        r = min(finished, key=lambda r: r["final_loss"])
        out["lowest_final_loss"] = {"optimizer": r["optimizer"], "lr": r["lr"],
                                    "final_loss": r["final_loss"]}
    return out


def plot_curves(res: dict[str, Any], title: str) -> Any:
    """Loss against epoch for the best lr of each optimizer, gd and sgd overlaid."""
    fig, ax = _common.figure(width=6.5, height=4.3)
    style = {"gd": dict(color=COLORS["gd"], lw=3.0, alpha=0.45),
             "sgd": dict(color=COLORS["sgd"], lw=1.0, ls="--"),
             "momentum": dict(color=COLORS["momentum"]), "adam": dict(color=COLORS["adam"])}
    for m, r in res["best"].items():
        L = r["losses"]
        hit = r["epochs_to_target"]
        note = f", target at epoch {hit}" if hit is not None else ", target not reached"
        if r["diverged_at"] is not None:
            note = f", diverged at epoch {r['diverged_at']}"
        ax.plot(np.arange(len(L)), L, **style.get(m, {}),
                label=f"{LABELS.get(m, m)} (lr {r['lr']:g}{note})")
    ax.axhline(res["target_loss"], color="gray", ls=":", lw=1,
               label=f"target = {res['target_loss']:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (full-batch updates)")
    ax.set_ylabel("training loss [mean ||w||², log]")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_sweep(res: dict[str, Any], title: str) -> Any:
    """Final loss and epochs to the target against the learning rate, per optimizer."""
    fig, (ax1, ax2) = _common.figure(ncols=2, width=5.0, height=4.0)
    marker = {"gd": "o", "sgd": "x", "momentum": "s", "adam": "^"}
    shown = False
    for m in dict.fromkeys(r["optimizer"] for r in res["runs"]):
        mine = [r for r in res["runs"] if r["optimizer"] == m]
        ok = [r for r in mine if r["final_loss"] is not None]
        kw = dict(marker=marker.get(m, "o"), label=LABELS.get(m, m), color=COLORS.get(m),
                  ls="--" if m == "sgd" else "-", mfc="none" if m == "gd" else None, ms=7)
        ax1.plot([r["lr"] for r in ok], [r["final_loss"] for r in ok], **kw)
        hits = [r for r in ok if r["epochs_to_target"] is not None]
        ax2.plot([r["lr"] for r in hits], [r["epochs_to_target"] for r in hits], **kw)
        div = [r["lr"] for r in mine if r["diverged_at"] is not None]
        if div:
            ax1.plot(div, [res["initial_loss"]] * len(div), "X", color="red", ms=9,
                     label="diverged (drawn at the initial loss)" if not shown else None)
            shown = True
    ax1.axhline(res["target_loss"], color="gray", ls=":", lw=1, label="target")
    ax1.axhline(res["initial_loss"], color="gray", ls="--", lw=1, label="initial loss")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate (log)")
        ax.legend(fontsize=7)
    ax1.set_ylabel("final training loss [mean ||w||², log]")
    ax1.set_title("Loss after all epochs", fontsize=10)
    ax2.set_ylabel("epochs to reach the target [log]")
    ax2.set_title("Epochs to the target (runs that reached it)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    return fig


RUN_FIELDS = ["optimizer", "lr", "device", "precision", "epochs", "final_loss",
              "epochs_to_target", "seconds_to_target", "wall_s", "compile_s", "diverged_at"]


def parse(argv: Sequence[str] | None) -> tuple[Any, dict[str, Sequence[float]]]:
    """The flags, and the learning rates to sweep (two of each grid with --quick)."""
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--k", type=int, default=16, help="K = D = H = O")
    ap.add_argument("--n", type=int, default=1024, help="training samples N")
    ap.add_argument("--epochs", type=int, default=500, help="epochs per run")
    ap.add_argument("--target", type=float, default=0.001,
                    help="target loss as a fraction of the initial loss")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype")
    _common.add_precision_flag(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    lrs: dict[str, Sequence[float]] = dict(LRS)
    if args.quick:
        args.k, args.n, args.epochs, args.target = 3, 16, 30, 0.5
        lrs = {m: grid[1:3] for m, grid in LRS.items()}
    if not 0 < args.target < 1:
        ap.error("--target must be a fraction in (0, 1)")
    return args, lrs


def report(res: dict[str, Any], win: dict[str, Any], epochs: int) -> None:
    """Print every run, gd against optax.sgd, the best lrs and the winners."""
    _common.print_table(
        ["optimizer", "lr", "device", "precision", "final loss", "epochs to target",
         "ms to target", "ms per run"],
        [[LABELS[r["optimizer"]], r["lr"], r["device"], r["precision"],
          f"diverged @{r['diverged_at']}" if r["diverged_at"] is not None else r["final_loss"],
          r["epochs_to_target"],
          *(None if r[k] is None else f"{r[k] * 1e3:.1f}" for k in ("seconds_to_target",
                                                                    "wall_s"))]
         for r in res["runs"]], floatfmt=".4g")
    d = res["gd_vs_sgd"]
    dp = max((v["max_abs_param_diff"] for v in d.values()
              if v["max_abs_param_diff"] is not None), default=float("nan"))
    print(f"\nhand-rolled GD vs optax.sgd at the same lr: max |loss difference| "
          f"{res['gd_vs_sgd_max_abs_loss_diff']:.3g}, max |parameter difference| {dp:.3g} "
          f"over {len(d)} lrs")
    print("best lr of each: " + ", ".join(
        f"{m} {r['lr']:g} ({r['epochs_to_target']} epochs)" for m, r in res["best"].items()))
    if win["by_epochs"]:
        e, s = win["by_epochs"], win["by_seconds"]
        who = " = ".join(f"{LABELS[m]} (lr {lr:g})"
                         for m, lr in zip(e["optimizers"], e["lrs"], strict=True))
        print(f"first to the target in epochs: {who}, {e['epochs']} epochs")
        print(f"first to the target in seconds: {LABELS[s['optimizer']]} (lr {s['lr']:g}), "
              f"{s['seconds'] * 1e3:.2g} ms after compilation")
    else:
        print("no optimizer reached the target; raise --epochs or --target")
    if win["lowest_final_loss"]:
        f = win["lowest_final_loss"]
        print(f"lowest loss after {epochs} epochs: {LABELS[f['optimizer']]} "
              f"(lr {f['lr']:g}), {f['final_loss']:.3g}")


def main(argv: Sequence[str] | None = None) -> int:
    args, lrs = parse(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    out = _common.out_dir(args.out)
    env = _common.environment(args.dtype, args.precision)
    res = run_sweep(args.k, args.n, args.epochs, target=args.target, lrs=lrs, seed=args.seed,
                    dtype=jnp.dtype(args.dtype), precision=args.precision,
                    repeats=1 if args.quick else 5, min_time=0.0 if args.quick else 0.05)
    res["gd_vs_sgd_max_abs_loss_diff"] = max(
        (d["max_abs_loss_diff"] for d in res["gd_vs_sgd"].values()), default=float("nan"))
    win = winners(res["best"], res["runs"])
    desc = (f"K = {args.k}, N = {args.n}, {args.epochs} epochs, {env['dtype']}, "
            f"target = {args.target:g} x initial loss = {res['target_loss']:.4g}")
    print(f"{NAME}: {desc}; device {env['device_label']} ({env['cpu_count']} CPUs), "
          f"precision {args.precision}")
    report(res, win, args.epochs)
    best = res["best"]
    n_ep = max(len(r["losses"]) for r in best.values())
    curves = [[e, *(float(r["losses"][e]) if e < len(r["losses"]) else None
                    for r in best.values())] for e in range(n_ep)]
    metrics = {k: res[k] for k in ("initial_loss", "target_loss", "gd_vs_sgd",
                                   "gd_vs_sgd_max_abs_loss_diff")}
    written = write_results(
        out, config=_common.config_of(args, lrs={m: list(g) for m, g in lrs.items()}),
        metrics={"environment": env, **metrics, "winner": win,
                 "best": {m: {f: r[f] for f in RUN_FIELDS} for m, r in best.items()},
                 "runs": [{f: r[f] for f in RUN_FIELDS} for r in res["runs"]]},
        tables={"runs": (RUN_FIELDS, [[r[f] for f in RUN_FIELDS] for r in res["runs"]]),
                "best_curves": (["epoch", *(f"{m}_lr{r['lr']:g}" for m, r in best.items())],
                                curves)},
        figures={"optimizers": plot_curves(res, desc), "optimizers_sweep": plot_sweep(res, desc)})
    if args.docs is not None:
        _common.docs_copy(out / "optimizers.png", args.docs)
    print(f"wrote {out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
