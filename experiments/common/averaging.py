"""The homework's average of per-sample copies (no low loss on a new x) against batch GD and adam
on the mean loss, on held-out samples at log-spaced epochs; sentences from the numbers alone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import abc_jax
from abc_jax import DivergenceError, train, train_many
from experiments import common

METHODS = ("average", "batch_gd", "adam")
LABELS = {"average": "average of per-sample copies (homework)",
          "batch_gd": "batch GD on the mean loss", "adam": "adam on the mean loss"}
CURVE_FIELDS = ["method", "epoch", "train_loss", "heldout_loss", "norm_A", "norm_B", "norm_C"]
CARRY_OVER = 2.0  # a copy "carries over" when its held-out loss is within this of its own
SAME_POINT = 1e-10  # one epoch: max |average - batch GD| below this is the same point


def checkpoints(epochs: int, n: int = 24) -> list[int]:
    """About n epoch counts from 0 to ``epochs``, log-spaced, always including 0, 1 and epochs."""
    grid = np.unique(np.round(np.geomspace(1, max(epochs, 1), max(n, 2))))
    return [0, *(int(e) for e in grid if epochs > 0)]


def average_params(stacked: abc_jax.Params) -> abc_jax.Params:
    """The homework's average: the mean over the leading N axis of each matrix."""
    return abc_jax.Params(*(jnp.mean(p, axis=0) for p in stacked))


def _row(method: str, e: int, p: abc_jax.Params, Xtr: jax.Array, Xte: jax.Array) -> dict:
    """Train and held-out loss, ||A||_F, ||B||_F, ||C||_F and C's singular values at p."""
    return {"method": method, "epoch": e, "train_loss": float(abc_jax.batch_loss(p, Xtr)),
            "heldout_loss": float(abc_jax.batch_loss(p, Xte)),
            **{f"norm_{n}": float(np.linalg.norm(np.asarray(a))) for n, a in p._asdict().items()},
            "singular_values_C": np.linalg.svd(np.asarray(p.C), compute_uv=False).tolist()}


def _copies_diverged(res: abc_jax.TrainManyResult, lr: float, marks: list[int]) -> str | None:
    """``train_per_sample``'s message for copies whose loss became non-finite, as a run to the
    first of ``marks`` past the divergence would have raised it; None if no copy diverged."""
    at = np.asarray(res.diverged_at)
    if not (at >= 0).any():
        return None
    e = int(at[at >= 0].min())
    i, upto = int(np.flatnonzero(at == e)[0]), next(m for m in marks if m > e)
    return (f"training diverged: sample {i}'s loss is {res.losses[i, e]} at epoch {e} "
            f"(lr={lr:g}); {int(((at >= 0) & (at < upto)).sum())} of {len(at)} copies diverged; "
            f"try a smaller learning rate, e.g. lr={lr / 10:g}. The error's .result holds every "
            "copy's last finite params and all losses, NaN from a copy's divergence on")


def one_run(method: str, p0: abc_jax.Params, Xtr: jax.Array, Xte: jax.Array, marks: list[int],
            lr: float, adam_lr: float) -> tuple[list[dict], Any, str | None, Any]:
    """One run of ``method`` to the last of ``marks``, recorded as it goes: a callback after
    every epoch (chunks of one epoch) adds a ``_row`` at each epoch of ``marks`` (the copies'
    average for "average": ``train_many`` with copy i a member on row i, as ``train_per_sample``).
    Returns (rows up to a divergence, the result, the divergence's message or None, the params
    at epoch 1 or None), what training afresh to every mark gave, in one run."""
    rows, first = [], {}

    def record(epoch: int, params: abc_jax.Params, metrics: dict) -> None:
        if epoch in marks[1:]:
            p = average_params(params) if method == "average" else params
            rows.append(_row(method, epoch, p, Xtr, Xte))
            first.setdefault("params", p)

    run = dict(epochs=marks[-1], epochs_per_chunk=1, callbacks=[record])
    if method == "average":
        res = train_many(p0, Xtr[:, None], lr=lr, progress=True, **run)
        error = _copies_diverged(res, lr, marks)
        at = np.asarray(res.diverged_at)
        end = int(at[at >= 0].min()) if error else marks[-1]
    else:
        rate = {"lr": lr} if method == "batch_gd" else {"optimizer": optax.adam(adam_lr)}
        try:
            res, error, end = train(p0, Xtr, progress=True, **rate, **run), None, marks[-1]
        except DivergenceError as err:
            res, error, end = err.result, str(err), err.epoch
    return [r for r in rows if r["epoch"] <= end], res, error, first.get("params")


