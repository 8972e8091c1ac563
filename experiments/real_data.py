"""Does the ABC network learn a real regression? The diabetes data, against Ridge and an MLP,
the scikit-learn way: each model in the same pipeline, tuned by GridSearchCV on the same folds.

The diabetes data (442 patients, 10 features, a disease-progression score one year on) are split
once, from --seed, into a test set (--n-test rows) and a training split. Every model is the
final step of one pipeline, TransformedTargetRegressor(make_pipeline(StandardScaler(), model),
transformer=StandardScaler()): X and y standardised with the training rows' statistics of each
fit. GridSearchCV tunes it on the training split with the same --folds shuffled folds
(KFold(shuffle=True, random_state=--seed)) for every model, scored by R^2:

  Ridge             sklearn.linear_model.Ridge, alpha over --alphas
  MLP               sklearn.neural_network.MLPRegressor, one hidden layer of ReLU units with
                    biases, adam, its own early stopping; hidden units over --hidden-dims,
                    learning_rate_init over --mlp-lrs
  ABC               abc_jax.sklearn.ABCRegressor, w = C (sigmoid(A x) + B x) on x with a
                    constant 1 appended (bias=True: biases for A and B, and through C an
                    output bias), --epochs full-batch epochs of the hand-rolled rule p <- p - lr g
                    (optimizer="gd": the lr is data, so the grid over lr compiles once per
                    shape); hidden_dim over --hidden-dims, lr over --lrs
  ABC without bias  the same with bias=False: the graph as the homework has it

A candidate whose training diverges scores NaN in its fold (GridSearchCV's error_score) and
ranks last; the count is reported. The best candidate is refitted on the whole training split
with --seeds seeds of the networks' initial weights and scored on the test set. The numbers:
CV R^2 of the best candidate (mean ± std over the folds) and test R^2 and MSE (in the target's
units; mean ± std over the seeds); as the folds are the same, each model's fold R^2 minus
Ridge's is a paired difference (mean ± std over the folds). Needs scikit-learn
(pip install -e ".[data]"). float64.

    python -m experiments.real_data --seeds 5 --hidden-dims 4 8 16
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments import common

NAME = "real_data"
MISSING = 'experiments.real_data needs scikit-learn: pip install -e ".[data]"'
MODELS = ("Ridge", "MLP", "ABC", "ABC without bias")
STEP = {"Ridge": "ridge", "MLP": "mlpregressor", "ABC": "abcregressor",
        "ABC without bias": "abcregressor"}  # the model's step name in its pipeline


@dataclasses.dataclass(frozen=True)
class Config:
    """The grids, the folds and the split; ``QUICK``: the --quick values."""

    seeds: int = common.flag(5, "initial-weight seeds of the networks' refits on the test set")
    folds: int = common.flag(5, "cross-validation folds (the same for every model)")
    hidden_dims: tuple[int, ...] = common.flag((4, 8, 16), "hidden units H of ABC and the MLP")
    lrs: tuple[float, ...] = common.flag((0.03, 0.1, 0.3), "ABC's learning rates (hand-rolled "
                                         "gradient descent)")
    epochs: int = common.flag(500, "ABC's full-batch epochs")
    mlp_lrs: tuple[float, ...] = common.flag((1e-3, 1e-2), "the MLP's learning_rate_init")
    mlp_max_iter: int = common.flag(3000, "MLPRegressor's max_iter")
    alphas: tuple[float, ...] = common.flag(tuple(np.logspace(-3, 3, 13).tolist()),
                                            "Ridge's alphas")
    n_test: int = common.flag(100, "test rows (of 442)")
    seed: int = common.flag(0, "random seed: the split and the folds")
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds", "epochs", "mlp_max_iter", "n_test", "folds"):
            least = 2 if name == "folds" else 1
            common.check(getattr(self, name) >= least, f"--{name.replace('_', '-')} must be >= "
                         f"{least}, got {getattr(self, name)}")
        for name in ("hidden_dims", "lrs", "mlp_lrs", "alphas"):
            values = getattr(self, name)
            common.check(len(values) > 0 and all(0 < v < np.inf for v in values),
                         f"--{name.replace('_', '-')} must be numbers > 0, got {values}")
        common.check(self.n_test <= 400, f"--n-test must be <= 400, got {self.n_test}")


QUICK = Config(seeds=2, folds=3, hidden_dims=(4, 8), lrs=(0.1,), epochs=50, mlp_lrs=(1e-2,),
               mlp_max_iter=50, alphas=(0.1, 10.0), quick=True)


def load(n_test: int, seed: int) -> dict[str, Any]:
    """The diabetes data (X (442, 10), y (442,) in its units) and a split into train and test
    rows (sorted indices) drawn from ``seed``."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    return {"X": X, "y": y, "train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def pipeline(model: Any) -> Any:
    """The pipeline every model is the last step of: X and y standardised on each fit's rows."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return TransformedTargetRegressor(make_pipeline(StandardScaler(), model),
                                      transformer=StandardScaler())


def searches(cfg: Config) -> dict[str, tuple[Any, dict[str, list[Any]]]]:
    """{model: (pipeline, grid of its own parameters)}."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    from abc_jax.sklearn import ABCRegressor

    def abc(bias: bool) -> Any:
        return ABCRegressor(epochs=cfg.epochs, optimizer="gd", standardize=False, bias=bias,
                            random_state=0)  # the pipeline standardises

    hidden = list(cfg.hidden_dims)
    return {
        "Ridge": (pipeline(Ridge()), {"alpha": list(cfg.alphas)}),
        "MLP": (pipeline(MLPRegressor(max_iter=cfg.mlp_max_iter, early_stopping=True,
                                      random_state=0)),
                {"hidden_layer_sizes": [(h,) for h in hidden],
                 "learning_rate_init": list(cfg.mlp_lrs)}),
        "ABC": (pipeline(abc(True)), {"hidden_dim": hidden, "lr": list(cfg.lrs)}),
        "ABC without bias": (pipeline(abc(False)), {"hidden_dim": hidden, "lr": list(cfg.lrs)}),
    }


