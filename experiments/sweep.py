"""A learning-rate x seed sweep in one compiled loop (train_many), and what that saves.

Every (lr, seed) pair is one member of ONE train_many call: seed s draws the initial
params (init_params(key(s))), the lrs are log-spaced, and every member is evaluated on the
same --n-eval held-out rows every --eval-every epochs, so the members are ranked by their
best held-out loss, not by their training loss. Written: a heat map of the final
loss over lr x seed, the loss curves per lr with a band over the seeds (median, min-max),
diverged members marked, and the ranking (ranking.csv). Timed (interleaved rounds, every
call waited for): train_many on the grid against a Python loop of train calls on the same
grid; the benchmark of --bench-members members at K = --bench-k, N = --bench-n,
--bench-epochs epochs (float32) against as many train calls, printed as a ratio; and the
same for --diverging-members members at K = --diverging-k whose lrs reach
--diverging-lr-max, so that most diverge within a few epochs (stopped members stop costing:
the loop runs the others alone).

    python -m experiments.sweep --lrs 16 --seeds 8 --k 16 --n 1024
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.patches
import numpy as np

import abc_jax
from abc_jax import DivergenceError, train, train_many
from experiments import common

NAME = "sweep"


@dataclasses.dataclass(frozen=True)
class Config:
    """The sweep's grid and problem, and the benchmark; ``QUICK``: the --quick values."""

    k: int = common.flag(8, "K = D = H = O")
    n: int = common.flag(256, "training samples N (shared by all)")
    epochs: int = common.flag(300, "epochs per member")
    lrs: int = common.flag(8, "learning rates, log-spaced")
    lr_min: float = common.flag(0.01, "smallest learning rate")
    lr_max: float = common.flag(1.0, "largest learning rate")
    seeds: int = common.flag(4, "seeds (initial params) per lr")
    n_eval: int = common.flag(256, "held-out rows (shared by all)")
    eval_every: int = common.flag(20, "epochs between evaluations")
    dtype: str = common.flag("float32", "dtype", choices=["float32", "float64"])
    rounds: int = common.flag(5, "timed rounds of each variant")
    bench_members: int = common.flag(64, "benchmark members (0: skip)")
    bench_k: int = common.flag(3, "benchmark K")
    bench_n: int = common.flag(256, "benchmark N")
    bench_epochs: int = common.flag(500, "benchmark epochs")
    diverging_members: int = common.flag(
        128, "members of the second benchmark, lr log-spaced 0.01 .. --diverging-lr-max, most "
        "of them diverging within a few epochs (0: skip)")
    diverging_k: int = common.flag(16, "the second benchmark's K")
    diverging_lr_max: float = common.flag(30.0, "the second benchmark's largest lr")
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(min(self.k, self.n, self.epochs, self.lrs, self.seeds, self.rounds,
                         self.n_eval, self.eval_every) >= 1 and 0 < self.lr_min <= self.lr_max
                     and min(self.bench_k, self.bench_n, self.bench_epochs,
                             self.bench_members + 1) >= 1,
                     "sizes must be >= 1 (--bench-members >= 0) and 0 < --lr-min <= --lr-max")


QUICK = Config(k=3, n=16, epochs=20, lrs=3, seeds=2, rounds=1, n_eval=16, eval_every=5,
               bench_members=4, bench_n=16, bench_epochs=20, diverging_members=8,
               diverging_k=3, quick=True)


def problem(k: int, n: int, seeds: int, dtype: Any, data_seed: int,
            n_eval: int = 0) -> tuple[Any, ...]:
    """Params stacked over seeds (seeds, ...) from init_params(key(s)), X (n, k) and, with
    ``n_eval``, held-out rows (n_eval, k) of the same distribution."""
    ps = [abc_jax.init_params(jax.random.key(s), k, dtype=dtype) for s in range(seeds)]
    X = jax.random.normal(jax.random.key(10_000 + data_seed), (n, k), dtype)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    if not n_eval:
        return stacked, X
    return stacked, X, jax.random.normal(jax.random.key(20_000 + data_seed), (n_eval, k), dtype)


