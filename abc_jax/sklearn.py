"""The ABC network as a scikit-learn estimator: ``ABCRegressor``.

    from sklearn.model_selection import GridSearchCV
    from abc_jax.sklearn import ABCRegressor

    search = GridSearchCV(ABCRegressor(), {"hidden_dim": [4, 16], "lr": [0.003, 0.01]}, cv=5)
    search.fit(X, y)                  # X (n, D), y (n,) or (n, O)
    search.predict(X_new)             # in y's units

``fit`` is ``abc_jax.train`` on the rows (full batch, or mini-batches with ``batch_size``),
after ``abc_jax.fit_preprocessing`` (standardised X and y, a constant input column for a
bias); ``predict`` is ``abc_jax.predict`` with that preprocessing, so predictions are in y's
units. It works in a ``Pipeline``, ``GridSearchCV`` and ``cross_val_score``, and passes
scikit-learn's ``check_estimator``. float64 by default: computed inside
``jax.enable_x64(True)`` (JAX >= 0.8), whatever the global x64 setting.

Needs scikit-learn (``pip install -e ".[sklearn]"``); ``import abc_jax`` does not import it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import numpy as np
import optax
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from abc_jax import edge
from abc_jax.api import init_params, predict
from abc_jax.core.model import Batch, Params
from abc_jax.engine.train import train
from abc_jax.preprocessing import Preprocessing, apply_preprocessing, fit_preprocessing

OPTIMIZERS = ("adam", "gd")  # optax.adam(lr); train's hand-rolled rule p <- p - lr g
DTYPES = ("float64", "float32")


@functools.lru_cache(maxsize=64)
def _adam(lr: float) -> optax.GradientTransformation:
    """One ``optax.adam(lr)`` per rate: the compiled loop is specialised on the optimizer's
    functions, so a fit with a rate seen before reuses its compilation."""
    return optax.adam(lr)


def _x64(dtype: str) -> Any:
    """The context the estimator computes in: x64 on for float64, off for float32."""
    switch = getattr(jax, "enable_x64", None)
    if switch is not None:
        return switch(dtype == "float64")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs JAX >= 0.8 (jax.enable_x64) or x64 enabled "
                         "globally (jax.config.update('jax_enable_x64', True)); or pass "
                         "dtype='float32'")
    return contextlib.nullcontext()


class ABCRegressor(RegressorMixin, BaseEstimator):
    """w = C (sigmoid(A x) + B x) fitted to y by gradient descent on the weighted mean of
    ||w - y||^2, trained by ``abc_jax.train``.

    Parameters:
      hidden_dim: H, the hidden units.
      lr: the learning rate of ``optimizer`` "adam" or "gd"; None with an Optax optimizer
        (it carries its own).
      epochs: full passes over the rows (each one step, or ceil(n / batch_size) steps).
      optimizer: "adam" (``optax.adam(lr)``), "gd" (the hand-rolled p <- p - lr g: every lr
        shares one compilation) or an ``optax.GradientTransformation``.
      standardize: standardise X and y with the training rows' weighted mean and standard
        deviation (``fit_preprocessing``); predictions are in y's units either way.
      bias: append a constant 1 column to X, a bias for A and B (and through C, the
        output's), the graph unchanged.
      batch_size: mini-batches of this many rows, shuffled every epoch from
        ``random_state``; None: full batch.
      dtype: "float64" or "float32", what the network computes in.
      random_state: None, an int or a ``np.random.RandomState``: the initial params (and
        the mini-batches') seed, as scikit-learn's estimators take it.

    Attributes (after ``fit``):
      params_: ``abc_jax.Params`` of NumPy arrays, A (H, D'), B (H, D'), C (O, H), D' = D +
        1 with ``bias``; ``preprocessing_``: the ``abc_jax.Preprocessing`` (None with neither
        standardize nor bias); with these two, ``abc_jax.predict(params_, X,
        preprocessing=preprocessing_)`` is ``predict`` and ``abc_jax.save_params`` stores them.
      loss_curve_: (epochs,) the training loss before each epoch's update (standardised
        units when standardize). n_features_in_, n_outputs_.

    ``fit`` raises ``abc_jax.DivergenceError`` (a RuntimeError) when the loss becomes
    non-finite (a smaller lr helps); ``GridSearchCV`` scores such a candidate NaN.
    """

    def __init__(self, hidden_dim: int = 16, *, lr: float | None = 0.01, epochs: int = 1000,
                 optimizer: Any = "adam", standardize: bool = True, bias: bool = True,
                 batch_size: int | None = None, dtype: str = "float64",
                 random_state: Any = None):
        self.hidden_dim = hidden_dim
        self.lr = lr
        self.epochs = epochs
        self.optimizer = optimizer
        self.standardize = standardize
        self.bias = bias
        self.batch_size = batch_size
        self.dtype = dtype
        self.random_state = random_state

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # y (n, O): O outputs
        tags.target_tags.positive_only = False  # any real y
        tags.input_tags.allow_nan = False
        return tags

    def _rate(self) -> dict[str, Any]:
        """``train``'s keywords for the optimizer: ``lr=`` or ``optimizer=``."""
        opt = self.optimizer
        if isinstance(opt, str):
            if opt not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an "
                                 f"optax.GradientTransformation, got {opt!r}")
            lr = edge.check_finite_float(self.lr, "lr", positive=True)
            return {"lr": lr} if opt == "gd" else {"optimizer": _adam(lr)}
        if not all(callable(getattr(opt, f, None)) for f in ("init", "update")):
            raise TypeError(f"optimizer must be one of {OPTIMIZERS} or an "
                            f"optax.GradientTransformation, got {type(opt).__name__}")
        if self.lr is not None:
            raise ValueError(f"lr must be None with an Optax optimizer, which carries its own "
                             f"rate, got lr={self.lr!r}: pass lr=None")
        return {"optimizer": opt}

    def _check_settings(self) -> None:
        edge.check_positive_int(self.hidden_dim, "hidden_dim")
        edge.check_positive_int(self.epochs, "epochs")
        edge.check_positive_int(self.batch_size, "batch_size", allow_none=True)
        for name in ("standardize", "bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> ABCRegressor:
        """Train on X (n, D) and y (n,) or (n, O), rows weighted by ``sample_weight`` (n,)
        (None: all 1; a row of weight 0 takes no part); returns self."""
        self._check_settings()
        rate = self._rate()
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        w = _sample_weight(sample_weight, X.shape[0])
        T = np.asarray(y, np.float64).reshape(X.shape[0], -1)
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        key = jax.random.key(seed)
        dtype = np.dtype(self.dtype)
        with _x64(self.dtype):
            batch = Batch(X.astype(dtype), w.astype(dtype), T.astype(dtype))
            prep = None
            if self.standardize or self.bias:
                prep = fit_preprocessing(batch, standardize=bool(self.standardize),
                                         bias=bool(self.bias))
                batch = apply_preprocessing(prep, batch)
            params = init_params(jax.random.fold_in(key, 0), batch.X.shape[1], self.hidden_dim,
                                 T.shape[1], dtype=dtype)
            result = train(params, batch, epochs=self.epochs, batch_size=self.batch_size,
                           key=None if self.batch_size is None else jax.random.fold_in(key, 1),
                           progress=False, **rate)
            self.params_ = Params(*(np.asarray(a) for a in result.params))
            self.preprocessing_ = None if prep is None else Preprocessing(
                *(None if a is None else np.asarray(a) for a in prep))
            self.loss_curve_ = np.asarray(result.losses)
        self.n_outputs_ = T.shape[1]
        self._y_ndim = np.ndim(y)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The outputs for X (n, D), in y's units: (n,) for a 1-D y at fit, else (n, O)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        with _x64(self.dtype):
            W = predict(self.params_, X.astype(np.dtype(self.dtype)),
                        preprocessing=self.preprocessing_)
            W = np.asarray(W, np.float64)
        return W[:, 0] if self._y_ndim == 1 else W


def _sample_weight(sample_weight: Any, n: int) -> np.ndarray:
    """Row weights (n,): finite, >= 0, not all 0; ones for None."""
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape (n_samples,) = ({n},), one weight per "
                         f"row of X, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and >= 0, got min "
                         f"{np.nanmin(w) if not np.isnan(w).all() else np.nan} and "
                         f"{int((~np.isfinite(w)).sum())} non-finite value(s)")
    if not w.sum() > 0:
        raise ValueError("sample_weight: the weights are all zero; at least one row must "
                         "weigh more than zero")
    return w
