"""Which optimizer reaches a target loss first? Hand-rolled GD, optax.sgd, momentum, adam.

From one start, each at a few learning rates: gd (train's p <- p - lr g), sgd (optax.sgd(lr),
the same rule: its curve must equal gd's), momentum (optax.sgd(lr, momentum=0.9)) and adam.
Per run: the first epoch at or below the target loss (a fraction of the starting loss) and the
seconds to get there (that many epochs after compilation, in interleaved rounds on JAX's device
at --precision). Each one's best lr: the fewest epochs to the target, else the lowest loss."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax import DivergenceError, train
from abc_jax.edge import PRECISIONS
from experiments import common

NAME = "optimizers"
LRS = {"gd": (0.01, 0.03, 0.1, 0.3), "sgd": (0.01, 0.03, 0.1, 0.3),
       "momentum": (0.003, 0.01, 0.03, 0.1), "adam": (0.003, 0.01, 0.03, 0.1)}
LABELS = {name: label for name, (label, _) in common.OPTIMIZERS.items()}
LINE = {"gd": dict(color="C0", lw=3.0, alpha=0.45), "sgd": dict(color="k", lw=1.0, ls="--"),
        "momentum": dict(color="C1"), "adam": dict(color="C2")}  # gd, sgd overlaid: both seen
RUN_FIELDS = ["optimizer", "lr", "device", "precision", "epochs", "final_loss",
              "epochs_to_target", "seconds_to_target", "wall_s", "compile_s", "diverged_at"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The problem, the target and the learning rates; ``QUICK``: the --quick values."""

    k: int = common.flag(16, "K = D = H = O")
    n: int = common.flag(1024, "training samples N")
    epochs: int = common.flag(500, "epochs per run")
    target: float = common.flag(0.001, "target loss / initial loss")
    dtype: str = common.flag("float32", "dtype", choices=["float32", "float64"])
    precision: str = common.flag("highest", common.cli.PRECISION_HELP, choices=PRECISIONS)
    seed: int = common.flag(0, "random seed")
    lrs: tuple[tuple[str, tuple[float, ...]], ...] = tuple(LRS.items())  # optimizer -> its lrs
    repeats: int = 5  # timed runs of each
    min_time: float = 0.05  # timed seconds of each run to the target, at least
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(0 < self.target < 1, "--target must be a fraction in (0, 1)")


QUICK = Config(k=3, n=16, epochs=30, target=0.5, repeats=1, min_time=0.0, quick=True,
               lrs=tuple((m, grid[1:3]) for m, grid in LRS.items()))


def first_hit(losses: Sequence[float], target: float) -> int | None:
    """The first epoch e with losses[e] <= target (losses[e] is before update e), else None."""
    hit = np.flatnonzero(np.asarray(losses) <= target)
    return int(hit[0]) if hit.size else None


def run_one(name: str, lr: float, params: abc_jax.Params, X: jax.Array, epochs: int,
            target: float, repeats: int, precision: str) -> dict[str, Any]:
    """One (optimizer, lr) run: losses, epochs to the target, divergence; ``wall_s``, the median
    of ``repeats`` runs after the compiling one; and ``fit(epochs=e)`` (no recompilation)."""
    fit = functools.partial(train, params, X, **common.rate_kwargs(name, lr),
                            progress=False, precision=precision)
    rec = dict(dict.fromkeys([*RUN_FIELDS, "params"]), optimizer=name, lr=lr, epochs=epochs,
               device=common.device_label(), precision=precision, fit=fit)
    try:
        t = common.time_interleaved({"run": lambda: fit(epochs=epochs)}, rounds=repeats,
                                     min_time=0.0)["run"]
        out, rec["params"] = t.output, t.output.params
        rec |= {"wall_s": t.median_s, "compile_s": t.compile_s,
                "final_loss": float(abc_jax.batch_loss(out.params, X, precision=precision))}
    except DivergenceError as err:
        out, rec["diverged_at"] = err.result, err.epoch
    losses = np.asarray(out.losses, np.float64)
    return rec | {"losses": losses, "epochs_to_target": first_hit(losses, target)}


