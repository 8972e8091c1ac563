"""Levenberg-Marquardt as one training step: damped Gauss-Newton, its damping adapted.

For the batch loss L(p) = (1 / rho) sum_i r_i ||w_i - t_i||^2 at the params p (P = 2HD + OH
numbers), with gradient g and Gauss-Newton matrix G = (2 / rho) sum_i r_i J_i^T J_i
(``core.curvature``), linearising the outputs w_i(p + d) ~ w_i + J_i d makes the loss the
quadratic model

    m(d) = L + g^T d + 1/2 d^T G d                      (exact for the linearised residuals)

and epoch e of member m, with its damping lam (and Nielsen's factor nu), is::

    L, g  = batch_loss(p), its gradient                       (the hand-derived pass)
    d     = -(G + lam I)^{-1} g                               direct: G formed; cg: ggn_vp
    pred  = L - m(d) = -(g^T d + 1/2 d^T G d)                 the predicted reduction
    rho   = (L - batch_loss(p + d)) / pred                    actual over predicted
    if pred > 0 and rho > 0:   p <- p + d,  lam <- lam max(1/3, 1 - (2 rho - 1)^3),  nu <- 2
    else (rejected):           p unchanged, lam <- lam nu,                          nu <- 2 nu
    lam <- clip(lam, 1e-16, 1e16)

(Nielsen's rule, H. B. Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05;
Madsen, Nielsen and Tingleff, "Methods for non-linear least squares problems", 2004, eq.
3.16). A good model (rho near 1) divides lam by up to 3, a poor one (rho near 0) keeps it,
rho = 1/2 multiplies it by 1; rejections raise it faster and faster (2, 4, 8, ... times). The
clip keeps lam positive and finite where rounding decides rho at convergence (1e-16 never
changes G + lam I in float64 more than rounding would; 1e16 makes d a vanishing gradient
step). The loss the epoch reports is L at p, before its update, as for every step; an epoch
with a rejected step is an epoch (its cost is one gradient, one solve, one forward pass).

Two solvers of (G + lam I) d = -g:

- ``direct``: G as a dense (P, P) matrix from its blocks (``curvature.ggn_matrix``: five
  Gram matrices of the rows, N (HD)^2 multiply-adds), then a Cholesky factorisation,
  P^3 / 3. For small P (a few thousand): O(P^2) memory.
- ``cg``: conjugate gradients with the operator V -> G V + lam V (``curvature.ggn_vp``, a
  forward, tangent and backward pass, 10 N K^2 multiply-adds at D = H = O = K), at most
  ``cg_iters`` iterations, stopped once ||r|| <= cg_tol ||g|| (r = -g - (G + lam I) d);
  never a P x P matrix. ``precondition``: preconditioned by ``curvature.precondition``,
  the damped inverse of the block diagonal of G, exact for the B and C blocks and K-FAC's
  form for the A block (its eigendecompositions once per epoch, for any lam). G d for
  ``pred`` comes from CG's residual, G d = -g - r - lam d, without another product.

The initial damping is data (a number, or an array (M,), one per member of ``train_many``):
every value runs in one compilation. The step draws nothing (no key) and needs no row count.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import cho_factor, cho_solve

from abc_jax import edge
from abc_jax.core import backward, curvature, model
from abc_jax.core.model import Batch, Params
from abc_jax.engine import arguments, steps

SOLVERS = ("direct", "cg")
CG_ITERS, CG_TOL = 50, 1e-6  # the defaults of solver="cg"
DAMPING_RANGE = (1e-16, 1e16)  # lam is clipped to it after each update
SHRINK = 1 / 3  # the most an accepted step divides lam by


class LMState(NamedTuple):
    """One member's Levenberg-Marquardt state (scalars, the params' dtype)."""

    damping: jax.Array  # () lam, the damping of the next epoch's solve
    nu: jax.Array  # () Nielsen's factor lam is multiplied by at the next rejection


def dot(a: Params, b: Params) -> jax.Array:
    """sum of a * b over the three matrices: the inner product of two tangents."""
    return sum(jnp.vdot(x, y) for x, y in zip(a, b, strict=True))


def axpy(alpha: Any, x: Params, y: Params) -> Params:
    """alpha x + y, leaf by leaf."""
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def loss_sum(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum_i r_i L_i, rho) over the rows of ``batch`` (a chunk of rows may weigh 0)."""
    losses = jax.vmap(model.forward, in_axes=(None, 0, 0))(params, batch.X, batch.T)[0]
    r = batch.weights
    return (jnp.sum(losses) if r is None else jnp.sum(r * losses)), curvature.total_weight(batch)