def ranking(res: Any, member_lr: np.ndarray, seeds: int) -> list[list[Any]]:
    """Members by best held-out loss (diverged ones last): rank, lr, seed, that loss, its
    epoch, the final training loss (None if diverged)."""
    best = np.asarray(res.eval_losses, np.float64)
    best = np.where(np.isfinite(best), best, np.inf).min(axis=1)
    order = np.argsort(best, kind="stable")
    bad = np.asarray(res.diverged)
    return [[i + 1, float(member_lr[m]), int(m % seeds), None if np.isinf(best[m]) else
             float(best[m]), int(res.best_epoch[m]), None if bad[m] else
             float(res.losses[m, -1])] for i, m in enumerate(order)]


def grid(params: Any, lrs: np.ndarray) -> tuple[Any, np.ndarray]:
    """Members (lr i, seed s) at index i * S + s: params repeated per lr, lr per member."""
    S = params.A.shape[0]
    return jax.tree.map(lambda a: jnp.tile(a, (len(lrs), 1, 1)), params), np.repeat(lrs, S)


def loop_of_train(params: Any, X: Any, lrs: np.ndarray, epochs: int) -> list[Any]:
    """The same members one train call at a time (a diverged one: its error's result)."""
    out = []
    for m, lr in enumerate(lrs):
        try:
            out.append(train(jax.tree.map(lambda a, m=m: a[m], params), X, lr=float(lr),
                             epochs=epochs, progress=False))
        except DivergenceError as err:
            out.append(err.result)
    return out


def timed(params: Any, X: Any, lrs: np.ndarray, epochs: int, rounds: int) -> dict[str, Any]:
    """train_many against the loop of train calls, interleaved; seconds, ratio and the largest
    relative difference of their final losses over the members that did not diverge."""
    t = common.time_interleaved(
        {"train_many": lambda: train_many(params, X, lr=lrs, epochs=epochs, progress=False),
         "train_loop": lambda: loop_of_train(params, X, lrs, epochs)},
        rounds=rounds, min_time=0.0)
    many, alone = t["train_many"].output, t["train_loop"].output
    ok = [m for m, r in enumerate(alone) if len(r.losses) == epochs and not many.diverged[m]]
    diff = max((abs(float(many.losses[m, -1]) / float(alone[m].losses[-1]) - 1) for m in ok),
               default=float("nan"))
    at = np.asarray(many.diverged_at)
    return {"members": len(lrs), "K": params.A.shape[-1], "epochs": epochs,
            "train_many_s": t["train_many"].median_s,
            "diverged": int((at >= 0).sum()), "median_diverged_at": float(np.median(at[at >= 0]))
            if (at >= 0).any() else None,
            "train_loop_s": t["train_loop"].median_s, "rounds": t["train_many"].rounds,
            "ratio": t["train_loop"].median_s / t["train_many"].median_s,
            "train_many_compile_s": t["train_many"].compile_s, "max_rel_diff_final_loss": diff}


def bands(losses: np.ndarray, n_lr: int) -> np.ndarray:
    """(n_lr, 3, epochs): median, min and max over the seeds of each lr (NaN-aware)."""
    L = losses.reshape(n_lr, -1, losses.shape[-1])
    L = np.where(np.isfinite(L), L, np.nan)
    with warnings.catch_warnings():  # an lr whose every seed diverged: NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack([np.nanmedian(L, 1), np.nanmin(L, 1), np.nanmax(L, 1)], axis=1)