def run_sweep(cfg: Config, lrs: dict[str, Sequence], repeats: int, min_time: float) -> dict:
    """Every optimizer at every lr from one start, target ``cfg.target`` * initial loss; then
    ``seconds_to_target``: interleaved runs of ``epochs_to_target`` epochs of the undiverged hits;
    gd against sgd at each lr: max |loss difference| over epochs and max |param difference|."""
    params, X = common.problem(jax.random.key(cfg.seed), cfg.n, cfg.k,
                                dtype=jnp.dtype(cfg.dtype))
    L0 = float(abc_jax.batch_loss(params, X, precision=cfg.precision))
    runs = [run_one(m, lr, params, X, cfg.epochs, cfg.target * L0, repeats, cfg.precision)
            for m, lr in common.progress([(m, lr) for m in lrs for lr in lrs[m]], desc="sweep")]
    hits = {f"{r['optimizer']}@{r['lr']:g}": r for r in runs
            if r["epochs_to_target"] is not None and r["diverged_at"] is None}
    times = common.time_interleaved({k: lambda r=r: r["fit"](epochs=r["epochs_to_target"])
                                      for k, r in hits.items()}, rounds=repeats, min_time=min_time)
    for k, r in hits.items():
        r["seconds_to_target"] = times[k].median_s
    sgd = {r["lr"]: r for r in runs if r["optimizer"] == "sgd"}
    pairs = [(g, sgd[g["lr"]]) for g in runs if g["optimizer"] == "gd" and g["lr"] in sgd
             and len(g["losses"]) == len(sgd[g["lr"]]["losses"])]
    d = {f"{g['lr']:g}": {  # param difference None where they diverged
        "max_abs_param_diff": None if g["params"] is None or s["params"] is None else max(
            e["max_abs"] for e in abc_jax.grad_errors(g["params"], s["params"]).values()),
        "max_abs_loss_diff": float(np.max(np.abs(g["losses"] - s["losses"]), initial=0.0)),
    } for g, s in pairs}
    return {"runs": runs, "best": (best := best_runs(runs)), "winner": winners(best, runs),
            "initial_loss": L0, "target_loss": cfg.target * L0, "gd_vs_sgd": d} | {
        f"gd_vs_sgd_{k}": max([v[k] for v in d.values() if v[k] is not None], default=np.nan)
        for k in ("max_abs_loss_diff", "max_abs_param_diff")}


def best_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: the run reaching the target in the fewest epochs, else the lowest final
    loss. Diverged runs are never best unless every run of that optimizer diverged."""
    by = {r["optimizer"]: [q for q in runs if q["optimizer"] == r["optimizer"]] for r in runs}
    return {m: min([r for r in rs if r["diverged_at"] is None] or rs, key=lambda r: [
        float("inf") if r[k] is None else r[k] for k in ("epochs_to_target", "final_loss")])
        for m, rs in by.items()}


def winners(best: dict[str, dict[str, Any]], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Who reached the target first, in epochs (ties listed together) and in seconds, from
    each optimizer's best run; and which run of all ended with the lowest loss (None: none)."""
    hits = {m: r for m, r in best.items() if r["epochs_to_target"] is not None}
    fewest = min((r["epochs_to_target"] for r in hits.values()), default=None)
    tied = [m for m, r in hits.items() if r["epochs_to_target"] == fewest]
    fast = min(hits, key=lambda m: hits[m]["seconds_to_target"], default=None)
    low = min((r for r in runs if r["final_loss"] is not None), key=lambda r: r["final_loss"],
              default=None)
    return {"by_epochs": {"optimizers": tied, "lrs": [hits[m]["lr"] for m in tied],
                          "epochs": fewest} if hits else None,
            "by_seconds": {"optimizer": fast, "lr": hits[fast]["lr"],
                           "seconds": hits[fast]["seconds_to_target"]} if hits else None,
            "lowest_final_loss": low and {k: low[k] for k in ("optimizer", "lr", "final_loss")}}


