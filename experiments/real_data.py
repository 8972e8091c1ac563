"""Does the ABC network learn a real regression? The diabetes data, against Ridge and an MLP.

The diabetes data (442 patients, 10 features, a disease-progression score one year on) are split
once, from --seed, into a test set (--n-test rows) and a training split. X and y are
standardised with the training split's means and standard deviations. On the same split:

  Ridge           sklearn.linear_model.RidgeCV (alpha by leave-one-out CV), on the whole
                  training split (no validation part needed)
  MLP             sklearn.neural_network.MLPRegressor, one hidden layer of --hidden-dim ReLU
                  units with biases, adam, L2 1e-4, early stopping on its own random
                  --val-fraction of the training split
  ABC             w = C (sigmoid(A x) + B x): abc_jax.cross_validate, --folds folds of the
                  training split (its rows shuffled from --seed) in one compiled loop; the
                  model of fold i trains with optax.adam on the other folds and stops early on
                  fold i (its loss every --eval-every epochs, --patience); every fold's model
                  is scored on the test set
  ABC + constant  the same on x with a constant 1 appended: biases for A and B (and through
                  B's, a constant added to z, an output bias)

The networks run for --seeds seeds of their initial weights; the test R^2 and MSE (in the
target's own units) are the numbers, mean ± std over the models (seeds, and for ABC seeds x
folds), with ABC's cross-validated loss (the held-out folds' mean squared error, standardised
y) beside them. Needs scikit-learn
(pip install -e ".[data]"). float64.

    python -m experiments.real_data --seeds 5 --hidden-dim 8
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402

NAME = "real_data"
MISSING = 'experiments.real_data needs scikit-learn: pip install -e ".[data]"'
MODELS = ("Ridge", "MLP", "ABC", "ABC + constant")
ALPHAS = np.logspace(-3, 3, 25)  # RidgeCV's grid


@dataclasses.dataclass(frozen=True)
class Config:
    """The models' settings and the split; ``QUICK``: the --quick values."""

    seeds: int = common.flag(5, "initial-weight seeds of the networks")
    hidden_dim: int = common.flag(8, "hidden units H of ABC and MLP")
    lr: float = common.flag(0.01, "adam's learning rate (ABC)")
    epochs: int = common.flag(5000, "most epochs (ABC, full batch)")
    folds: int = common.flag(5, "cross-validation folds (ABC)")
    eval_every: int = common.flag(25, "epochs between held-out evaluations (ABC)")
    patience: int = common.flag(10, "evaluations without a new best before ABC stops")
    mlp_max_iter: int = common.flag(3000, "MLPRegressor's max_iter")
    n_test: int = common.flag(100, "test rows (of 442)")
    val_fraction: float = common.flag(
        0.2, "the MLP's validation part of the training split, for early stopping")
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds", "hidden_dim", "epochs", "eval_every", "patience", "mlp_max_iter",
                     "n_test", "folds"):
            least = 2 if name == "folds" else 1
            common.check(getattr(self, name) >= least, f"--{name.replace('_', '-')} must be >= "
                         f"{least}, got {getattr(self, name)}")
        common.check(0 < self.val_fraction < 1 and 0 < self.lr < np.inf and self.n_test <= 400,
                     "--val-fraction must be in (0, 1), --lr > 0 and --n-test <= 400, got "
                     f"{self.val_fraction}, {self.lr} and {self.n_test}")


QUICK = Config(seeds=2, epochs=100, mlp_max_iter=50, patience=2, quick=True)