def run_generalization(k: int, n_train: int, n_test: int, epochs: int, *, lr: float = 0.01,
                       adam_lr: float = 0.01, seed: int = 0, n_checkpoints: int = 24) -> dict:
    """The three ways from one start, one run each recorded at log-spaced epochs (float64;
    X_train (n_train, k), X_heldout (n_test, k) standard normal): ``curves``,
    ``train_losses``, ``final``, ``initial``, ``diverged``, ``own_sample_loss``,
    ``single_copy_heldout(_median)``, ``one_epoch_gap``."""
    kp, ktr, kte = jax.random.split(jax.random.key(seed), 3)
    p0 = abc_jax.init_params(kp, k, dtype=jnp.float64)
    Xtr, Xte = (jax.random.normal(kk, (n, k), jnp.float64) for kk, n in [(ktr, n_train),
                                                                       (kte, n_test)])
    initial, marks = _row("initial", 0, p0, Xtr, Xte), checkpoints(epochs, n_checkpoints)
    curves, train_losses, diverged, out, at_one = [], {}, {}, {}, {}
    for m in METHODS:
        rows, res, error, at_one[m] = one_run(m, p0, Xtr, Xte, marks, lr, adam_lr)
        curves += [{**initial, "method": m}, *rows]
        if error is not None:
            diverged[m] = error
            continue
        train_losses[m] = np.atleast_2d(res.losses).mean(axis=0)  # copies: (N, epochs)
        if m == "average":
            held = jax.vmap(abc_jax.batch_loss, in_axes=(0, None))(res.params, Xte)
            own = float(jnp.mean(jax.vmap(abc_jax.loss)(res.params, Xtr)))
            out |= {"own_sample_loss": own, "single_copy_heldout": float(jnp.mean(held)),
                    "single_copy_heldout_median": float(jnp.median(held))}
    out |= {"config": dict(k=k, n_train=n_train, n_test=n_test, epochs=epochs, lr=lr,
                           adam_lr=adam_lr, seed=seed, dtype="float64"),
            "initial": initial, "curves": curves, "train_losses": train_losses,
            "diverged": diverged, "final": {r["method"]: r for r in curves
                                            if r["method"] not in diverged}}
    if epochs >= 1 and not {"average", "batch_gd"} & set(diverged):
        out["one_epoch_gap"] = max(float(abs(a - b).max()) for a, b in
                                   zip(at_one["average"], at_one["batch_gd"], strict=True))
    return out


def change(new: float, old: float) -> str:
    """'12.3% reduction' or '4.5% increase' from old to new."""
    frac = 1 - new / old if old else 0.0
    return f"{100 * abs(frac):.1f}% {'reduction' if frac >= 0 else 'increase'}" if old else "n/a"


def carry_over_sentence(own: float, single: float) -> str:
    """Does a copy carry over to other x (held-out ``single`` <= CARRY_OVER x ``own`` loss)?"""
    if own < 0 or single < 0:
        raise ValueError(f"losses must be >= 0, got own={own}, single={single}")
    ratio = single / own if own > 0 else (1.0 if single == 0 else float("inf"))
    return (f"A copy trained on one x reaches {own:.3g} on that x and {single:.3g} on held-out "
            f"x ({ratio:.3g}x): " + ("it carries over to other x." if ratio <= CARRY_OVER
                                     else "it fits its own sample, not the distribution."))


def average_sentence(avg: float, gd: float, start: float) -> str:
    """The average of the copies against batch GD and against not training, on held-out x."""
    vs_gd = f"{avg / gd:.3g}x the held-out loss of" if avg > gd else "no worse than"
    return (f"On held-out x the average of the copies scores {avg:.4g} ({change(avg, start)} from "
            f"{start:.4g}: {'better' if avg < start else 'no better'} than not training), batch "
            f"GD on the mean loss {gd:.4g}: the average has {vs_gd} batch GD.")


