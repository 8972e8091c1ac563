"""The gradient noise scale along training, and the critical batch size it predicts.

On a teacher task (targets t = f_T(x) + e from a fixed random teacher network of the
student's shape, e ~ Normal(0, s^2 I_O), x ~ Normal(0, I), N training rows; the noise floor
of the mean loss is O s^2):

1. Full-batch gradient descent at --lr, and every few epochs (a ``train`` callback) the
   simple noise scale of McCandlish et al. (2018), from the exact per-sample norms::

       tr(Sigma) = N / (N - 1) (mean_i ||g_i||^2 - ||G||^2),   B_simple = tr(Sigma) / ||G||^2

   g_i = dL_i/d(A, B, C) (``per_sample_grad_norms``: ||g_i||^2 = the sum of its three
   squares), G = ``batch_grad`` = mean_i g_i.
2. Steps to reach the training loss --target x floor against the mini-batch size b (powers
   of 2 up to N): per b ONE ``train_many`` call with batch_size=b whose members are the
   learning rates (hand-rolled SGD, a log grid: the rate tuned per b, as in the paper); the
   full training loss is evaluated every --eval-every epochs and the run stops once a member
   is below the target. steps(b) = ceil(N / b) x the (fractional) epoch of the first
   crossing, interpolated in log loss between the two evaluations around it.
3. The paper's law S(b) = S_min (1 + B_crit / b), fitted by least squares of the relative
   residuals (S_min and S_min B_crit enter linearly), so B_crit is the batch size at which
   steps stop halving when b doubles (at b = B_crit, steps(b) / steps(2 b) = 4/3), and its
   comparison with B_simple at the target loss (from step 1, interpolated in log loss).

    python -m experiments.noise_scale --n 2048
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402

NAME = "noise_scale"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of the experiment, with its default (``QUICK``: the --quick values); the
    ``flag`` fields are also command-line flags."""

    dims: tuple[int, int, int] = (5, 8, 2)  # D, H, O of teacher and student
    noise: float = 0.3  # s, the std of the target noise
    gain: float = 3.0  # the teacher's A is scaled by it, so its sigmoids bend
    n: int = common.flag(2048, "training rows N")
    target: float = common.flag(1.25, "target training loss, in units of the noise floor")
    lr: float = common.flag(0.16, "full-batch GD's rate (step 1)")
    gd_epochs: int = 1000
    gd_eval_every: int = 10
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    lrs: tuple[float, ...] = tuple(np.geomspace(0.005, 0.32, 7).tolist())
    eval_every: int = 5  # epochs between evaluations of the training loss in the sweep
    max_steps: int = common.flag(100_000, "per batch size, the most steps before giving up")
    near: float = 2.0  # "near": B_crit / B_simple within this factor either way
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(min(self.n, self.max_steps) >= 2 and 1 < self.target < math.inf and
                     0 < self.lr < math.inf,
                     "--n and --max-steps must be >= 2, --target > 1 and --lr > 0")


QUICK = Config(n=256, target=2.0, gd_epochs=100, batch_sizes=(32, 64, 256), max_steps=4000,
               quick=True)


def teacher_task(cfg: Config) -> dict[str, Any]:
    """The training ``Batch`` (float64), the student's start and the noise floor O s^2."""
    D, H, O = cfg.dims
    kt, ks = jax.random.split(jax.random.key(cfg.seed))
    teacher = abc_jax.init_params(kt, D, H, O, dtype=jnp.float64)
    teacher = abc_jax.Params(cfg.gain * teacher.A, teacher.B, teacher.C)
    rng = np.random.default_rng([cfg.seed, 1])  # NumPy: no compilation per shape
    X = jnp.asarray(rng.standard_normal((cfg.n, D)))
    T = abc_jax.predict(teacher, X) + cfg.noise * rng.standard_normal((cfg.n, O))
    return {"train": abc_jax.Batch(X, T=T), "floor": O * cfg.noise**2,
            "start": abc_jax.init_params(ks, D, H, O, dtype=jnp.float64)}