def plot(res: dict[str, Any], title: str) -> dict[str, Any]:
    """Loss against epoch at each optimizer's best lr (gd and sgd overlaid); and final loss
    and epochs to the target against the lr (diverged runs drawn at the initial loss)."""
    (fig, ax), (sweep, axes) = common.figure(width=6.5), common.figure(ncols=2, width=5.0)
    for m, best in res["best"].items():
        hit, div = best["epochs_to_target"], best["diverged_at"]
        note = (f"diverged at epoch {div}" if div is not None else "target not reached"
                if hit is None else f"target at epoch {hit}")
        ax.semilogy(best["losses"], **LINE[m], label=f"{LABELS[m]} (lr {best['lr']:g}, {note})")
        mine = [r for r in res["runs"] if r["optimizer"] == m and r["diverged_at"] is None]
        for a, key in zip(axes, ("final_loss", "epochs_to_target"), strict=True):
            ok = np.array([(r["lr"], r[key]) for r in mine if r[key] is not None]).reshape(-1, 2)
            a.loglog(*ok.T, marker="o", **LINE[m], label=LABELS[m])  # value against lr
    div = [r["lr"] for r in res["runs"] if r["diverged_at"] is not None]
    axes[0].plot(div, [res["initial_loss"]] * len(div), "rX", ms=9, label="diverged" if div else "")
    for a in (ax, axes[0]):
        a.axhline(res["target_loss"], c="gray", ls=":", label=f"target = {res['target_loss']:.3g}")
    axes[0].axhline(res["initial_loss"], c="gray", ls="--", label="initial loss")
    ax.set(xlabel="epoch (full-batch updates)", ylabel="training loss [mean ||w||², log]",
           title=title)
    axes[0].set(ylabel="final training loss [mean ||w||², log]", title="Loss after all epochs")
    axes[1].set(ylabel="epochs to the target [log]", title="Epochs to the target (if reached)")
    for a in (ax, *axes):
        a.legend(fontsize=7)
    sweep.supxlabel("learning rate (log)")
    sweep.suptitle(title)
    return {"optimizers": fig, "optimizers_sweep": sweep}


def run(cfg: Config) -> dict[str, Any]:
    """Every optimizer at each of its learning rates from one start (``run_sweep``)."""
    jax.config.update("jax_enable_x64", cfg.dtype == "float64" or jax.config.jax_enable_x64)
    env = common.environment(cfg.dtype, cfg.precision)
    res = run_sweep(cfg, dict(cfg.lrs), cfg.repeats, cfg.min_time)
    return {"config": dataclasses.asdict(cfg) | {"lrs": dict(cfg.lrs)}, "environment": env,
            **res}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print every run, the best of each optimizer and the winners; write config.json,
    metrics.json, runs.csv, best_curves.csv, optimizers.png and optimizers_sweep.png."""
    cfg = types.SimpleNamespace(**res["config"])
    env = res["environment"]
    desc = (f"K = {cfg.k}, N = {cfg.n}, {cfg.epochs} epochs, {env['dtype']}, "
            f"target = {cfg.target:g} x initial loss = {res['target_loss']:.4g}")
    print(f"{NAME}: {desc}; device {env['device_label']} ({env['cpu_count']} CPUs), "
          f"precision {cfg.precision}")
    runs, best, table = res["runs"], res["best"], [[r[f] for f in RUN_FIELDS] for r in res["runs"]]
    common.print_table(RUN_FIELDS, table, ".4g")
    print(f"\nhand-rolled GD vs optax.sgd at the same lr: max |loss difference| "
          f"{res['gd_vs_sgd_max_abs_loss_diff']:.3g}, max |parameter difference| "
          f"{res['gd_vs_sgd_max_abs_param_diff']:.3g} over {len(res['gd_vs_sgd'])} lrs\n")
    common.print_table(["best run of each", "lr", "epochs to target", "s to target (compiled)",
                         f"loss after {cfg.epochs} epochs"], [
        [LABELS[m], r["lr"], r["epochs_to_target"], r["seconds_to_target"], r["final_loss"]]
        for m, r in best.items()], ".3g")
    e, s, f = (res["winner"][k] for k in ("by_epochs", "by_seconds", "lowest_final_loss"))
    print(f"first to the target: in epochs {' = '.join(e['optimizers'])}, in seconds "
          f"{s['optimizer']}" if e else "no run reached the target; raise --epochs or --target")
    if f:
        print(f"lowest loss of all runs: {f['optimizer']} (lr {f['lr']:g}), {f['final_loss']:.3g}")
    curves = itertools.zip_longest(*(r["losses"].tolist() for r in best.values()))
    metrics = {k: v for k, v in res.items() if k != "config"}
    return common.write_and_report(
        NAME, out, docs, [NAME], config=res["config"], figures=plot(res, desc),
        metrics=metrics | {"runs": [{f: r[f] for f in RUN_FIELDS} for r in runs],
                           "best": {m: {f: r[f] for f in RUN_FIELDS} for m, r in best.items()}},
        tables={"runs": (RUN_FIELDS, table),
                "best_curves": (["epoch", *(f"{m}_lr{r['lr']:g}" for m, r in best.items())],
                                [[e, *c] for e, c in enumerate(curves)])})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