def batch_loss(params: Params, batch: Batch, chunk_size: int | None) -> jax.Array:
    """``model.batch_loss``, ``chunk_size`` rows at a time (None: all at once)."""
    total, weight = backward.chunked_sum(lambda b: loss_sum(params, b), batch,
                                         backward.rows_per_chunk(chunk_size, params, batch))
    return total / weight


def solve_direct(params: Params, batch: Batch, g: Params, damping: jax.Array,
                 chunk_size: int | None) -> tuple[Params, Params]:
    """(d, G d): d = -(G + lam I)^{-1} g by Cholesky, G dense from ``ggn_matrix``. A
    factorisation that fails (G + lam I not numerically positive definite) gives NaN, which
    the step rejects."""
    G = curvature.ggn_matrix(params, batch, chunk_size)  # (P, P)
    P = G.shape[0]
    factor = cho_factor(G + damping * jnp.eye(P, dtype=G.dtype))
    d = cho_solve(factor, -curvature.flatten(g))  # (P,)
    return curvature.unflatten(d, params), curvature.unflatten(G @ d, params)


def solve_cg(params: Params, batch: Batch, g: Params, damping: jax.Array,
             chunk_size: int | None, iters: int, tol: float,
             precondition: bool) -> tuple[Params, Params]:
    """(d, G d): (preconditioned) conjugate gradients on (G + lam I) d = -g from d = 0::

        r = b = -g,  z = Minv r,  q = z                       Minv: identity or precondition
        repeat while k < iters and ||r|| > tol ||b||:
            a = (r.z) / (q.(G + lam I) q);  d += a q;  r -= a (G + lam I) q
            z' = Minv r;  q = z' + ((r.z') / (r.z)) q

    (a and the ratio taken as 0 where their denominators are 0: r = 0 or q = 0, solved). G d
    = b - r - lam d from the last residual.
    """
    b = jax.tree.map(jnp.negative, g)
    eig = curvature.preconditioner(params, batch, chunk_size) if precondition else None

    def minv(r: Params) -> Params:
        return r if eig is None else curvature.precondition(eig, r, damping)

    def operator(q: Params) -> Params:
        return axpy(damping, q, curvature.ggn_vp(params, batch, q, chunk_size))

    stop = (tol * tol) * dot(b, b)  # ||r||^2 <= tol^2 ||b||^2

    def running(carry: tuple[Any, ...]) -> jax.Array:
        k, _, r, _, _ = carry
        return (k < iters) & (dot(r, r) > stop)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        k, d, r, q, rz = carry
        Aq = operator(q)
        qAq = dot(q, Aq)
        a = jnp.where(qAq > 0, rz / jnp.where(qAq > 0, qAq, 1), 0)
        d, r = axpy(a, q, d), axpy(-a, Aq, r)
        z = minv(r)
        rz_new = dot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1), 0)
        return k + 1, d, r, axpy(beta, q, z), rz_new

    z = minv(b)
    zero = jax.tree.map(jnp.zeros_like, b)
    _, d, r, _, _ = lax.while_loop(running, body, (0, zero, b, z, dot(b, z)))
    Gd = jax.tree.map(lambda bb, rr, dd: bb - rr - damping * dd, b, r, d)
    return d, Gd


def nielsen(state: LMState, rho: jax.Array, accept: jax.Array) -> LMState:
    """The damping after an epoch (module docstring): accepted, lam max(1/3, 1 - (2 rho -
    1)^3) and nu = 2; rejected, lam nu and 2 nu; lam clipped to ``DAMPING_RANGE``."""
    lam, nu = state
    good = lam * jnp.maximum(SHRINK, 1 - (2 * rho - 1) ** 3)
    lo, hi = DAMPING_RANGE
    lam = jnp.clip(jnp.where(accept, good, lam * nu), min=lo, max=hi).astype(lam.dtype)
    return LMState(lam, jnp.where(accept, 2, 2 * nu).astype(nu.dtype))