def noise_scale(params: abc_jax.Params, batch: Any) -> dict[str, float]:
    """B_simple = tr(Sigma) / ||G||^2 at ``params`` over the rows of ``batch`` (unit weights),
    tr(Sigma) = N / (N - 1) (mean_i ||g_i||^2 - ||G||^2), from the exact per-sample norms."""
    norms = np.asarray(abc_jax.per_sample_grad_norms(params, batch), np.float64)  # (N, 3)
    sq = np.sum(norms**2, axis=1)  # ||g_i||^2 over A, B, C
    g2 = float(sum(np.sum(np.asarray(g, np.float64) ** 2)
                   for g in abc_jax.batch_grad(params, batch)))
    N = sq.shape[0]
    trace = N / (N - 1) * (float(np.mean(sq)) - g2)
    return {"b_simple": trace / g2, "trace_sigma": trace, "grad_sq": g2}


def fit_steps(b: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """(S_min, B_crit) of S(b) = S_min (1 + B_crit / b) by least squares of the relative
    residuals (S_min + (S_min B_crit) / b - S) / S: linear in S_min and S_min B_crit."""
    b, S = np.asarray(b, np.float64), np.asarray(steps, np.float64)
    design = np.stack([np.ones_like(b), 1 / b], axis=1) / S[:, None]
    (s_min, c), *_ = np.linalg.lstsq(design, np.ones_like(S), rcond=None)
    return float(s_min), float(c / s_min)


def crossing(epochs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The fractional epoch at which ``losses`` (at ``epochs``) first falls below ``target``,
    interpolated in log loss between the evaluations around it (None: never)."""
    L = np.asarray(losses, np.float64)
    below = np.nonzero(np.isfinite(L) & (L < target))[0]
    if not below.size:
        return None
    k = int(below[0])
    if k == 0:
        return float(epochs[0])
    a, z = math.log(L[k - 1]), math.log(L[k])
    return float(epochs[k - 1] + (a - math.log(target)) / (a - z) * (epochs[k] - epochs[k - 1]))


def along_training(cfg: Config, task: dict[str, Any]) -> dict[str, Any]:
    """Full-batch GD at ``lr``; every ``gd_eval_every`` epochs (a ``train`` callback at each
    chunk's end) and at the start, the training loss and B_simple. Returns the lists, in
    epochs order."""
    batch = task["train"]

    def measure(epoch: int, params: abc_jax.Params, metrics: dict[str, Any]) -> dict[str, Any]:
        """The callback: the training loss and ``noise_scale`` at the current params."""
        return {"train_loss": float(abc_jax.batch_loss(params, batch)),
                **noise_scale(params, batch)}

    first = measure(0, task["start"], {})  # the callbacks run at chunk ends: epoch 0 here
    res = abc_jax.train(task["start"], batch, lr=cfg.lr, epochs=cfg.gd_epochs,
                        epochs_per_chunk=cfg.gd_eval_every, callbacks=[measure], progress=False)
    out = {k: [first[k], *np.asarray(v, np.float64).tolist()] for k, v in res.metrics.items()}
    return {"epochs": [0, *np.asarray(res.metric_epochs).tolist()], **out}


def steps_at(cfg: Config, task: dict[str, Any], b: int) -> dict[str, Any]:
    """Steps to the target at batch size ``b``: one ``train_many`` over the learning rates,
    stopped once one of them is below the target; the fastest rate's steps."""
    batch, target = task["train"], cfg.target * task["floor"]
    per_epoch = math.ceil(cfg.n / b)
    M = len(cfg.lrs)

    def stop(epoch: int, params: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """Stop every member once one is below the target."""
        return {"stop": np.full(M, np.nanmin(metrics["eval_loss"]) < target)}

    res = abc_jax.train_many(task["start"], batch, lr=np.asarray(cfg.lrs), batch_size=b,
                             epochs=math.ceil(cfg.max_steps / per_epoch),
                             key=jax.random.key(cfg.seed + 1), eval_data=batch,
                             eval_every=cfg.eval_every, epochs_per_chunk=cfg.eval_every,
                             callbacks=[stop], progress=False)
    hits = [crossing(res.eval_epochs, res.eval_losses[m], target) for m in range(M)]
    best = min((h, m) for m, h in enumerate(hits) if h is not None) if any(
        h is not None for h in hits) else (None, None)
    return {"b": b, "steps": None if best[0] is None else best[0] * per_epoch,
            "epochs": best[0], "steps_per_epoch": per_epoch,
            "best_lr": None if best[1] is None else cfg.lrs[best[1]],
            "steps_per_lr": [None if h is None else h * per_epoch for h in hits]}


def at_loss(trace: dict[str, Any], loss: float) -> float | None:
    """B_simple where GD's training loss first falls below ``loss``, interpolated in log
    loss between the evaluations around it (None: GD never got there)."""
    L = trace["train_loss"]
    e = crossing(range(len(L)), L, loss)
    if e is None:
        return None
    k = min(math.ceil(e), len(L) - 1)
    if k == 0:
        return trace["b_simple"][0]
    w = e - (k - 1)  # geometric interpolation of B_simple with the same weight
    return float(trace["b_simple"][k - 1] ** (1 - w) * trace["b_simple"][k] ** w)


def run(cfg: Config) -> dict[str, Any]:
    """B_simple along GD, steps(b) for every batch size, the fit and the comparison."""
    start = time.perf_counter()
    task = teacher_task(cfg)
    trace = along_training(cfg, task)
    sizes = [b for b in cfg.batch_sizes if b <= cfg.n]  # powers of 2 up to N
    sweep = [steps_at(cfg, task, b) for b in common.progress(sizes, desc="b")]
    done = [r for r in sweep if r["steps"] is not None]
    s_min, b_crit = (fit_steps([r["b"] for r in done], [r["steps"] for r in done])
                     if len(done) >= 2 else (None, None))
    b_simple = at_loss(trace, cfg.target * task["floor"])
    ratio = None if None in (b_simple, b_crit) else b_crit / b_simple
    return {"config": dataclasses.asdict(cfg), "floor": task["floor"],
            "target_loss": cfg.target * task["floor"], "trace": trace, "sweep": sweep,
            "s_min": s_min, "b_crit": b_crit, "b_simple_at_target": b_simple, "ratio": ratio,
            "near": None if ratio is None else bool(1 / cfg.near <= ratio <= cfg.near),
            "seconds": time.perf_counter() - start,
            "environment": common.environment(jnp.float64)}


def conclusion(res: dict[str, Any]) -> str:
    """The sentence the numbers give."""
    if res["b_crit"] is None or res["b_simple_at_target"] is None:
        return ("too few batch sizes reached the target (or GD did not) to compare B_crit with "
                "B_simple.")
    tr = res["trace"]
    upto = [b for b, L in zip(tr["b_simple"], tr["train_loss"], strict=True)
            if L >= res["target_loss"]]
    verdict = "near" if res["near"] else "not near"
    return (f"steps to loss {res['config']['target']:g} x floor fit S = {res['s_min']:.0f} "
            f"(1 + {res['b_crit']:.3g} / b): the critical batch size B_crit = "
            f"{res['b_crit']:.3g} is {verdict} B_simple = {res['b_simple_at_target']:.3g} at "
            f"that loss (ratio {res['ratio']:.3g}, 'near': within a factor "
            f"{res['config']['near']:g}); along GD before the target B_simple went from "
            f"{min(upto):.3g} to {max(upto):.3g}.")


def plot(res: dict[str, Any]) -> Any:
    """B_simple (and the training loss) along GD; steps against b with the fit, B_crit and
    B_simple marked."""
    fig, (ax, sx) = common.figure(ncols=2, width=5.2, height=4.0)
    tr = res["trace"]
    ax.semilogy(tr["epochs"], tr["b_simple"], "o-", ms=2, color="C0", label="B_simple")
    ax.axhline(res["config"]["n"], color="C7", ls=":", label="N")
    if res["b_crit"] is not None:
        ax.axhline(res["b_crit"], color="C3", ls="--", label="B_crit (fit)")
    ax.set(xlabel="epoch (full-batch GD)", ylabel="B_simple = tr(Σ) / |G|²",
           title="Noise scale along training")
    loss = ax.twinx()
    loss.semilogy(tr["epochs"], np.asarray(tr["train_loss"]) / res["floor"], color="C2", lw=1,
                  label="training loss / floor")
    loss.axhline(res["config"]["target"], color="C2", ls=":", lw=0.8)
    loss.set_ylabel("training loss / noise floor", color="C2")
    loss.grid(False)
    ax.legend(fontsize=7, loc="upper left")
    done = [r for r in res["sweep"] if r["steps"] is not None]
    b = np.array([r["b"] for r in done], float)
    sx.loglog(b, [r["steps"] for r in done], "o", color="C0", label="measured (best lr)")
    if res["b_crit"] is not None:
        grid = np.geomspace(b.min(), b.max(), 100)
        sx.loglog(grid, res["s_min"] * (1 + res["b_crit"] / grid), "-", color="C3",
                  label=f"S_min (1 + B_crit / b): B_crit = {res['b_crit']:.3g}")
        sx.axvline(res["b_crit"], color="C3", ls="--", lw=0.8)
        sx.axhline(res["s_min"], color="C3", ls=":", lw=0.8, label=f"S_min = {res['s_min']:.0f}")
    if res["b_simple_at_target"] is not None:
        sx.axvline(res["b_simple_at_target"], color="C0", ls="--", lw=0.8,
                   label=f"B_simple at target = {res['b_simple_at_target']:.3g}")
    sx.set(xlabel="mini-batch size b", ylabel="optimizer steps to the target loss",
           title=f"Steps to loss {res['config']['target']:g} x floor")
    sx.legend(fontsize=7)
    return fig


SWEEP = ["b", "steps", "epochs", "steps_per_epoch", "best_lr", "speedup_from_doubling"]


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the sweep table and the sentence; write config.json, metrics.json,
    noise_scale.csv (the sweep), trace.csv (B_simple along GD) and noise_scale.png."""
    sweep = res["sweep"]
    for r, nxt in zip(sweep, [*sweep[1:], None], strict=True):  # steps(b) / steps(2b)
        r["speedup_from_doubling"] = (r["steps"] / nxt["steps"] if nxt and nxt["b"] == 2 *
                                      r["b"] and r["steps"] and nxt["steps"] else None)
    rows = [[r[f] for f in SWEEP] for r in sweep]
    env = res["environment"]
    print(f"{NAME}: teacher task, N = {res['config']['n']}, target loss "
          f"{res['config']['target']:g} x floor, float64, {env['device_label']}, "
          f"{res['seconds']:.1f} s")
    common.print_table(SWEEP, rows, ".4g")
    print(conclusion(res))
    tr = res["trace"]
    fields = ["epochs", "train_loss", "b_simple", "trace_sigma", "grad_sq"]
    return common.write_and_report(NAME,
        out, docs, [NAME], config=res["config"],
        metrics={k: v for k, v in res.items() if k != "config"} | {"conclusion":
                                                                    conclusion(res)},
        tables={NAME: (SWEEP, rows),
                "trace": (fields, [list(r) for r in zip(*(tr[f] for f in fields),
                                                        strict=True)])},
        figures={NAME: plot(res)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