def load(n_test: int, val_fraction: float, seed: int) -> dict[str, Any]:
    """The diabetes data split into fit / val / test rows (fit + val: the training split) from
    ``seed``, X and y standardised with the training split's statistics; y_raw in its units."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    test, train = np.sort(perm[:n_test]), perm[n_test:]
    n_val = round(val_fraction * len(train))
    val, fit = np.sort(train[:n_val]), np.sort(train[n_val:])
    train = np.sort(train)
    mx, sx, my, sy = X[train].mean(0), X[train].std(0), y[train].mean(), y[train].std()
    return {"X": (X - mx) / sx, "y": (y - my) / sy, "y_raw": y, "y_mean": my, "y_std": sy,
            "fit": fit, "val": val, "train": train, "test": test}


def scores(d: dict[str, Any], pred: np.ndarray) -> dict[str, float]:
    """Test R^2 and MSE (target units) of standardised predictions of the test rows."""
    from sklearn.metrics import mean_squared_error, r2_score

    true, y = d["y_raw"][d["test"]], pred * d["y_std"] + d["y_mean"]
    return {"r2": float(r2_score(true, y)), "mse": float(mean_squared_error(true, y)),
            "pred": y}


def fit_ridge(d: dict[str, Any]) -> dict[str, Any]:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=ALPHAS).fit(d["X"][d["train"]], d["y"][d["train"]])
    return {"model": "Ridge", "seed": None, "alpha": float(model.alpha_),
            "n_params": d["X"].shape[1] + 1,
            **scores(d, model.predict(d["X"][d["test"]]))}


def fit_mlp(d: dict[str, Any], H: int, seed: int, max_iter: int, val_fraction: float) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    model = MLPRegressor(hidden_layer_sizes=(H,), max_iter=max_iter, early_stopping=True,
                         validation_fraction=val_fraction, random_state=seed)
    with warnings.catch_warnings():  # a short --quick run stops at max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(d["X"][d["train"]], d["y"][d["train"]])
    D = d["X"].shape[1]
    return {"model": "MLP", "seed": seed, "epochs_run": int(model.n_iter_),
            "best_epoch": int(np.argmax(model.validation_scores_)) + 1,
            "n_params": D * H + 2 * H + 1, **scores(d, model.predict(d["X"][d["test"]]))}


def fit_abc(d: dict[str, Any], args: Config, seed: int, constant: bool,
            adam: optax.GradientTransformation) -> dict[str, Any]:
    """abc_jax.cross_validate with ``adam`` (one object for every run: its functions are the
    compiled loop's static arguments, so a new one would compile it again) over the training
    split: each fold's model trains on the other folds and stops early on its own, then
    predicts the test rows. The run's test R^2 and MSE are the folds' means (each fold's kept
    too), its ``cv_loss`` the held-out folds' mean loss; the curves are the first fold's."""
    X = np.c_[d["X"], np.ones(len(d["X"]))] if constant else d["X"]
    rows = np.random.default_rng(args.seed).permutation(d["train"])  # folds: contiguous parts
    params = abc_jax.init_params(jax.random.key(seed), X.shape[1], args.hidden_dim, 1,
                                 dtype=jnp.float64)
    cv = abc_jax.cross_validate(params, abc_jax.Batch(X[rows], T=d["y"][rows, None]),
                                folds=args.folds, optimizer=adam,
                                epochs=args.epochs, eval_every=args.eval_every,
                                patience=args.patience, progress=False)
    res = cv["result"]
    folds = [scores(d, np.asarray(abc_jax.predict(p, X[d["test"]]))[:, 0])
             for p in (abc_jax.Params(*(a[i] for a in res.params)) for i in range(args.folds))]
    ran = np.isfinite(np.asarray(res.losses)).sum(axis=1)  # epochs each fold's model ran
    best = np.asarray(res.best_epoch)
    return {"model": "ABC + constant" if constant else "ABC", "seed": seed,
            "epochs_run": int(ran.max()), "best_epoch": int(np.median(best)),
            "n_params": sum(int(p.size) for p in params),
            **{k: float(np.mean([f[k] for f in folds])) for k in ("r2", "mse")},
            "cv_loss": cv["mean"], "cv_loss_std": cv["std"],
            "folds": {"r2": [f["r2"] for f in folds], "mse": [f["mse"] for f in folds],
                      "cv_loss": cv["held_out_loss"].tolist(), "best_epoch": best.tolist(),
                      "epochs_run": ran.tolist()},
            "pred": folds[0]["pred"], "pred_r2": folds[0]["r2"],
            "losses": np.asarray(res.losses)[0, :ran[0]],
            "eval_epochs": np.asarray(res.eval_epochs),
            "eval_losses": np.asarray(res.eval_losses)[0], "curve_best_epoch": int(best[0])}


def pooled(runs: list[dict], model: str, key: str) -> np.ndarray:
    """Every model's value of ``key`` (r2, mse, cv_loss): ABC's one per fold of each seed."""
    return np.array([v for r in runs if r["model"] == model
                     for v in (r["folds"][key] if "folds" in r else [r.get(key)])], float)


def summary(runs: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """Per model: test R^2 and MSE as mean ± std over its models (seeds; ABC: seeds x folds),
    ABC's cross-validated loss likewise, parameters, the count of models."""
    rows = []
    for m in MODELS:
        r2, mse, cv = (pooled(runs, m, k) for k in ("r2", "mse", "cv_loss"))
        n_params = next(r["n_params"] for r in runs if r["model"] == m)
        rows.append([m, f"{r2.mean():.3f} ± {r2.std():.3f}", f"{mse.mean():.0f} ± {mse.std():.0f}",
                     "-" if np.isnan(cv).all() else f"{cv.mean():.3f} ± {cv.std():.3f}",
                     n_params, len(r2)])
    return ["model", "test R^2", "test MSE", "CV loss", "params", "models"], rows


def plot(d: dict[str, Any], runs: list[dict]) -> Any:
    """Predicted vs true on the test set (each model's first run; ABC's first fold), the ABC
    runs' training and held-out fold curves (standardised units, first fold) with each one's
    best epoch (dashed, its colour), and the test R^2 of every model (ABC: one per fold and
    seed)."""
    fig, axes = common.figure(ncols=3, width=4.6, height=4.0)
    first = {m: next(r for r in runs if r["model"] == m) for m in MODELS}
    true = d["y_raw"][d["test"]]
    for i, (m, r) in enumerate(first.items()):
        axes[0].scatter(true, r["pred"], s=9, alpha=0.7, color=f"C{i}",
                        label=f"{m} (R² {r.get('pred_r2', r['r2']):.2f})")
    lims = [true.min(), true.max()]
    axes[0].plot(lims, lims, color="gray", lw=1, ls="--")
    axes[0].set(xlabel="true (test set)", ylabel="predicted", title="Test set, first seed")
    for i, m in enumerate(MODELS[2:], start=2):
        r = first[m]
        axes[1].plot(r["losses"], color=f"C{i}", lw=1, label=f"{m}: training")
        axes[1].plot(r["eval_epochs"], r["eval_losses"], "o", ms=2, color=f"C{i}", ls=":",
                     label=f"{m}: held-out fold")
        axes[1].axvline(r["curve_best_epoch"], color=f"C{i}", lw=0.9, ls="--", alpha=0.7)
    axes[1].plot([], [], color="0.4", lw=0.9, ls="--",  # one entry for the model-coloured lines
                 label="best epoch (held-out fold; early stopping)")
    axes[1].set(yscale="log", xlabel="epoch", ylabel="mean squared error (standardised y)",
                title="ABC: training and held-out loss, fold 1")
    for i, m in enumerate(MODELS):
        r2 = pooled(runs, m, "r2")
        axes[2].bar(i, np.mean(r2), yerr=np.std(r2), color=f"C{i}", alpha=0.6, capsize=4)
        axes[2].plot([i] * len(r2), r2, "k.", ms=4)
    axes[2].set_xticks(range(len(MODELS)), [m.replace(" + ", "\n+ ") for m in MODELS])
    axes[2].set(ylabel="test R²", title="Test R² (mean ± std over models)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """Ridge, then per seed the MLP, ABC and ABC + constant, on one split of the data."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise common.cli.Unavailable(MISSING) from None
    start = time.perf_counter()
    d = load(cfg.n_test, cfg.val_fraction, cfg.seed)
    runs, adam = [fit_ridge(d)], optax.adam(cfg.lr)
    for seed in common.progress(range(cfg.seeds), desc="seeds"):
        runs.append(fit_mlp(d, cfg.hidden_dim, seed, cfg.mlp_max_iter, cfg.val_fraction))
        runs += [fit_abc(d, cfg, seed, constant, adam) for constant in (False, True)]
    return {"config": dataclasses.asdict(cfg), "data": d, "runs": runs,
            "environment": common.environment(jnp.float64),
            "seconds": time.perf_counter() - start}


PER_RUN = ["model", "seed", "r2", "mse", "cv_loss", "cv_loss_std", "best_epoch", "epochs_run",
           "alpha", "n_params"]


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the summary table; write config.json, metrics.json, real_data.csv and
    real_data.png."""
    cfg, d, runs = res["config"], res["data"], res["runs"]
    header, rows = summary(runs)
    print(f"{NAME}: diabetes, a training split of {len(d['train'])} rows (ABC: {cfg['folds']} "
          f"folds), {len(d['test'])} test rows, H = {cfg['hidden_dim']}, {cfg['seeds']} seeds, "
          "float64")
    common.print_table(header, rows)
    metrics = {"environment": res["environment"], "seconds": res["seconds"],
               "split": {k: len(d[k]) for k in ("fit", "val", "train", "test")},
               "summary": {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                               for k in ("r2", "mse", "cv_loss")
                               for v in [pooled(runs, m, k)] if not np.isnan(v).all()}
                           for m in MODELS},
               "runs": [{k: r.get(k) for k in [*PER_RUN, "folds"]} for r in runs]}
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg, metrics=metrics,
        tables={NAME: (PER_RUN, [[r.get(k) for k in PER_RUN] for r in runs])},
        figures={NAME: plot(d, runs)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