@functools.cache
def lm_epoch(solver: str, iters: int, tol: float, precondition: bool,
             chunk_size: int | None) -> Any:
    """The epoch of ``levenberg_marquardt`` (one function per setting: one compilation)."""
    def epoch(params: Params, state: LMState, batch: Batch, key: Any,
              rows: int) -> tuple[jax.Array, Params, LMState]:
        del key, rows
        loss, g = backward.value_and_grad(params, batch, chunk_size)
        if solver == "direct":
            d, Gd = solve_direct(params, batch, g, state.damping, chunk_size)
        else:
            d, Gd = solve_cg(params, batch, g, state.damping, chunk_size, iters, tol,
                             precondition)
        pred = -(dot(g, d) + dot(d, Gd) / 2)  # L - m(d)
        trial = jax.tree.map(jnp.add, params, d)
        rho = (loss - batch_loss(trial, batch, chunk_size)) / pred
        accept = (pred > 0) & (rho > 0)  # False for NaN: a failed solve, an overflow
        params = jax.tree.map(lambda t, p: jnp.where(accept, t, p), trial, params)
        return loss, params, nielsen(state, rho, accept)

    return epoch


def lm_init(params: Params, hyper: dict[str, jax.Array]) -> LMState:
    """A member's state: its initial damping, and nu = 2."""
    dtype = params.A.dtype
    return LMState(jnp.asarray(hyper["damping"], dtype), jnp.asarray(2, dtype))


def levenberg_marquardt(damping: Any = 1e-3, *, solver: str = "direct",
                        cg_iters: int | None = None, cg_tol: float | None = None,
                        precondition: bool = False,
                        chunk_size: int | str | None = "auto") -> steps.Step:
    """Levenberg-Marquardt (module docstring): each epoch one damped Gauss-Newton step
    (G + lam I) d = -g, accepted or rejected by the ratio rho of the actual to the predicted
    reduction of the loss, lam adapted by Nielsen's rule.

    damping: the initial lam > 0, a number or an array (M,), one per member (``train_many``).
    solver: "direct" (G formed from its blocks, (P, P), and a Cholesky solve: small P) or
      "cg" (conjugate gradients on ``ggn_vp``: any P).
    cg_iters: with "cg", the most iterations per epoch (default 50).
    cg_tol: with "cg", stop once ||r|| <= cg_tol ||g|| (default 1e-6; 0: always cg_iters).
    precondition: with "cg", precondition by the block diagonal of G (``curvature.
      precondition``: exact for B and C, K-FAC's form for A).
    chunk_size: rows per step of the gradient's, G's and the loss's contractions (memory).

    Use it as ``train(params, X, step=levenberg_marquardt(), epochs=20)``.
    """
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be 'direct' (G formed, P x P: small models) or 'cg' "
                         f"(conjugate gradients on ggn_vp: any size), got {solver!r}")
    if not isinstance(precondition, bool):
        raise TypeError(f"precondition must be True or False, got "
                        f"{type(precondition).__name__} {precondition!r}")
    if solver == "direct":
        given = [n for n, v in (("cg_iters", cg_iters), ("cg_tol", cg_tol)) if v is not None]
        given += ["precondition"] if precondition else []
        if given:
            raise ValueError(f"{', '.join(given)} go with solver='cg' (the direct solve needs "
                             f"no iterations): pass solver='cg', or drop {', '.join(given)}")
    iters = edge.check_positive_int(CG_ITERS if cg_iters is None else cg_iters, "cg_iters")
    tol = CG_TOL if cg_tol is None else edge.check_finite_float(cg_tol, "cg_tol")
    if tol < 0:
        raise ValueError(f"cg_tol must be >= 0 (a relative residual; 0: run all cg_iters "
                         f"iterations), got {cg_tol!r}")
    chunk_size = edge.check_chunk_size(chunk_size)
    damping = arguments.per_member(damping, "damping", 0.0, strict=True)
    settings = {"optimizer": "levenberg_marquardt", "damping": arguments.jsonable(damping),
                "solver": solver}
    if solver == "cg":
        settings |= {"cg_iters": iters, "cg_tol": tol, "precondition": precondition}
    return steps.Step(lm_init, lm_epoch(solver, iters, tol, precondition, chunk_size),
                      hyper={"damping": damping}, settings=settings)
