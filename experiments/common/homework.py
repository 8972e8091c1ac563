"""The homework's own implementation in plain Python: nested lists, loops and math.exp.

The naive baselines of the benchmarks and the float64 reference the homework's
reproduction is checked against. No JAX here except in `to_lists`' input types.

    L, (gA, gB, gC) = py_loss_and_grad(A, B, C, X)   # lists of lists of floats
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Matrix = list[list[float]]


def py_sigmoid(t: float) -> float:
    """The homework's two-branch sigmoid: exp of a non-positive number only, never overflows."""
    if t >= 0:
        return 1.0 / (1.0 + math.exp(-t))
    e = math.exp(t)
    return e / (1.0 + e)


def _matvec(M: Matrix, x: Sequence[float]) -> list[float]:
    return [sum(m * xi for m, xi in zip(row, x, strict=True)) for row in M]


def py_forward(A: Matrix, B: Matrix, C: Matrix, x: Sequence[float]) -> tuple[float, tuple]:
    """L(x) for one sample and the (u, z, w) the backward pass needs."""
    y = _matvec(A, x)
    u = [py_sigmoid(t) for t in y]
    v = _matvec(B, x)
    z = [ui + vi for ui, vi in zip(u, v, strict=True)]
    w = _matvec(C, z)
    return sum(wi * wi for wi in w), (u, z, w)


def py_batch_loss(A: Matrix, B: Matrix, C: Matrix, X: Sequence[Sequence[float]]) -> float:
    return sum(py_forward(A, B, C, x)[0] for x in X) / len(X)


def py_loss_and_grad(
    A: Matrix, B: Matrix, C: Matrix, X: Sequence[Sequence[float]]
) -> tuple[float, tuple[Matrix, Matrix, Matrix]]:
    """Mean loss over the rows of X and its gradient by hand-written backprop on lists.

    Per sample: gw = 2 w, gC += gw z^T, gz = C^T gw, gB += gz x^T,
    gy = gz * u (1 - u), gA += gy x^T; then divide by N.
    """
    H, D, O = len(A), len(A[0]), len(C)
    gA = [[0.0] * D for _ in range(H)]
    gB = [[0.0] * D for _ in range(H)]
    gC = [[0.0] * H for _ in range(O)]
    total = 0.0
    for x in X:
        L, (u, z, w) = py_forward(A, B, C, x)
        total += L
        gw = [2.0 * wi for wi in w]
        gz = [sum(C[o][h] * gw[o] for o in range(O)) for h in range(H)]
        gy = [gz[h] * u[h] * (1.0 - u[h]) for h in range(H)]
        for o in range(O):
            row = gC[o]
            for h in range(H):
                row[h] += gw[o] * z[h]
        for h in range(H):
            rowA, rowB = gA[h], gB[h]
            for d in range(D):
                rowA[d] += gy[h] * x[d]
                rowB[d] += gz[h] * x[d]
    n = len(X)
    scale = [[[g / n for g in row] for row in M] for M in (gA, gB, gC)]
    return total / n, (scale[0], scale[1], scale[2])


def py_fd_grad(
    A: Matrix, B: Matrix, C: Matrix, X: Sequence[Sequence[float]], eps: float = 6e-6
) -> tuple[Matrix, Matrix, Matrix]:
    """Central finite differences on lists: 2P evaluations of the mean loss."""
    mats = [[list(row) for row in M] for M in (A, B, C)]
    grads = []
    for M in mats:
        G = [[0.0] * len(M[0]) for _ in M]
        for i, row in enumerate(M):
            for j, orig in enumerate(row):
                row[j] = orig + eps
                lp = py_batch_loss(*mats, X)
                row[j] = orig - eps
                lm = py_batch_loss(*mats, X)
                row[j] = orig
                G[i][j] = (lp - lm) / (2 * eps)
        grads.append(G)
    return grads[0], grads[1], grads[2]


def py_gradient_descent(
    A: Matrix, B: Matrix, C: Matrix, X: Sequence[Sequence[float]], lr: float, epochs: int
) -> list[float]:
    """The homework's training loop on lists: the mean loss before each update."""
    mats = [[list(row) for row in M] for M in (A, B, C)]
    losses = []
    for _ in range(epochs):
        L, grads = py_loss_and_grad(*mats, X)
        losses.append(L)
        mats = [
            [[p - lr * g for p, g in zip(pr, gr, strict=True)] for pr, gr in zip(M, G, strict=True)]
            for M, G in zip(mats, grads, strict=True)
        ]
    return losses


def to_lists(params: Any, X: Any) -> tuple[Matrix, Matrix, Matrix, list[list[float]]]:
    """Params and X as nested Python float lists (float64)."""
    A, B, C = (np.asarray(p, np.float64).tolist() for p in params)
    return A, B, C, np.asarray(X, np.float64).tolist()
