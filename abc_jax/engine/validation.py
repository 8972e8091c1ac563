"""Cross-validation: k folds as k members of one ``train_many`` run.

Fold i is a member whose row weights are 0 outside its training rows; after training it
is scored by ``batch_loss`` of its params on its test rows, which it never saw (with
patience, early stopping watches an inner split of its training rows). The folds are
scikit-learn's: ``KFold(k)`` of the rows of non-zero weight, any splitter, or index lists.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from abc_jax import edge
from abc_jax.core.model import Batch, Params
from abc_jax.engine.loop import member_losses
from abc_jax.engine.train import DivergenceError, train_many


def _splits(folds: Any, rows: np.ndarray, batch: Batch,
            shuffle: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train positions, test positions) in X for each fold, each sorted: an int k
    (scikit-learn's ``KFold(k)`` of the rows of non-zero weight; with ``shuffle`` a seed,
    ``KFold(k, shuffle=True, random_state=shuffle)``), a splitter with ``split`` (applied to
    those rows), or a sequence of (train, test) index arrays into X."""
    if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
        k = edge.check_int(folds, "folds", minimum=2)
        if len(rows) < k:
            raise ValueError(f"folds = {k} needs at least {k} rows of non-zero weight, got "
                             f"{len(rows)}")
        order = rows.copy()
        if shuffle is not None:  # KFold's own shuffle: RandomState(seed).shuffle
            np.random.RandomState(shuffle).shuffle(order)
        return [(np.setdiff1d(rows, part), np.sort(part)) for part in np.array_split(order, k)]
    if shuffle is not None:
        raise ValueError("shuffle goes with folds=k; a splitter shuffles itself (KFold(k, "
                         "shuffle=True, random_state=0)) and a list of folds is as given")
    if callable(getattr(folds, "split", None)):
        X = np.asarray(batch.X)[rows]
        y = None if batch.T is None else np.asarray(batch.T)[rows]
        return [(np.sort(rows[tr]), np.sort(rows[te])) for tr, te in folds.split(X, y)]
    try:
        pairs = [(np.asarray(tr, np.int64), np.asarray(te, np.int64)) for tr, te in folds]
    except (TypeError, ValueError):
        raise TypeError(f"folds must be an int k, a scikit-learn splitter (KFold(...)) or a "
                        f"list of (train_idx, test_idx) pairs, got {type(folds).__name__}"
                        ) from None
    N = batch.X.shape[0]
    for i, (tr, te) in enumerate(pairs):
        if tr.ndim != 1 or te.ndim != 1 or not len(te) or not len(tr) or \
                min(tr.min(), te.min()) < 0 or max(tr.max(), te.max()) >= N:
            raise ValueError(f"folds[{i}]: train and test must be non-empty 1-D arrays of row "
                             f"indices in 0 .. {N - 1}")
        if np.intersect1d(tr, te).size:
            raise ValueError(f"folds[{i}]: rows {np.intersect1d(tr, te)[:5].tolist()} are in "
                             "both train and test; a scored row must be unseen")
    return pairs


