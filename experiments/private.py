"""Utility against privacy: DP-SGD at target epsilon 0.5 .. 8 and without privacy (inf).

Two tasks, each trained as ONE ``abc_jax.train_many`` call whose members are the target
epsilons (x --repeats seeds of the sampling and the noise), all from one start, with
``optax.adam`` on the DP-SGD gradient (``abc_jax.DPSGD``: Poisson sampling of rate
q = batch / N, per-row clipping at --clip-norm, Gaussian noise of multiplier sigma):

  teacher   targets t = f_T(x) + e from a fixed random teacher network of the student's
            shape, e ~ Normal(0, s^2 I_O), x ~ Normal(0, I); utility: the held-out loss on
            fresh samples over the noise floor O s^2 (1 is perfect).
  diabetes  scikit-learn's diabetes data (442 rows, 10 features), --n-test rows held out,
            X and y standardised with the training rows' statistics (treated as public);
            utility: test R^2 (needs pip install -e ".[data]"; skipped without it).

delta = 1 / N (N: training rows). For each target epsilon the noise multiplier sigma is
calibrated with dp-accounting's RDP accountant for the planned steps (epochs x round(1 / q)
Poisson-sampled Gaussian steps): ``DPSGD.for_epsilon``, the smallest sigma whose epsilon at
delta is at most the target. The epsilon reported is the one train_many accounted for the
steps it ran. The non-private member (epsilon = inf) runs
the same sampled steps with sigma = 0 and no clipping.

    python -m experiments.private --repeats 3
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
import optax  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common.data import diabetes_split  # noqa: E402

NAME = "private"
MISSING = ('experiments.private: the diabetes task needs scikit-learn: pip install -e ".[data]" '
           "(skipped)")
NO_CLIP = 1e300  # the non-private member's clip norm: nothing is clipped


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of the experiment, with its default (``QUICK``: the --quick values); the
    ``flag`` fields are also command-line flags."""

    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    repeats: int = common.flag(3, "seeds per epsilon")  # seeds of the sampling and the noise
    clip_norm: float = common.flag(1.0, "DP-SGD's clip norm")
    lr: float = common.flag(0.01, "adam's learning rate")
    seed: int = common.flag(0, "random seed")
    # the teacher task
    dims: tuple[int, int, int] = (5, 8, 2)  # D, H, O of teacher and student
    noise: float = 0.3  # s, the std of the target noise
    gain: float = 3.0  # the teacher's A is scaled by it, so its sigmoids bend
    n_train: int = 4096
    n_test: int = 4096
    teacher_batch: int = 128  # expected rows per step: q = batch / N
    teacher_epochs: int = common.flag(20, "epochs")
    teacher_within: float = 0.10  # "close": excess over the floor <= 1.1 x the non-private
    # the diabetes data
    hidden: int = 8
    diabetes_test: int = 100
    diabetes_batch: int = 64
    diabetes_epochs: int = common.flag(100, "epochs")
    diabetes_within: float = 0.05  # "close": test R^2 at most 0.05 below the non-private
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(min(self.repeats, self.teacher_epochs, self.diabetes_epochs) >= 1 and
                     0 < self.clip_norm < math.inf and 0 < self.lr < math.inf,
                     "--repeats and the epochs must be >= 1, --clip-norm and --lr > 0")


QUICK = Config(epsilons=(1.0, 8.0, math.inf), repeats=1, n_train=1024, n_test=512,
               teacher_batch=64, teacher_epochs=8, diabetes_epochs=10, quick=True)


# --- accounting ------------------------------------------------------------------------


def noise_multipliers(epsilons: Sequence[float], q: float, epochs: int, delta: float,
                      clip_norm: float) -> dict[float, float]:
    """{target epsilon: sigma}: ``DPSGD.for_epsilon``'s, the smallest noise multiplier whose
    epsilon at ``delta`` over ``epochs`` x round(1 / q) steps is at most the target (inf: 0)."""
    return {e: abc_jax.DPSGD.for_epsilon(e, delta=delta, sampling_rate=q, epochs=epochs,
                                         clip_norm=clip_norm).noise_multiplier
            for e in epsilons}


# --- the tasks -------------------------------------------------------------------------


def teacher_task(cfg: Config) -> dict[str, Any]:
    """A teacher network (A scaled by ``gain``), training and held-out ``Batch``es of its
    outputs plus noise, the student's start and the noise floor O s^2 (float64)."""
    D, H, O = cfg.dims
    kt, ks = jax.random.split(jax.random.key(cfg.seed))
    teacher = abc_jax.init_params(kt, D, H, O, dtype=jnp.float64)
    teacher = abc_jax.Params(cfg.gain * teacher.A, teacher.B, teacher.C)

    rng = np.random.default_rng([cfg.seed, 1])  # NumPy: no compilation per shape

    def sample(n: int) -> abc_jax.Batch:
        """n rows x ~ Normal(0, I) and their targets f_T(x) + e."""
        X = jnp.asarray(rng.standard_normal((n, D)))
        e = cfg.noise * rng.standard_normal((n, O))
        return abc_jax.Batch(X, T=abc_jax.predict(teacher, X) + e)

    return {"train": sample(cfg.n_train), "test": sample(cfg.n_test),
            "start": abc_jax.init_params(ks, D, H, O, dtype=jnp.float64),
            "floor": O * cfg.noise**2, "batch": cfg.teacher_batch, "epochs": cfg.teacher_epochs}


