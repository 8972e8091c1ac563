"""Second order by hand: Levenberg-Marquardt against first-order methods, L-BFGS and autodiff LM.

Tasks (float64): the teacher task (``common.teacher``: t = f_T(x) + e, x ~ Normal(0, I),
e ~ Normal(0, sigma^2 I_O), a student of the teacher's shape D = H = O = K) at each --ks with
its --n-train rows, target --target x the noise floor O sigma^2 on 4096 fresh rows; and
scikit-learn's diabetes data (442 rows, 10 features, 100 held out, X and y standardised with
the training rows' statistics, H = 8, O = 1), target --target x the best held-out loss any
method reaches (needs scikit-learn; skipped without it).

Methods, all from one start per task: gradient descent and Adam (the learning rate of each
grid with the fewest epochs to the target, else the lowest final held-out loss), L-BFGS
(``optax.lbfgs()``, its line search), Levenberg-Marquardt by hand (``levenberg_marquardt``,
initial damping 1e-3: "lm" the direct solve with the formed G where P <= 4000, "lm_cg"
conjugate gradients on ``ggn_vp``, "lm_pcg" preconditioned by the block preconditioner),
optimistix's ``LevenbergMarquardt`` (autodiff Jacobian and its QR; where installed and
P <= --optimistix-max-p) and ``scipy.optimize.least_squares(method="lm")`` (MINPACK, the
Jacobian by ``jax.jacfwd``; P <= 500). An epoch is one update (for LM one linearisation: a
gradient, a solve and the trial point's loss, accepted or not); optimistix's epochs are its
steps, scipy's its residual evaluations.

For each: the held-out loss after every epoch, the first epoch at or below the target, and
the seconds to get there: the method's step run for that many epochs in one compiled loop
(the epoch function ``train`` runs, without its host work; "LM by hand, direct, via
train()" is the same run through ``train``), or, for a method that never reaches the
target, its first 500 epochs (its seconds per epoch); the methods in interleaved rounds,
medians. An optimistix run whose path, stepped from Python, took over 20 s is timed by that
path alone. Held-out loss against seconds: epochs x the measured seconds per epoch. Along
the LM path: the Hessian's extra term against the Gauss-Newton term, ||H v - G v|| / ||G v||
for random v (``hvp``, ``ggn_vp``).

The default run takes about 3 minutes on 2 CPU cores (much of it compiling some 20
programs per task); --optimistix-max-p 1000 adds optimistix at K = 16 (its Jacobian is
(65536, 768), about 7 s a step here), as the committed results do:

    python -m experiments.second_order --optimistix-max-p 1000 --docs docs
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common import teacher  # noqa: E402
from experiments.common.data import diabetes_split  # noqa: E402

NAME = "second_order"
LABELS = {"gd": "gradient descent", "adam": "Adam", "lbfgs": "L-BFGS (optax)",
          "lm": "LM by hand, direct", "lm_train": "LM by hand, direct, via train()",
          "lm_cg": "LM by hand, CG",
          "lm_pcg": "LM by hand, CG + block precond.", "optimistix": "optimistix LM",
          "scipy": "scipy least_squares lm"}
FIRST_ORDER = ("gd", "adam", "lbfgs")  # gradients only
STYLE = {"gd": dict(color="C0"), "adam": dict(color="C2"), "lbfgs": dict(color="C4"),
         "lm": dict(color="C3", lw=2.5), "lm_cg": dict(color="C1", ls="--"),
         "lm_train": dict(color="C3", lw=1, ls="--"),
         "lm_pcg": dict(color="C5", ls=":"), "optimistix": dict(color="C7", ls="-."),
         "scipy": dict(color="C8", ls=(0, (1, 2)))}
MISSING_SKLEARN = "diabetes skipped: it needs scikit-learn (pip install -e \".[data]\")"
MISSING_OPTX = "optimistix skipped: not installed (pip install -e \".[bench]\")"


@dataclasses.dataclass(frozen=True)
class Config:
    """The tasks, budgets and timing; ``QUICK``: the --quick values."""

    ks: tuple[int, ...] = common.flag((4, 16, 64), "teacher sizes K = D = H = O")
    n_train: tuple[int, ...] = common.flag((2048, 4096, 4096), "training rows, one per K")
    first_order_epochs: tuple[int, ...] = common.flag(
        (1000, 2000, 200), "epochs of GD, Adam and L-BFGS, one per K")
    lm_epochs: tuple[int, ...] = common.flag(
        (30, 30, 8), "epochs of each LM (optimistix steps, scipy evaluations), one per K")
    target: float = common.flag(1.05, "target held-out loss / noise floor (diabetes: / best)")
    rounds: int = common.flag(3, "interleaved timing rounds")
    diabetes: bool = common.flag(True, "the diabetes task too")
    seed: int = common.flag(0, "random seed")
    n_test: int = 4096
    sigma: float = 0.1  # the targets' noise: floor O sigma^2
    gain: float = 1.0  # the teacher's A scaled by it
    gd_lrs: tuple[float, ...] = (0.03, 0.1, 0.2)
    adam_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    damping: float = 1e-3  # LM's initial damping
    direct_max_p: int = 4000  # the direct solve where P <= this (G: P^2 floats)
    optimistix_max_p: int = common.flag(
        200, "optimistix's LM (a dense (N O, P) Jacobian and its QR) where P <= this; 1000 "
        "adds K = 16, about 90 s")
    scipy_max_p: int = 500
    rerun_max_s: float = 20.0  # an optimistix path slower than this is not run again to time
    max_time: float = 10.0  # timed seconds of rounds per method, at most (>= 1 round)
    gap_vectors: int = 3  # random v per iterate for ||Hv - Gv|| / ||Gv||
    diabetes_test: int = 100
    diabetes_hidden: int = 8
    diabetes_epochs: tuple[int, int] = (2000, 30)  # first-order and LM epochs there
    probe_epochs: int = 500  # a method that never reaches the target is timed over these
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(len(self.ks) == len(self.n_train) == len(self.first_order_epochs) ==
                     len(self.lm_epochs) >= 1, "--ks, --n-train, --first-order-epochs and "
                     "--lm-epochs need one value per K")
        common.check(min(self.ks + self.n_train + self.first_order_epochs + self.lm_epochs)
                     >= 1 and self.rounds >= 1 and self.target > 1,
                     "sizes, epochs and --rounds must be >= 1, --target > 1")


QUICK = Config(ks=(4, 16), n_train=(256, 512), first_order_epochs=(100, 100), lm_epochs=(8, 8),
               target=1.3, rounds=1, diabetes=False, n_test=512, max_time=0.5, rerun_max_s=1.0,
               optimistix_max_p=100, gap_vectors=1, quick=True)


# --- the tasks -------------------------------------------------------------------------


def teacher_task(cfg: Config, K: int, n: int, epochs: int, lm_epochs: int) -> dict[str, Any]:
    """The teacher task at D = H = O = K, n training rows (``common.teacher.make_task``)."""
    t = teacher.make_task((K, K, K), cfg.sigma, cfg.gain, n, cfg.n_test, cfg.seed)
    return {"name": f"teacher K={K}", "K": K, "N": n, "P": 3 * K * K, "epochs": epochs,
            "lm_epochs": lm_epochs,
            "start": t["start"], "train": t["train"], "test": t["test"], "floor": t["floor"]}


def diabetes_task(cfg: Config) -> dict[str, Any]:
    """The diabetes data split once from ``seed``; X, y standardised with the training rows'
    statistics (``common.data.diabetes_split``); the student's start (H =
    ``diabetes_hidden``, O = 1)."""
    train, test = diabetes_split(cfg.seed, cfg.diabetes_test)
    H, D = cfg.diabetes_hidden, train.X.shape[1]
    return {"name": "diabetes", "K": None, "N": train.X.shape[0], "P": 2 * H * D + H,
            "epochs": cfg.diabetes_epochs[0], "lm_epochs": cfg.diabetes_epochs[1],
            "floor": None, "train": train, "test": test,
            "start": abc_jax.init_params(jax.random.key(cfg.seed), D, H, 1, dtype=jnp.float64)}


# --- the paths: held-out loss after every epoch ---------------------------------------------


def curve(result: Any) -> np.ndarray:
    """(E + 1,) held-out loss after e = 0 .. E epochs (NaN where a member stopped)."""
    return np.asarray(result.eval_losses, np.float64)


def grid_paths(task: dict[str, Any], name: str, lrs: Sequence[float]) -> dict[str, Any]:
    """GD (the hand-rolled rule) or Adam at every rate of ``lrs``: one ``train_many``."""
    kw = ({"lr": jnp.asarray(lrs)} if name == "gd" else
          {"optimizer": optax.inject_hyperparams(optax.adam)(learning_rate=jnp.asarray(lrs))})
    r = abc_jax.train_many(task["start"], task["train"], epochs=task["epochs"],
                           eval_data=task["test"], progress=False, **kw)
    return {"curves": np.asarray(r.eval_losses, np.float64), "lrs": list(lrs)}


def step_runner(task: dict[str, Any], step: abc_jax.Step) -> Callable[[int], Any]:
    """run(e): the step's first e epochs from the task's start in one compiled loop (the
    trip count traced: one compilation for every e), as ``train`` runs them without its
    host work (checks, the result, the chunks' returns), which ``via train()`` adds back."""
    @jax.jit
    def run(params: abc_jax.Params, batch: abc_jax.Batch, epochs: jax.Array) -> Any:
        def body(_: Any, carry: Any) -> Any:
            return step.epoch(*carry, batch, None, 0)[1:]

        with jax.default_matmul_precision("highest"):
            state = step.init(params, {k: jnp.asarray(v) for k, v in step.hyper.items()})
            return jax.lax.fori_loop(0, epochs, body, (params, state))[0]

    return lambda e: run(task["start"], task["train"], e)


def gap_callback(task: dict[str, Any], vectors: int, seed: int) -> Callable[..., Any]:
    """A ``train`` callback: ||H v - G v|| / ||G v|| at the params, mean over random v."""
    rng = np.random.default_rng(seed)
    start = task["start"]
    vs = [abc_jax.Params(*(jnp.asarray(rng.standard_normal(p.shape)) for p in start))
          for _ in range(vectors)]

    def norm(t: abc_jax.Params) -> float:
        return math.sqrt(sum(float(jnp.vdot(a, a)) for a in t))

    def callback(epoch: int, params: abc_jax.Params, metrics: dict) -> dict[str, float]:
        gaps = []
        for v in vs:
            Gv = abc_jax.ggn_vp(params, task["train"], v)
            Hv = abc_jax.hvp(params, task["train"], v)
            gaps.append(norm(jax.tree.map(jnp.subtract, Hv, Gv)) / norm(Gv))
        return {"gn_gap": float(np.mean(gaps))}

    return callback


def lm_path(task: dict[str, Any], cfg: Config, gap: bool, **kw: Any) -> dict[str, Any]:
    """Levenberg-Marquardt by hand: its curve, and with ``gap`` the Gauss-Newton gap."""
    step = abc_jax.levenberg_marquardt(cfg.damping, **kw)
    extra = {"callbacks": [gap_callback(task, cfg.gap_vectors, cfg.seed)],
             "epochs_per_chunk": 1} if gap else {}
    r = abc_jax.train(task["start"], task["train"], step=step, epochs=task["lm_epochs"],
                      eval_data=task["test"], progress=False, **extra)
    out = {"curve": curve(r), "run": step_runner(task, step), "step": step}
    if gap:
        first = extra["callbacks"][0](0, task["start"], {})["gn_gap"]  # at the start
        out["gap"] = {"epochs": [0, *np.asarray(r.metric_epochs).tolist()],
                      "ratio": [first, *np.asarray(r.metrics["gn_gap"]).tolist()]}
    return out


def outputs(params: abc_jax.Params, X: jax.Array) -> jax.Array:
    """W (N, O) of the graph in plain jnp: what a user hands an autodiff least-squares solver."""
    Z = jax.nn.sigmoid(X @ params.A.T) + X @ params.B.T
    return Z @ params.C.T


def residuals(params: abc_jax.Params, batch: abc_jax.Batch) -> jax.Array:
    """(N O,) (w_i - t_i) / sqrt(N): its sum of squares is the batch loss (unit weights)."""
    return ((outputs(params, batch.X) - batch.T) / math.sqrt(batch.X.shape[0])).ravel()


def optimistix_path(task: dict[str, Any], cfg: Config, target: float) -> dict[str, Any]:
    """optimistix's LM stepped from Python (its own ``step``, jitted), stopped at the held-out
    target or after the task's ``lm_epochs`` steps; run(k): ``least_squares(max_steps=k)``,
    jitted."""
    import equinox as eqx
    import optimistix as optx

    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8)
    fn = lambda y, args: (residuals(y, args), None)  # noqa: E731  (no aux, as least_squares)
    args, y = task["train"], task["start"]
    state = solver.init(fn, y, args, {}, jax.eval_shape(residuals, y, args), None, frozenset())
    state, static = eqx.partition(state, eqx.is_array)  # as optimistix's own loop does

    @jax.jit
    def step(y: Any, state: Any) -> Any:
        y, state, _ = solver.step(fn, y, args, {}, eqx.combine(state, static), frozenset())
        return y, eqx.partition(state, eqx.is_array)[0]

    test = jax.jit(abc_jax.batch_loss)
    losses, seconds = [float(test(y, task["test"]))], [0.0]
    jax.block_until_ready(step(y, state))  # compiled before the clock starts
    for _ in range(task["lm_epochs"]):
        t0 = time.perf_counter()
        y, state = jax.block_until_ready(step(y, state))
        seconds.append(seconds[-1] + time.perf_counter() - t0)
        losses.append(float(test(y, task["test"])))
        if losses[-1] <= target:
            break

    @functools.cache  # one compiled solve per step count (max_steps is static)
    def solve(k: int) -> Any:
        return jax.jit(lambda y0: optx.least_squares(residuals, solver, y0, args,
                                                     max_steps=k, throw=False).value)

    return {"curve": np.asarray(losses), "path_seconds": np.asarray(seconds),
            "run": lambda k: solve(k)(task["start"])}