def n_params(model: str, best: dict[str, Any], D: int) -> int:
    """Trainable numbers of the best candidate: ABC 2 H D' + H (D' = D + 1 with the bias),
    the MLP D H + 2 H + 1, Ridge D + 1."""
    if model == "Ridge":
        return D + 1
    if model == "MLP":
        (h,) = best["hidden_layer_sizes"]
        return D * h + 2 * h + 1
    return 2 * best["hidden_dim"] * (D + (model == "ABC")) + best["hidden_dim"]


def tune(model: str, est: Any, grid: dict[str, list[Any]], d: dict[str, Any],
         cfg: Config) -> dict[str, Any]:
    """GridSearchCV of ``est`` over ``grid`` on the training split, then the best candidate
    refitted with each seed and scored on the test rows."""
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning, FitFailedWarning
    from sklearn.metrics import mean_squared_error, r2_score
    from sklearn.model_selection import GridSearchCV, KFold

    prefix = f"regressor__{STEP[model]}__"
    folds = KFold(cfg.folds, shuffle=True, random_state=cfg.seed)
    search = GridSearchCV(est, {prefix + k: v for k, v in grid.items()}, cv=folds, refit=False)
    Xtr, ytr = d["X"][d["train"]], d["y"][d["train"]]
    with warnings.catch_warnings():  # short MLP runs stop at max_iter; diverged fits score NaN
        for category in (ConvergenceWarning, FitFailedWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        search.fit(Xtr, ytr)
        res, i = search.cv_results_, search.best_index_
        splits = np.array([res[f"split{k}_test_score"] for k in range(cfg.folds)])  # (k, C)
        best = {k[len(prefix):]: v for k, v in search.best_params_.items()}
        seeds = [None] if model == "Ridge" else list(range(cfg.seeds))
        tests = []
        for s in seeds:
            refit = clone(est).set_params(**search.best_params_)
            if s is not None:
                refit.set_params(**{prefix + "random_state": s})
            pred = refit.fit(Xtr, ytr).predict(d["X"][d["test"]])
            true = d["y"][d["test"]]
            tests.append({"model": model, "seed": s, "r2": float(r2_score(true, pred)),
                          "mse": float(mean_squared_error(true, pred)), "pred": pred})
    grid_rows = [{"params": {k[len(prefix):]: v for k, v in p.items()},
                  "cv_r2": float(m), "cv_r2_std": float(sd), "failed_folds": int(f)}
                 for p, m, sd, f in zip(res["params"], res["mean_test_score"],
                                        res["std_test_score"], np.isnan(splits).sum(axis=0),
                                        strict=True)]
    return {"model": model, "best": best, "cv_r2": splits[:, i], "grid": grid_rows,
            "failed_fits": int(np.isnan(splits).sum()), "n_fits": int(splits.size),
            "n_params": n_params(model, best, d["X"].shape[1]), "tests": tests}


def jsonable(value: Any) -> Any:
    """A grid value for JSON and tables: tuples (the MLP's layer sizes) as lists."""
    return list(value) if isinstance(value, tuple) else value


def summary(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per model: best parameters, CV R^2 (mean ± std over folds), test R^2 and MSE (mean ±
    std over seeds), parameters, diverged fits of the grid."""
    rows = []
    for m, r in results.items():
        r2, mse = (np.array([t[k] for t in r["tests"]]) for k in ("r2", "mse"))
        best = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={jsonable(v)}"
                         for k, v in r["best"].items())
        rows.append([m, best, f"{r['cv_r2'].mean():.3f} ± {r['cv_r2'].std():.3f}",
                     f"{r2.mean():.3f} ± {r2.std():.3f}", f"{mse.mean():.0f} ± {mse.std():.0f}",
                     r["n_params"], f"{r['failed_fits']}/{r['n_fits']}"])
    return ["model", "best (GridSearchCV)", "CV R^2", "test R^2", "test MSE", "params",
            "diverged fits"], rows


def plot(d: dict[str, Any], results: dict[str, dict[str, Any]]) -> Any:
    """Predicted against true on the test set (each model's best, first seed); ABC's grid
    (CV R^2 against lr, one line per H, ± std over folds); CV and test R^2 per model."""
    fig, axes = common.figure(ncols=3, width=4.6, height=4.0)
    true = d["y"][d["test"]]
    for i, (m, r) in enumerate(results.items()):
        t = r["tests"][0]
        axes[0].scatter(true, t["pred"], s=9, alpha=0.7, color=f"C{i}",
                        label=f"{m} (R² {t['r2']:.2f})")
    lims = [true.min(), true.max()]
    axes[0].plot(lims, lims, color="gray", lw=1, ls="--")
    axes[0].set(xlabel="true (test set)", ylabel="predicted", title="Test set, first seed")
    for m, ls in (("ABC", "-"), ("ABC without bias", "--")):
        grid = results[m]["grid"]
        for j, h in enumerate(sorted({g["params"]["hidden_dim"] for g in grid})):
            rows = [g for g in grid if g["params"]["hidden_dim"] == h]
            axes[1].plot([g["params"]["lr"] for g in rows], [g["cv_r2"] for g in rows],
                         marker="o", ms=4, ls=ls, color=f"C{j + 4}", label=f"{m}, H = {h}")
            for g in rows:
                if g["failed_folds"]:
                    axes[1].plot(g["params"]["lr"], 0.02, "x", color=f"C{j + 4}",
                                 transform=axes[1].get_xaxis_transform())
    lrs = sorted({g["params"]["lr"] for g in results["ABC"]["grid"]})
    axes[1].set_xscale("log")
    axes[1].set_xticks(lrs, [f"{v:g}" for v in lrs])
    axes[1].minorticks_off()
    axes[1].set(xlabel="learning rate (hand-rolled gradient descent)",
                ylabel="CV R² (mean over folds)",
                title="ABC's grid (x at the bottom: diverged, NaN)")
    for i, r in enumerate(results.values()):
        r2 = np.array([t["r2"] for t in r["tests"]])
        axes[2].bar(i - 0.2, r["cv_r2"].mean(), 0.4, yerr=r["cv_r2"].std(), color=f"C{i}",
                    alpha=0.35, capsize=4, label="CV (folds)" if i == 0 else None)
        axes[2].bar(i + 0.2, r2.mean(), 0.4, yerr=r2.std(), color=f"C{i}", alpha=0.8,
                    capsize=4, label="test (seeds)" if i == 0 else None)
    axes[2].set_xticks(range(len(results)), [m.replace(" without", "\nwithout")
                                             for m in results])
    axes[2].set(ylabel="R²", title="CV and test R² (mean ± std)")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """Each model's GridSearchCV on the same folds, then its best refitted and tested."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise common.cli.Unavailable(MISSING) from None
    start = time.perf_counter()
    d = load(cfg.n_test, cfg.seed)
    results = {}
    for m, (est, grid) in common.progress(searches(cfg).items(), desc="models"):
        t = time.perf_counter()
        results[m] = tune(m, est, grid, d, cfg) | {"seconds": time.perf_counter() - t}
    return {"config": dataclasses.asdict(cfg), "data": d, "results": results,
            "environment": common.environment(jnp.float64),
            "seconds": time.perf_counter() - start}


PER_RUN = ["model", "seed", "r2", "mse"]


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the summary table; write config.json, metrics.json, real_data.csv (one row per
    test run) and real_data.png."""
    cfg, d, results = res["config"], res["data"], res["results"]
    header, rows = summary(results)
    print(f"{NAME}: diabetes, a training split of {len(d['train'])} rows in {cfg['folds']} "
          f"folds (the same for every model), {len(d['test'])} test rows, {cfg['seeds']} seeds")
    common.print_table(header, rows)

    def stats(values: Any) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    metrics = {"environment": res["environment"], "seconds": res["seconds"],
               "split": {k: len(d[k]) for k in ("train", "test")}, "folds": cfg["folds"],
               "summary": {m: {"r2": stats([t["r2"] for t in r["tests"]]),
                               "mse": stats([t["mse"] for t in r["tests"]]),
                               "cv_r2": stats(r["cv_r2"]),
                               "cv_r2_folds": r["cv_r2"].tolist(),
                               # the same folds: each fold's R^2 minus Ridge's, paired
                               "cv_r2_minus_ridge": stats(r["cv_r2"] -
                                                          results["Ridge"]["cv_r2"]),
                               "best": {k: jsonable(v) for k, v in r["best"].items()},
                               "n_params": r["n_params"], "failed_fits": r["failed_fits"],
                               "n_fits": r["n_fits"], "seconds": r["seconds"]}
                           for m, r in results.items()},
               "grids": {m: [g | {"params": {k: jsonable(v) for k, v in g["params"].items()}}
                             for g in r["grid"]] for m, r in results.items()},
               "runs": [{k: t[k] for k in PER_RUN} for r in results.values()
                        for t in r["tests"]]}
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg, metrics=metrics,
        tables={NAME: (PER_RUN, [[t[k] for k in PER_RUN] for r in results.values()
                                 for t in r["tests"]])},
        figures={NAME: plot(d, results)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
