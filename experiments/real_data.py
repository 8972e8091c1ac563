"""Does the ABC network learn a real regression? The diabetes data, against Ridge and an MLP.

The diabetes data (442 patients, 10 features, a disease-progression score one year on) are split
once, from --seed, into a test set (--n-test rows) and a training split; a validation part of
the training split (--val-fraction) is held out for early stopping. X and y are standardised
with the training split's means and standard deviations. On the same split:

  Ridge           sklearn.linear_model.RidgeCV (alpha by leave-one-out CV), on the whole
                  training split (no validation part needed)
  MLP             sklearn.neural_network.MLPRegressor, one hidden layer of --hidden-dim ReLU
                  units with biases, adam, L2 1e-4, early stopping on its own random
                  --val-fraction of the training split
  ABC             w = C (sigmoid(A x) + B x): abc_jax.train with optax.adam, the held-out loss
                  on the validation part every --epochs-per-chunk epochs, --patience
  ABC + constant  the same on x with a constant 1 appended: biases for A and B (and through
                  B's, a constant added to z, an output bias)

The networks run for --seeds seeds of their initial weights (mean ± std over seeds); the
test R^2 and MSE (in the target's own units) are the numbers. Needs scikit-learn
(pip install -e ".[data]"). float64.

    python experiments/real_data.py --seeds 5 --hidden-dim 8
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import abc_jax  # noqa: E402

NAME = "real_data"
MISSING = 'real_data.py needs scikit-learn: pip install -e ".[data]"'
MODELS = ("Ridge", "MLP", "ABC", "ABC + constant")
ALPHAS = np.logspace(-3, 3, 25)  # RidgeCV's grid


def parse_args(argv: Sequence[str] | None) -> Any:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--seeds", type=int, default=5, help="initial-weight seeds of the networks")
    ap.add_argument("--hidden-dim", type=int, default=8, help="hidden units H of ABC and MLP")
    ap.add_argument("--lr", type=float, default=0.01, help="adam's learning rate (ABC)")
    ap.add_argument("--epochs", type=int, default=5000, help="most epochs (ABC, full batch)")
    ap.add_argument("--epochs-per-chunk", type=int, default=25,
                    help="epochs between held-out evaluations (ABC)")
    ap.add_argument("--patience", type=int, default=20,
                    help="evaluations without a new best before ABC stops")
    ap.add_argument("--mlp-max-iter", type=int, default=3000, help="MLPRegressor's max_iter")
    ap.add_argument("--n-test", type=int, default=100, help="test rows (of 442)")
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="validation part of the training split, for early stopping")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.mlp_max_iter, args.patience = 2, 100, 50, 2
    for name in ("seeds", "hidden_dim", "epochs", "epochs_per_chunk", "patience",
                 "mlp_max_iter", "n_test"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.val_fraction < 1 or not 0 < args.lr < np.inf or args.n_test > 400:
        ap.error("--val-fraction must be in (0, 1), --lr > 0 and --n-test <= 400, got "
                 f"{args.val_fraction}, {args.lr} and {args.n_test}")
    return args


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


def fit_abc(d: dict[str, Any], args: Any, seed: int, constant: bool) -> dict[str, Any]:
    """abc_jax.train with adam on the fit rows, early stopping on the val rows."""
    X = np.c_[d["X"], np.ones(len(d["X"]))] if constant else d["X"]
    rows = {k: abc_jax.Batch(X[d[k]], T=d["y"][d[k], None]) for k in ("fit", "val")}
    params = abc_jax.init_params(jax.random.key(seed), X.shape[1], args.hidden_dim, 1,
                                 dtype=jnp.float64)
    res = abc_jax.train(params, rows["fit"], optimizer=optax.adam(args.lr), epochs=args.epochs,
                        epochs_per_chunk=args.epochs_per_chunk, eval_data=rows["val"],
                        patience=args.patience, progress=False)
    pred = np.asarray(abc_jax.predict(res.params, X[d["test"]]))[:, 0]
    return {"model": "ABC + constant" if constant else "ABC", "seed": seed,
            "epochs_run": len(res.losses), "best_epoch": res.best_epoch,
            "n_params": sum(int(p.size) for p in params), "losses": np.asarray(res.losses),
            "eval_epochs": np.asarray(res.eval_epochs), "eval_losses": np.asarray(res.eval_losses),
            **scores(d, pred)}


def summary(runs: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """Per model: test R^2 and MSE as mean ± std over seeds, parameters, the seeds."""
    rows = []
    for m in MODELS:
        r2, mse = (np.array([r[k] for r in runs if r["model"] == m]) for k in ("r2", "mse"))
        n_params = next(r["n_params"] for r in runs if r["model"] == m)
        rows.append([m, f"{r2.mean():.3f} ± {r2.std():.3f}", f"{mse.mean():.0f} ± {mse.std():.0f}",
                     n_params, len(r2)])
    return ["model", "test R^2", "test MSE", "params", "runs"], rows


def plot(d: dict[str, Any], runs: list[dict]) -> Any:
    """Predicted vs true on the test set (each model's first run), the ABC runs' training and
    held-out curves (standardised units), and the test R^2 of every run."""
    fig, axes = _common.figure(ncols=3, width=4.6, height=4.0)
    first = {m: next(r for r in runs if r["model"] == m) for m in MODELS}
    true = d["y_raw"][d["test"]]
    for i, (m, r) in enumerate(first.items()):
        axes[0].scatter(true, r["pred"], s=9, alpha=0.7, color=f"C{i}",
                        label=f"{m} (R² {r['r2']:.2f})")
    lims = [true.min(), true.max()]
    axes[0].plot(lims, lims, color="gray", lw=1, ls="--")
    axes[0].set(xlabel="true (test set)", ylabel="predicted", title="Test set, first seed")
    for i, m in enumerate(MODELS[2:], start=2):
        r = first[m]
        axes[1].plot(r["losses"], color=f"C{i}", lw=1, label=f"{m}: training")
        axes[1].plot(r["eval_epochs"], r["eval_losses"], "o", ms=2, color=f"C{i}", ls=":",
                     label=f"{m}: validation")
        axes[1].axvline(r["best_epoch"], color=f"C{i}", lw=0.8, alpha=0.6)
    axes[1].set(yscale="log", xlabel="epoch", ylabel="mean squared error (standardised y)",
                title="ABC: training and validation loss")
    for i, m in enumerate(MODELS):
        r2 = [r["r2"] for r in runs if r["model"] == m]
        axes[2].bar(i, np.mean(r2), yerr=np.std(r2), color=f"C{i}", alpha=0.6, capsize=4)
        axes[2].plot([i] * len(r2), r2, "k.", ms=4)
    axes[2].set_xticks(range(len(MODELS)), [m.replace(" + ", "\n+ ") for m in MODELS])
    axes[2].set(ylabel="test R²", title="Test R² (mean ± std over seeds)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    return fig


def run(args: Any) -> tuple[dict[str, Any], list[dict]]:
    d = load(args.n_test, args.val_fraction, args.seed)
    runs = [fit_ridge(d)]
    for seed in _common.progress(range(args.seeds), desc="seeds"):
        runs.append(fit_mlp(d, args.hidden_dim, seed, args.mlp_max_iter, args.val_fraction))
        runs += [fit_abc(d, args, seed, constant) for constant in (False, True)]
    return d, runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(f"error: {MISSING}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    d, runs = run(args)
    header, rows = summary(runs)
    print(f"{NAME}: diabetes, {len(d['fit'])} fit + {len(d['val'])} validation rows (training "
          f"split {len(d['train'])}), {len(d['test'])} test rows, H = {args.hidden_dim}, "
          f"{args.seeds} seeds, float64")
    _common.print_table(header, rows)
    per_run = ["model", "seed", "r2", "mse", "best_epoch", "epochs_run", "alpha", "n_params"]
    metrics = {"environment": _common.environment(jnp.float64),
               "seconds": time.perf_counter() - start,
               "split": {k: len(d[k]) for k in ("fit", "val", "train", "test")},
               "summary": {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                               for k in ("r2", "mse")
                               for v in [[r[k] for r in runs if r["model"] == m]]}
                           for m in MODELS},
               "runs": [{k: r.get(k) for k in per_run} for r in runs]}
    _common.write_and_report(
        args.out, args.docs, [NAME], config=vars(args), metrics=metrics,
        tables={NAME: (per_run, [[r.get(k) for k in per_run] for r in runs])},
        figures={NAME: plot(d, runs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