def conclusion(res: dict[str, Any]) -> list[str]:
    """The sentences above for one ``run_generalization`` result; whether the average and batch
    GD coincide after one epoch; how much of the lowest held-out loss's fall is ||C|| shrinking."""
    init, fin = res["initial"], res["final"]
    lines = [f"{LABELS[m]} diverged: {err.splitlines()[0]}" for m, err in res["diverged"].items()]
    if "average" in fin and "batch_gd" in fin:
        lines.append(average_sentence(fin["average"]["heldout_loss"],
                                      fin["batch_gd"]["heldout_loss"], init["heldout_loss"]))
    if "own_sample_loss" in res:
        lines.append(carry_over_sentence(res["own_sample_loss"], res["single_copy_heldout"]))
    if (gap := res.get("one_epoch_gap")) is not None:
        lines.append(f"After one epoch the two are the same point (max difference {gap:.1e}): "
                     "the mean of N single steps is one step on the mean loss." if gap <= SAME_POINT
                     else f"After one epoch the two already differ by {gap:.1e}.")
    if fin:
        best = min(fin.values(), key=lambda f: f["heldout_loss"])
        c0, c, actual = init["norm_C"], best["norm_C"], best["heldout_loss"] / init["heldout_loss"]
        scale_only = (c / c0) ** 2  # the loss factor if C had only been scaled
        mostly = 0 < actual < 1 and scale_only < 1 and np.log(scale_only) / np.log(actual) > 0.5
        lines.append(f"The lowest held-out loss ({LABELS[best['method']]}) has ||C|| = {c:.3g} "
                     f"(start {c0:.3g}); scaling C alone would multiply the loss by "
                     f"{scale_only:.2g}, against {actual:.2g}: most of it is "
                     + ("C shrinking towards the trivial minimiser C = 0." if mostly
                        else "not C shrinking but z(x) mapped towards C's null space."))
    return lines


def summary_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per method (and the start): train loss, held-out loss and its change, ||C||."""
    return ["method", "train loss", "held-out loss", "held-out change", "||C||"], [
        [m, f["train_loss"], f["heldout_loss"], "-" if f is res["initial"] else
         change(f["heldout_loss"], res["initial"]["heldout_loss"]), f["norm_C"]]
        for m, f in [("starting point", res["initial"]), *res["final"].items()]]


def curve_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    return CURVE_FIELDS, [[r[f] for f in CURVE_FIELDS] for r in res["curves"]]


def plot(res: dict[str, Any]) -> Any:
    """Training objective, held-out loss and ||C|| against epochs (log axes); the figure."""
    fig, axes = common.figure(ncols=3, width=4.6, height=3.9)
    colors, c = {"average": "C3", "batch_gd": "C0", "adam": "C2"}, res["config"]
    for m, losses in res["train_losses"].items():  # losses[e]: after e updates
        axes[0].plot(np.arange(1, len(losses)), losses[1:], color=colors[m],
                     ls=":" if m == "average" else "-",
                     label="copies, own sample (mean)" if m == "average" else LABELS[m])
    for m in METHODS:
        pts = [r for r in res["curves"] if r["method"] == m and r["epoch"] > 0]
        for ax, key in zip(axes, ("train_loss", "heldout_loss", "norm_C"), strict=True):
            if pts and (key != "train_loss" or m == "average"):
                ax.plot([r["epoch"] for r in pts], [r[key] for r in pts], "o-", ms=3,
                        color=colors[m], label="average of copies, training set"
                        if key == "train_loss" else LABELS[m])
    axes[1].axhline(res["initial"]["heldout_loss"], color="gray", ls="--", lw=1, label="start")
    axes[2].axhline(res["initial"]["norm_C"], color="gray", ls="--", lw=1, label="start")
    if "single_copy_heldout" in res:
        axes[1].axhline(res["single_copy_heldout"], color="C3", ls=":", lw=1,
                        label="single copies at the end (mean)")
    for ax, ylabel, title in [
            (axes[0], "training loss [mean ||w||², log]", "Training objective"),
            (axes[1], "held-out loss [mean ||w||², log]", f"Held-out samples (N = {c['n_test']})"),
            (axes[2], "||C||_F", "Norm of C (C = 0 is a trivial minimiser)")]:
        ax.set(xscale="log", yscale="linear" if ax is axes[2] else "log",
               xlabel="epoch (updates done, log)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"K = {c['k']}, N_train = {c['n_train']}, lr = {c['lr']:g} "
                 f"(adam {c['adam_lr']:g}), {c['dtype']}", fontsize=10)
    return fig


def metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The numbers a README quotes."""
    init, fin, keys = res["initial"], res["final"], ("heldout_loss", "train_loss", "norm_C")
    h0, h = init["heldout_loss"], {m: f["heldout_loss"] for m, f in fin.items()}
    out = {**{f"initial_{key}": init[key] for key in keys},
           **{key: {m: fin[m][key] for m in fin} for key in keys},
           "singular_values_C": {m: f["singular_values_C"] for m, f in [("initial", init),
                                                                          *fin.items()]},
           "heldout_reduction": {m: 1 - v / h0 for m, v in h.items()}, "diverged": res["diverged"]}
    if "average" in h:
        out["average_better_than_start"] = h["average"] < h0
    if "average" in h and "batch_gd" in h:
        out["average_over_batch_gd_heldout"] = h["average"] / h["batch_gd"]
    rest = ("own_sample_loss", "single_copy_heldout", "single_copy_heldout_median", "one_epoch_gap")
    return out | {key: res[key] for key in rest if key in res}