def cross_validate(params: Params, X: Any, *, folds: Any = 5, shuffle: int | None = None,
                   patience: int | None = None, validation_fraction: float = 0.1,
                   on_divergence: str = "raise", **train_kw: Any) -> dict[str, Any]:
    """k-fold cross-validation in one compiled loop: fold i is a member of ``train_many``.

    folds: an int k (the rows of non-zero weight in k contiguous folds, in order, as
    scikit-learn's ``KFold(k)``), a scikit-learn splitter (``KFold(5, shuffle=True,
    random_state=0)``, applied to those rows), or a list of (train_idx, test_idx) row
    indices of X. shuffle: with folds=k, a seed: the folds of ``KFold(k, shuffle=True,
    random_state=shuffle)``. Member i trains on its training rows (row weights 0 elsewhere) and is
    scored on its test rows by the loss of its trained params: exactly ``train`` with
    those weights, then ``batch_loss``. ``train_kw`` as in ``train_many`` (lr, epochs,
    optimizer, step, ...; not eval_data).
    patience: early stopping on an inner validation split, the last ``validation_fraction``
    of each fold's training rows (at least one row), which that fold then does not train
    on; the scored rows are never seen before they are scored.
    on_divergence: "raise" (a ``DivergenceError`` naming the folds and their epochs) or
    "exclude" (the diverged folds flagged in "diverged", their score NaN, left out of mean
    and std).

    Returns a dict: "held_out_loss" (k,) each fold's loss on its test rows, "mean" and "std"
    of it (std with ddof=1, as a spread over folds; over the folds kept), "diverged" (k,),
    "folds" the (train, test) index arrays, and "result", the ``TrainManyResult``.
    """
    if "eval_data" in train_kw:
        raise TypeError("cross_validate makes each fold's held-out data itself: no eval_data "
                        "(with patience, an inner validation split of each fold's training "
                        "rows)")
    if on_divergence not in ("raise", "exclude"):
        raise ValueError(f"on_divergence must be 'raise' or 'exclude', got {on_divergence!r}")
    fraction = edge.check_finite_float(validation_fraction, "validation_fraction",
                                       positive=True)
    if fraction >= 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    p = edge.params(edge.params_input(params))
    batch = edge.batch(edge.data_input(X), p.A.shape[1], p.C.shape[0], p.A.dtype)
    r = np.ones(batch.X.shape[0]) if batch.weights is None else np.asarray(batch.weights)
    if shuffle is not None:
        shuffle = edge.check_int(shuffle, "shuffle", minimum=0)
    splits = _splits(folds, np.flatnonzero(r > 0), batch, shuffle)
    k, N = len(splits), len(r)
    train_w, test_w, inner_w = (np.zeros((k, N)) for _ in range(3))
    for i, (tr, te) in enumerate(splits):
        train_w[i, tr], test_w[i, te] = r[tr], r[te]
        if patience is not None:
            tr = tr[r[tr] > 0]
            val = tr[len(tr) - max(1, math.ceil(fraction * len(tr))):]
            if len(val) == len(tr):
                raise ValueError(f"validation_fraction: fold {i} has {len(tr)} training rows, "
                                 "too few to hold some out for patience")
            inner_w[i, val], train_w[i, val] = r[val], 0
    if not (test_w.sum(axis=1) > 0).all():
        raise ValueError("folds: every fold needs a scored row of non-zero weight")
    dtype = p.A.dtype
    eval_data = None if patience is None else Batch(batch.X, jnp.asarray(inner_w, dtype),
                                                    batch.T)
    result = train_many(p, Batch(batch.X, jnp.asarray(train_w, dtype), batch.T), members=k,
                        eval_data=eval_data, patience=patience, **train_kw)
    scored = np.asarray(member_losses(result.params, Batch(batch.X, jnp.asarray(test_w, dtype),
                                                           batch.T),
                                      axes=Batch(None, 0, None),
                                      precision=edge.check_precision(train_kw.get("precision"))))
    diverged = np.asarray(result.diverged)
    if diverged.any() and on_divergence == "raise":
        bad = np.flatnonzero(diverged)
        at = np.asarray(result.diverged_at)[bad]
        lr = train_kw.get("lr")
        raise DivergenceError(
            f"cross_validate: folds {bad.tolist()} diverged (at epochs {at.tolist()}); a "
            "diverged fold has no score. Lower the learning rate (or the optimizer's), or "
            "pass on_divergence='exclude' to score the other folds. The error's .result "
            "holds every fold's TrainManyResult", result, int(at.min()),
            None if lr is None or np.ndim(lr) else float(lr), bad.tolist(), at.tolist())
    held = np.where(diverged, np.nan, scored)
    kept = held[~diverged]
    return {"held_out_loss": held, "mean": float(np.mean(kept)) if len(kept) else math.nan,
            "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan,
            "diverged": diverged, "folds": splits, "result": result}
