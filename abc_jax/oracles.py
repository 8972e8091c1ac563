"""The two independent gradients the manual one is checked against.

``oracle_grad`` is ``jax.grad`` of the batch loss (reverse-mode autodiff: the
reference). ``fd_grad`` is central finite differences, the naive method the
homework compared against: 2P loss evaluations for P = 2HD + OH parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from abc_jax import validation
from abc_jax.model import Batch, Params, _batch_loss, prepare

_oracle = jax.grad(_batch_loss)


def oracle_grad(params: Params, X: Any, *, precision: str | None = None) -> Params:
    """``jax.grad(batch_loss)(params, X)``, jitted: the reference gradient, as ``Params``.

    X is (N, D) or a ``Batch``. ``precision`` None is ``"highest"``: exact float32
    arithmetic on a GPU too.
    """
    params, batch = prepare(params, X)
    return validation.run(_oracle, params, batch, name="X", precision=precision)


# Bound on floats touched per lax.map step: 2 * directions * N * (D + H + O).
_FD_WORK = 1 << 24


def _fd_grad(params: Params, batch: Batch, eps: jax.Array, batch_size: int) -> Params:
    flat, unravel = ravel_pytree(params)

    def partial_derivative(i: jax.Array) -> jax.Array:
        e = jnp.zeros_like(flat).at[i].set(eps)
        up, down = _batch_loss(unravel(flat + e), batch), _batch_loss(unravel(flat - e), batch)
        return (up - down) / (2 * eps)

    return unravel(jax.lax.map(partial_derivative, jnp.arange(flat.shape[0]),
                               batch_size=batch_size))


def fd_grad(params: Params, X: Any, eps: float | None = None, *,
            precision: str | None = None) -> Params:
    """Central finite differences of ``batch_loss``, one parameter at a time.

    dL/dp_j ~ (L(p + eps e_j) - L(p - eps e_j)) / (2 eps) for each of the P
    flattened parameters, in batches (``lax.map``), jitted: 2P evaluations of
    the batch loss on X (N, D) or a ``Batch``. Returns ``Params`` like params.

    ``eps`` defaults to ``finfo(dtype).eps ** (1/3)``, which balances the
    O(eps^2) truncation error against the O(machine eps / eps) rounding error
    (about 6e-6 in float64, 5e-3 in float32); it is data, not a constant of the
    compiled code. ``precision`` as in ``oracle_grad``.
    """
    params, batch = prepare(params, X)
    dtype = params.A.dtype
    eps = float(np.finfo(dtype).eps) ** (1 / 3) if eps is None else eps
    eps = validation.check_finite_float(eps, "eps", positive=True)
    (H, D), O, N = params.A.shape, params.C.shape[0], batch.X.shape[0]
    P = 2 * H * D + O * H
    batch_size = max(1, min(P, _FD_WORK // (2 * N * (D + H + O))))
    return validation.run(_fd_grad, params, batch, jnp.asarray(eps, dtype), name="X",
                          batch_size=batch_size, precision=precision)


def grad_errors(grads: Params, reference: Params) -> dict[str, dict[str, float]]:
    """Per parameter: max |grads - reference| and that over max |reference|.

    Returns ``{"A": {"max_abs": ..., "rel": ...}, "B": ..., "C": ...}``; the
    relative error is the one the tests bound (1e-12 float64, 1e-5 float32).
    """
    out = {}
    for name, g, r in zip(Params._fields, grads, reference, strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        max_abs = float(np.max(np.abs(g - r)))
        scale = float(np.max(np.abs(r)))
        out[name] = {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs}
    return out