def scipy_path(task: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """MINPACK's LM (``least_squares(method="lm")``) stopped after k = 1, 2, ... residual
    evaluations; the Jacobian from ``jax.jacfwd`` of the residuals (jitted)."""
    from scipy.optimize import least_squares

    x0, unravel = jax.flatten_util.ravel_pytree(task["start"])
    fun = jax.jit(lambda x: residuals(unravel(x), task["train"]))
    jac = jax.jit(jax.jacfwd(lambda x: residuals(unravel(x), task["train"])))
    test = jax.jit(lambda x: abc_jax.batch_loss(unravel(x), task["test"]))

    def run(k: int) -> np.ndarray:
        return least_squares(lambda x: np.asarray(fun(x)), np.asarray(x0), method="lm",
                             jac=lambda x: np.asarray(jac(x)), max_nfev=k).x

    losses = [float(test(x0))] + [float(test(run(k)))
                                  for k in range(1, task["lm_epochs"] + 1)]
    return {"curve": np.asarray(losses), "run": run}


# --- one task -------------------------------------------------------------------------------


def first_hit(losses: np.ndarray, target: float) -> int | None:
    """The first epoch whose held-out loss is at or below ``target`` (NaN: never)."""
    hit = np.flatnonzero(np.asarray(losses) <= target)
    return int(hit[0]) if hit.size else None


def sampled(curve: np.ndarray, hit: int | None, points: int = 80) -> dict[str, list]:
    """The curve at about ``points`` log-spaced epochs, and at 0, the hit and the last (what
    the results file keeps: the figure is on log axes)."""
    E = len(curve) - 1
    keep = {0, E, *np.unique(np.geomspace(1, max(E, 1), points).round().astype(int)).tolist()}
    epochs = sorted(keep | ({hit} if hit is not None else set()))
    return {"epochs": epochs, "heldout": [float(curve[e]) for e in epochs]}


def pick(grid: dict[str, Any], target: float) -> tuple[int, np.ndarray]:
    """The grid member with the fewest epochs to the target, else the lowest final loss."""
    def key(i: int) -> tuple[float, float]:
        c, h = grid["curves"][i], first_hit(grid["curves"][i], target)
        last = c[~np.isnan(c)][-1] if (~np.isnan(c)).any() else np.inf
        return (np.inf if h is None else h, last)

    best = min(range(len(grid["lrs"])), key=key)
    return best, grid["curves"][best]


def run_task(task: dict[str, Any], cfg: Config, notes: list[str]) -> dict[str, Any]:
    """Every method's path on one task, the target, then the interleaved timing."""
    P, epochs = task["P"], task["epochs"]
    paths: dict[str, dict[str, Any]] = {}
    grids = {m: grid_paths(task, m, lrs) for m, lrs in (("gd", cfg.gd_lrs),
                                                        ("adam", cfg.adam_lrs))}
    lbfgs = abc_jax.gradient_step(optax.lbfgs())
    r = abc_jax.train(task["start"], task["train"], step=lbfgs, epochs=epochs,
                      eval_data=task["test"], progress=False)
    paths["lbfgs"] = {"curve": curve(r), "run": step_runner(task, lbfgs)}
    direct = P <= cfg.direct_max_p
    if direct:
        paths["lm"] = lm = lm_path(task, cfg, gap=True)
        paths["lm_train"] = {"curve": lm["curve"], "run": lambda e: abc_jax.train(
            task["start"], task["train"], step=lm["step"], epochs=e, progress=False).params}
    paths["lm_cg"] = lm_path(task, cfg, gap=False, solver="cg")
    paths["lm_pcg"] = lm_path(task, cfg, gap=not direct, solver="cg", precondition=True)
    if P <= cfg.scipy_max_p:
        paths["scipy"] = scipy_path(task, cfg)
    # the target: the noise floor's multiple, or the best any method reached so far
    if task["floor"] is not None:
        target = cfg.target * task["floor"]
    else:
        seen = [c for p in paths.values() for c in [p["curve"]]] + \
               [c for g in grids.values() for c in g["curves"]]
        target = cfg.target * min(float(np.nanmin(c)) for c in seen)
    for m, g in grids.items():
        i, c = pick(g, target)
        step = abc_jax.gradient_step(lr=g["lrs"][i]) if m == "gd" else \
            abc_jax.gradient_step(optax.adam(g["lrs"][i]))
        paths[m] = {"curve": c, "lr": g["lrs"][i], "run": step_runner(task, step),
                    "grid": {f"{lr:g}": first_hit(cg, target)
                             for lr, cg in zip(g["lrs"], g["curves"], strict=True)}}
    optx_ok = P <= cfg.optimistix_max_p
    if optx_ok:
        try:
            paths["optimistix"] = optimistix_path(task, cfg, target)
        except ImportError:
            optx_ok = False
            if MISSING_OPTX not in notes:
                notes.append(MISSING_OPTX)
    # the timing: each method's run to its hit (or its whole budget), interleaved
    runs, slow = {}, {}
    for m, p in paths.items():
        c = p["curve"]
        p["hit"] = first_hit(c, target)
        p["timed_epochs"] = p["hit"] if p["hit"] is not None else min(len(c) - 1,
                                                                      cfg.probe_epochs)
        p["best_ratio"] = float(np.nanmin(c)) / (target / cfg.target)
        if m == "optimistix" and p["path_seconds"][p["timed_epochs"]] > cfg.rerun_max_s:
            slow[m] = float(p["path_seconds"][p["timed_epochs"]])
        elif p["timed_epochs"] > 0:
            runs[m] = lambda p=p: p["run"](p["timed_epochs"])
    times = common.time_interleaved(runs, rounds=cfg.rounds, min_time=0.0, warmup=0,
                                    max_time=cfg.max_time)
    rows = []
    for m, p in paths.items():
        t = times.get(m)
        seconds = t.median_s if t else slow.get(m, 0.0)
        rows.append({"task": task["name"], "method": m, "label": LABELS[m], "P": P,
                     "N": task["N"], "lr": p.get("lr"), "epochs_to_target": p["hit"],
                     "timed_epochs": p["timed_epochs"], "seconds": seconds,
                     "seconds_to_target": seconds if p["hit"] is not None else None,
                     "rounds": t.rounds if t else 1, "first_call_s": t.first_call_s if t else None,
                     "best_ratio": p["best_ratio"],
                     "timed_by": "rounds" if t else "stepped path"})
    skipped = [f"{LABELS[m]}: P = {P} > {lim}" for m, lim, ok in (
        ("lm", cfg.direct_max_p, direct), ("scipy", cfg.scipy_max_p, P <= cfg.scipy_max_p),
        ("optimistix", cfg.optimistix_max_p, P <= cfg.optimistix_max_p)) if not ok]
    return {"name": task["name"], "K": task["K"], "N": task["N"], "P": P,
            "floor": task["floor"], "reference": target / cfg.target, "target": target,
            "rows": rows, "skipped": skipped,
            "curves": {m: sampled(p["curve"], p["hit"]) | {
                "seconds_per_epoch": r["seconds"] / r["timed_epochs"] if r["timed_epochs"]
                else None} for (m, p), r in zip(paths.items(), rows, strict=True)},
            "grid": {m: paths[m]["grid"] for m in grids},
            "gap": next((p["gap"] for p in paths.values() if "gap" in p), None)}


# --- the run and its report -----------------------------------------------------------------


def claims(tasks: Sequence[dict[str, Any]], K: int = 16) -> dict[str, Any] | None:
    """The issue's figures at K: LM by hand (direct) against Adam's best epochs, the fastest
    first-order method (GD, Adam, L-BFGS) and optimistix's LM, in seconds to the target
    (None where a method did not reach it or did not run)."""
    task = next((t for t in tasks if t["K"] == K), None)
    if task is None:
        return None
    rows = {r["method"]: r for r in task["rows"]}
    reached = [rows[m] for m in FIRST_ORDER if rows[m]["seconds_to_target"] is not None]
    fastest = min(reached, key=lambda r: r["seconds_to_target"], default=None)
    lm, optx = rows.get("lm", {}), rows.get("optimistix", {})
    return {"K": K, "lm_epochs": lm.get("epochs_to_target"), "lm_s": lm.get("seconds_to_target"),
            "adam_epochs": rows["adam"]["epochs_to_target"],
            "adam_budget": task["curves"]["adam"]["epochs"][-1],
            "fastest_first_order": fastest and fastest["method"],
            "fastest_first_order_s": fastest and fastest["seconds_to_target"],
            "optimistix_run": bool(optx), "optimistix_epochs": optx.get("epochs_to_target"),
            "optimistix_s": optx.get("seconds_to_target"),
            "optimistix_budget": optx.get("timed_epochs"), "optimistix_budget_s": optx.get(
                "seconds")}


def conclusion(c: dict[str, Any] | None) -> str:
    """The claims in one sentence, as measured."""
    if c is None or c["lm_epochs"] is None:
        return "LM by hand (direct) did not reach the target at K = 16 (or K = 16 did not run)."
    lm = c["lm_s"]
    parts = [f"at K = {c['K']}, LM by hand (direct) reached the target in {c['lm_epochs']} "
             f"epochs and {lm:.3g} s"]
    parts.append(f"Adam's best in {c['adam_epochs']} epochs (LM / Adam = "
                 f"{c['lm_epochs'] / c['adam_epochs']:.3g})" if c["adam_epochs"] else
                 f"Adam's best not within {c['adam_budget']} epochs (LM / Adam < "
                 f"{c['lm_epochs'] / c['adam_budget']:.3g})")
    f = c["fastest_first_order"]
    parts.append("no first-order method reached it" if f is None else
                 f"the fastest first-order method ({LABELS[f]}) in "
                 f"{c['fastest_first_order_s']:.3g} s ({c['fastest_first_order_s'] / lm:.3g}x)")
    if not c["optimistix_run"]:
        parts.append("optimistix's LM did not run")
    elif c["optimistix_s"] is None:
        parts.append(f"optimistix's LM not within {c['optimistix_budget']} steps "
                     f"({c['optimistix_budget_s']:.3g} s, {c['optimistix_budget_s'] / lm:.3g}x)")
    else:
        parts.append(f"optimistix's LM in {c['optimistix_epochs']} steps and "
                     f"{c['optimistix_s']:.3g} s ({c['optimistix_s'] / lm:.3g}x)")
    return "; ".join(parts) + "."


def run(cfg: Config) -> dict[str, Any]:
    """Every task (``run_task``), the claims at K = 16, the machine."""
    start, notes = time.perf_counter(), []
    env = common.environment(jnp.float64, "highest")
    todo = [lambda K=K, n=n, e=e, lm=lm: teacher_task(cfg, K, n, e, lm) for K, n, e, lm in
            zip(cfg.ks, cfg.n_train, cfg.first_order_epochs, cfg.lm_epochs, strict=True)]
    if cfg.diabetes:
        try:
            import sklearn  # noqa: F401
            todo.append(lambda: diabetes_task(cfg))
        except ImportError:
            notes.append(MISSING_SKLEARN)
    tasks = [run_task(make(), cfg, notes) for make in common.progress(todo, desc="tasks")]
    c = claims(tasks)
    env["load_average_1min_end"] = os.getloadavg()[0]
    return {"config": dataclasses.asdict(cfg), "environment": env, "tasks": tasks,
            "claims": c, "conclusion": conclusion(c), "notes": notes,
            "seconds": time.perf_counter() - start}


TABLE = ["task", "method", "lr", "epochs_to_target", "seconds_to_target", "timed_epochs",
         "seconds", "best_ratio", "rounds", "timed_by"]


def table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per task and method: epochs and seconds to the target, the best held-out loss
    over the task's reference (the floor, or the best of all), the timing's rounds."""
    return TABLE, [[r[k] if k != "method" else r["label"] for k in TABLE]
                   for t in res["tasks"] for r in t["rows"]]


def gap_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """||H v - G v|| / ||G v|| along each task's LM path, at the first iterates and the last."""
    rows = []
    for t in res["tasks"]:
        g = t["gap"]
        if g:
            pairs = list(zip(g["epochs"], g["ratio"], strict=True))
            rows += [[t["name"], e, v] for e, v in [*pairs[:6], pairs[-1]]]
    return ["task", "epoch", "gn_gap"], list(dict.fromkeys(map(tuple, rows)))


def plot(res: dict[str, Any]) -> dict[str, Any]:
    """Per task, held-out loss / reference against epochs and against seconds; and the
    Gauss-Newton gap along each task's LM path."""
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.4 * len(tasks), 6.2),
                             layout="constrained", squeeze=False)
    for j, t in enumerate(tasks):
        ref = t["reference"]
        for m, c in t["curves"].items():
            y, e = np.asarray(c["heldout"]) / ref, np.asarray(c["epochs"])
            axes[0, j].plot(e[1:], y[1:], label=LABELS[m], **STYLE[m])
            if c["seconds_per_epoch"]:
                axes[1, j].plot(e[1:] * c["seconds_per_epoch"], y[1:], **STYLE[m])
        for ax in axes[:, j]:
            ax.axhline(res["config"]["target"], color="k", ls="--", lw=0.8)
            ax.set(xscale="log", yscale="log")
        what = "noise floor" if t["floor"] else "best held-out loss"
        axes[0, j].set(title=f"{t['name']} (P = {t['P']}, N = {t['N']})", xlabel="epoch",
                       ylabel=f"held-out loss / {what}")
        axes[1, j].set(xlabel="seconds (epochs x measured s per epoch)",
                       ylabel=f"held-out loss / {what}")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"Levenberg-Marquardt by hand against first-order methods and autodiff LM "
                 f"(dashed: the target, {res['config']['target']:g}x)", fontsize=10)
    gap, ax = common.figure(width=5.5, height=3.6)
    for t in tasks:
        if t["gap"]:
            ax.semilogy(t["gap"]["epochs"], t["gap"]["ratio"], "o-", ms=3, label=t["name"])
    ax.set(xlabel="LM epoch (its path: direct solve, or CG + preconditioner at K = 64)",
           ylabel="||Hv - Gv|| / ||Gv||, mean over v",
           title="The Hessian's extra term along Levenberg-Marquardt's path")
    ax.legend(fontsize=8)
    return {NAME: fig, f"{NAME}_gap": gap}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table, the Gauss-Newton gap and the conclusion; write config.json,
    metrics.json, second_order.csv, gn_gap.csv, second_order.png and second_order_gap.png."""
    env = res["environment"]
    print(f"{NAME}: float64 on {env['device_label']} ({env['cpu_count']} CPUs), load "
          f"{env['load_average_1min']:.2f} -> {env['load_average_1min_end']:.2f}, "
          f"{res['seconds']:.0f} s")
    for n in res["notes"]:
        print(n)
    for t in res["tasks"]:
        if t["skipped"]:
            print(f"{t['name']}: skipped {'; '.join(t['skipped'])}")
    if res["config"]["quick"]:
        print("--quick: tiny problems and one timing round, a smoke run, not a measurement")
    main_table, gaps = table(res), gap_table(res)
    common.print_table(*main_table, floatfmt=".4g")
    print("\nthe Hessian's extra term along LM's path, ||Hv - Gv|| / ||Gv||:")
    common.print_table(*gaps, floatfmt=".3g")
    print(f"\n{res['conclusion']}")
    return common.write_and_report(
        NAME, out, docs, [NAME, f"{NAME}_gap"], config=res["config"], figures=plot(res),
        metrics={k: v for k, v in res.items() if k != "config"},
        tables={NAME: main_table, "gn_gap": gaps})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