def diabetes_task(cfg: Config) -> dict[str, Any]:
    """The diabetes data split once from ``seed``; X, y standardised with the training rows'
    statistics (``common.data.diabetes_split``); the student's start (H = ``hidden``, O = 1)."""
    train, test = diabetes_split(cfg.seed, cfg.diabetes_test)
    start = abc_jax.init_params(jax.random.key(cfg.seed), train.X.shape[1], cfg.hidden, 1,
                                dtype=jnp.float64)
    return {"train": train, "test": test, "start": start, "batch": cfg.diabetes_batch,
            "epochs": cfg.diabetes_epochs}


def utility(task: str, params: abc_jax.Params, data: dict[str, Any]) -> float:
    """teacher: held-out loss / noise floor; diabetes: test R^2 (standardised y: the same)."""
    test = data["test"]
    if task == "teacher":
        return float(abc_jax.batch_loss(params, test)) / data["floor"]
    pred, y = np.asarray(abc_jax.predict(params, test.X))[:, 0], np.asarray(test.T)[:, 0]
    return float(1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2))


def train_task(task: str, data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """All epsilons x repeats as members of one ``train_many`` call; one row per member."""
    N = data["train"].X.shape[0]
    q, delta = data["batch"] / N, 1.0 / N
    steps = data["epochs"] * max(1, round(1 / q))
    sigmas = noise_multipliers(cfg.epsilons, q, data["epochs"], delta, cfg.clip_norm)
    members = [(e, r) for e in cfg.epsilons for r in range(cfg.repeats)]
    sigma = np.array([sigmas[e] for e, _ in members])
    clip = np.where(sigma > 0, cfg.clip_norm, NO_CLIP)
    res = abc_jax.train_many(
        data["start"], data["train"], epochs=data["epochs"], optimizer=optax.adam(cfg.lr),
        key=jax.random.key(cfg.seed + 1), members=len(members), progress=False,
        privacy=abc_jax.DPSGD(clip_norm=clip, noise_multiplier=sigma, sampling_rate=q))
    rows = []
    for m, (e, r) in enumerate(members):
        p = abc_jax.Params(*(a[m] for a in res.params))
        rows.append({"task": task, "target_epsilon": e, "repeat": r,
                     "noise_multiplier": float(sigma[m]), "clip_norm": float(clip[m]),
                     "epsilon": float(res.epsilon[m]), "delta": float(res.delta[m]),
                     "final_train_loss": float(np.asarray(res.losses)[m, -1]),
                     "utility": utility(task, p, data)})
    return {"rows": rows, "N": N, "sampling_rate": q, "steps": steps, "delta": delta,
            "epochs": data["epochs"], "floor": data.get("floor")}


# --- results ---------------------------------------------------------------------------


def summarize(out: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """Per target epsilon: sigma, the epsilon spent, utility mean and std over repeats, and
    whether it is close to the non-private member's: teacher, the excess held-out loss over
    the floor (ratio - 1) at most ``teacher_within`` more; diabetes, R^2 at most
    ``diabetes_within`` lower."""
    rows = out["rows"]
    ref = float(np.mean([r["utility"] for r in rows if math.isinf(r["target_epsilon"])]))
    task = rows[0]["task"]
    summary = []
    for e in cfg.epsilons:
        u = np.array([r["utility"] for r in rows if r["target_epsilon"] == e])
        one = next(r for r in rows if r["target_epsilon"] == e)
        mean = float(np.mean(u))
        close = (mean - 1 <= (ref - 1) * (1 + cfg.teacher_within) if task == "teacher"
                 else mean >= ref - cfg.diabetes_within)
        summary.append({"task": task, "target_epsilon": e, "noise_multiplier":
                        one["noise_multiplier"], "epsilon": one["epsilon"], "delta": one["delta"],
                        "utility_mean": mean, "utility_std": float(np.std(u)),
                        "non_private": ref, "close": bool(close)})
    return summary


def close_from(summary: list[dict[str, Any]]) -> float | None:
    """The smallest finite target epsilon from which on every finite one is close to the
    non-private utility (None: not even the largest)."""
    finite = [s for s in summary if math.isfinite(s["target_epsilon"])]
    best = None
    for s in reversed(finite):
        if not s["close"]:
            break
        best = s["target_epsilon"]
    return best


def conclusion(summaries: dict[str, list[dict[str, Any]]], cfg: Config) -> str:
    """The sentence the numbers give, one clause per task."""
    parts = []
    for task, summary in summaries.items():
        e, ref = close_from(summary), summary[0]["non_private"]

        def excess(u: float, task: str = task) -> str:
            """The number the sentence quotes: the excess over the floor, or R^2."""
            return f"{u - 1:.3f}" if task == "teacher" else f"{u:.3f}"

        what, tol = (("excess held-out loss over the floor",
                      f"within {100 * cfg.teacher_within:.0f}%")
                     if task == "teacher" else ("test R^2", f"within {cfg.diabetes_within:g}"))
        if e is None:
            top = [s for s in summary if math.isfinite(s["target_epsilon"])][-1]
            parts.append(f"{task}: no private model comes {tol} of the non-private {what} "
                         f"{excess(ref)} (at epsilon {top['target_epsilon']:g}: "
                         f"{excess(top['utility_mean'])})")
        else:
            at = next(s for s in summary if s["target_epsilon"] == e)
            low = summary[0]
            below = ("" if low["target_epsilon"] == e else f"; at epsilon "
                     f"{low['target_epsilon']:g}: {excess(low['utility_mean'])})")
            parts.append(f"{task}: from epsilon = {e:g} on the private model is {tol} of the "
                         f"non-private {what} ({excess(at['utility_mean'])} vs "
                         f"{excess(ref)}{below or ')'}")
    return "; ".join(parts) + "."


def plot(results: dict[str, Any]) -> Any:
    """Utility against epsilon per task: each member, the mean, the non-private level."""
    tasks = list(results["summaries"])
    fig, axes = common.figure(ncols=len(tasks), width=5.0, height=3.8)
    axes = np.atleast_1d(axes)
    for ax, task in zip(axes, tasks, strict=True):
        summary = [s for s in results["summaries"][task] if math.isfinite(s["target_epsilon"])]
        rows = [r for r in results["tasks"][task]["rows"] if math.isfinite(r["target_epsilon"])]
        ax.plot([r["target_epsilon"] for r in rows], [r["utility"] for r in rows], "k.", ms=4,
                alpha=0.5, label="each seed")
        ax.plot([s["target_epsilon"] for s in summary], [s["utility_mean"] for s in summary],
                "o-", color="C0", label="DP-SGD, mean")
        ax.axhline(summary[0]["non_private"], color="C3", ls="--", label="non-private (inf)")
        if task == "teacher":
            ax.axhline(1.0, color="k", lw=0.8, ls=":", label="noise floor")
        ylabel = "held-out loss / noise floor" if task == "teacher" else "test R²"
        t = results["tasks"][task]
        ax.set(xscale="log", xlabel=f"epsilon (delta = 1/{t['N']})", ylabel=ylabel,
               title=f"{task}: N = {t['N']}, q = {t['sampling_rate']:.3g}, {t['steps']} steps")
        eps = [s["target_epsilon"] for s in summary]
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """Both tasks (diabetes only with scikit-learn): members, summaries and the sentence."""
    start = time.perf_counter()
    tasks = {"teacher": train_task("teacher", teacher_task(cfg), cfg)}
    try:
        import sklearn  # noqa: F401
    except ImportError:
        skipped = MISSING
    else:
        skipped = None
        tasks["diabetes"] = train_task("diabetes", diabetes_task(cfg), cfg)
    summaries = {t: summarize(out, cfg) for t, out in tasks.items()}
    return {"config": dataclasses.asdict(cfg), "tasks": tasks, "summaries": summaries,
            "close_from": {t: close_from(s) for t, s in summaries.items()},
            "conclusion": conclusion(summaries, cfg), "seconds": time.perf_counter() - start,
            "skipped": skipped,
            "environment": common.environment(jnp.float64)}


FIELDS = ["task", "target_epsilon", "noise_multiplier", "epsilon", "delta", "utility_mean",
          "utility_std", "non_private", "close"]


def report(results: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table and the sentence; write config.json, metrics.json, private.csv
    (per epsilon), members.csv (per member) and private.png."""
    if results["skipped"]:
        print(results["skipped"])
    rows = [[s[f] for f in FIELDS] for ss in results["summaries"].values() for s in ss]
    env = results["environment"]
    print(f"{NAME}: DP-SGD (adam, clip {results['config']['clip_norm']:g}), "
          f"{results['config']['repeats']} seed(s) per epsilon, float64, "
          f"{env['device_label']}, {results['seconds']:.1f} s")
    common.print_table(FIELDS, rows, ".4g")
    print(results["conclusion"])
    members = [r for t in results["tasks"].values() for r in t["rows"]]
    mfields = list(members[0])
    return common.write_and_report(NAME,
        out, docs, [NAME], config=results["config"],
        metrics={k: v for k, v in results.items() if k != "config"},
        tables={NAME: (FIELDS, rows), "members": (mfields, [[r[f] for f in mfields]
                                                           for r in members])},
        figures={NAME: plot(results)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