def plot(held: np.ndarray, band: np.ndarray, lrs: np.ndarray, title: str) -> Any:
    """Heat map of log10 best held-out loss (lr x seed, diverged: x) and training curves
    with seed bands."""
    fig, (hm, ax) = common.figure(ncols=2, width=5.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        img = hm.imshow(np.log10(held), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(img, ax=hm, label="log10 best held-out loss")
    for i, s in zip(*np.nonzero(~np.isfinite(held)), strict=True):
        hm.text(s, i, "x", ha="center", va="center", color="red", fontsize=9)
    hm.set(xlabel="seed (initial params)", ylabel="learning rate",
           title="Best held-out loss (x: diverged)",
           xticks=range(held.shape[1]), yticks=range(len(lrs)),
           yticklabels=[f"{v:.3g}" for v in lrs])
    hm.grid(False)
    best = np.unravel_index(np.nanargmin(held), held.shape) if np.isfinite(held).any() else None
    if best is not None:
        hm.add_patch(matplotlib.patches.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1,
                                                  fill=False, ec="red", lw=2))
    colors = matplotlib.colormaps["plasma"](np.linspace(0, 0.9, len(lrs)))
    for lr, b, c in zip(lrs, band, colors, strict=True):
        ax.semilogy(b[0], color=c, lw=1.2, label=f"lr {lr:.3g}")
        ax.fill_between(np.arange(b.shape[1]), b[1], b[2], color=c, alpha=0.2, lw=0)
    start = band[:, 2, 0][np.isfinite(band[:, 2, 0])]
    low = band[:, 1][np.isfinite(band[:, 1])]
    if start.size and low.size:  # diverging curves leave the frame upwards
        ax.set_ylim(low.min() / 2, start.max() * 10)
    ax.set(xlabel="epoch", ylabel="training loss",
           title="Training loss per lr: median, band min-max over seeds")
    ax.legend(fontsize=6, ncols=2)
    fig.suptitle(title)
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """The sweep in one train_many call (a bar on a terminal), then the timings."""
    jax.config.update("jax_enable_x64", cfg.dtype == "float64" or jax.config.jax_enable_x64)
    dtype, env = jnp.dtype(cfg.dtype), common.environment(cfg.dtype)
    lrs = np.geomspace(cfg.lr_min, cfg.lr_max, cfg.lrs)
    params, X, Xh = problem(cfg.k, cfg.n, cfg.seeds, dtype, cfg.seed, cfg.n_eval)
    members, member_lr = grid(params, lrs)
    res = train_many(members, X, lr=member_lr, epochs=cfg.epochs, eval_data=Xh,
                     eval_every=cfg.eval_every)
    L, at = np.asarray(res.losses, np.float64), np.asarray(res.diverged_at)
    timings = {"sweep": timed(members, X, member_lr, cfg.epochs, cfg.rounds)}
    if cfg.bench_members:
        bp, bX = problem(cfg.bench_k, cfg.bench_n, cfg.bench_members, jnp.float32, cfg.seed)
        timings["bench"] = timed(bp, bX, np.full(cfg.bench_members, 0.05), cfg.bench_epochs,
                                 cfg.rounds)
    if cfg.diverging_members:  # one seed, the lrs from stable to diverging at once
        dp, dX = problem(cfg.diverging_k, cfg.bench_n, 1, jnp.float32, cfg.seed)
        dlrs = np.geomspace(0.01, cfg.diverging_lr_max, cfg.diverging_members)
        dp = jax.tree.map(lambda a: jnp.repeat(a, cfg.diverging_members, axis=0), dp)
        timings["diverging"] = timed(dp, dX, dlrs, cfg.bench_epochs, cfg.rounds)
    final = np.where(at < 0, L[:, -1], np.nan).reshape(cfg.lrs, cfg.seeds)
    desc = (f"{cfg.lrs} lrs x {cfg.seeds} seeds = {len(member_lr)} members, K = {cfg.k}, "
            f"N = {cfg.n}, {cfg.epochs} epochs, {env['dtype']}")
    return {"config": dataclasses.asdict(cfg) | {"lr_values": lrs.tolist()},
            "env": env, "lrs": lrs, "member_lr": member_lr, "losses": L, "diverged_at": at,
            "final": final, "band": bands(L, cfg.lrs), "timings": timings, "desc": desc,
            "ranking": ranking(res, member_lr, cfg.seeds),
            "held": held_out_grid(res, cfg.lrs)}


def held_out_grid(res: Any, n_lr: int) -> np.ndarray:
    """(lr, seed): each member's best held-out loss, NaN where it diverged."""
    best = np.asarray(res.eval_losses, np.float64)
    best = np.where(np.isfinite(best), best, np.inf).min(axis=1)
    return np.where(np.asarray(res.diverged) | np.isinf(best), np.nan, best).reshape(n_lr, -1)


RANKING = ["rank", "lr", "seed", "best_eval_loss", "best_epoch", "final_train_loss"]


FIELDS = ["members", "epochs", "diverged", "train_many_s", "train_loop_s", "ratio", "rounds",
          "max_rel_diff_final_loss"]


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the final-loss table (lr x seed, "-": diverged) and the timings, with their
    ratios; write the files (``write``)."""
    env, final = res["env"], res["final"]
    print(f"{NAME}: {res['desc']}; device {env['device_label']} ({env['cpu_count']} CPUs)")
    rows = [[f"{lr:.3g}", *(None if np.isnan(v) else float(v) for v in row)]
            for lr, row in zip(res["lrs"], final, strict=True)]
    common.print_table(["lr", *(f"seed {s}" for s in range(final.shape[1]))], rows, ".3g")
    print("\nranked by best held-out loss (the top 5):")
    common.print_table(RANKING, res["ranking"][:5], ".4g")
    print()
    timings = res["timings"]
    common.print_table(["part", *FIELDS], [[p, *(t[f] for f in FIELDS)]
                                            for p, t in timings.items()], ".4g")
    for part, t in timings.items():
        print(f"{part}: train_many of {t['members']} members is {t['ratio']:.1f}x faster than "
              f"{t['members']} train calls ({t['train_many_s'] * 1e3:.1f} ms vs "
              f"{t['train_loop_s'] * 1e3:.1f} ms, median of {t['rounds']} interleaved rounds)")
    return write(res, out, docs)


def write(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """config.json, metrics.json, final_loss.csv, curves.csv, timing.csv and sweep.png (and
    its --docs copy)."""
    lrs, member_lr, final, band = res["lrs"], res["member_lr"], res["final"], res["band"]
    L, at, S = res["losses"], res["diverged_at"], res["config"]["seeds"]
    top = res["ranking"][0]
    return common.write_and_report(NAME,
        out, docs, ["sweep"], config=res["config"],
        figures={"sweep": plot(res["held"], band, lrs, res["desc"])},
        metrics={"environment": res["env"], "lrs": lrs.tolist(),
                 "final_loss": [[None if np.isnan(v) else float(v) for v in r] for r in final],
                 "diverged_at": at.reshape(len(lrs), S).tolist(), "timing": res["timings"],
                 "best": None if top[3] is None else dict(zip(RANKING[1:], top[1:],
                                                              strict=True))},
        tables={"final_loss": (["lr", "seed", "final_loss", "diverged_at"],
                               [[float(member_lr[m]), m % S, None if at[m] >= 0 else
                                 float(L[m, -1]), int(at[m])] for m in range(len(member_lr))]),
                "curves": (["epoch", *(f"lr{lr:.3g}_{q}" for lr in lrs
                                       for q in ("median", "min", "max"))],
                           [[e, *band[:, :, e].ravel().tolist()] for e in range(L.shape[1])]),
                "timing": (["part", *FIELDS], [[p, *(t[f] for f in FIELDS)]
                                               for p, t in res["timings"].items()]),
                "ranking": (RANKING, res["ranking"])})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
