"""Curvature by hand: Gauss-Newton- and Hessian-vector products, and the Gauss-Newton blocks.

The objective is the weighted mean of the squared residuals over rows x_i (D,) with
targets t_i (O,) and weights r_i >= 0, rho = sum_i r_i::

    L = (1 / rho) sum_i r_i ||w_i - t_i||^2,   w_i = C (sigmoid(A x_i) + B x_i)

Its Hessian along a tangent V = (dA, dB, dC) is the derivative of the gradient along V.
Both products below are one forward pass that carries the tangent rows (forward mode,
``tangents``) and one backward pass that contracts them over the batch (reverse mode,
``backward``): one matrix product per parameter, never a P x P matrix (P = 2HD + OH).

Rows are feature-major as in ``backward.rows`` (column i is row i of the batch), R = diag(r);
the forward rows, and the tangent rows of V (forward mode's lines, dx = 0)::

    U  = sigmoid(A X^T)          (H, N)   u_i
    S  = U * (1 - U)             (H, N)   s_i = sigmoid'(y_i), from the saved u_i
    Z  = U + B X^T               (H, N)   z_i
    dY = dA X^T                  (H, N)   dy_i = dA x_i
    dZ = S * dY + dB X^T         (H, N)   dz_i = du_i + dv_i
    dW = dC Z + C dZ             (O, N)   dw_i = J_i V,  J_i = dw_i / d(A, B, C)

**Gauss-Newton.** G = (2 / rho) sum_i r_i J_i^T J_i, the Hessian with the curvature of the
network dropped (only that of the squared norm kept). G V = J^T (2 R dW) / rho is the
backward pass with the cotangent gw_i = 2 r_i dw_i in place of 2 r_i (w_i - t_i), one
line per backward line (``ggn_vp``)::

    GW = 2 dW R                  (O, N)   gw_i = 2 r_i dw_i
    gC = GW Z^T                  (O, H)   sum_i gw_i z_i^T
    GZ = C^T GW                  (H, N)   gz_i = C^T gw_i
    GY = GZ * S                  (H, N)   gy_i = gz_i * s_i
    gA = GY X,  gB = GZ X        (H, D)   sum_i gy_i x_i^T, sum_i gz_i x_i^T

each divided by rho. The targets do not appear: G does not depend on them.

**Hessian.** The tangent of every line of the backward pass, by the product rule: where a
line multiplies two things that both move along V, both terms stay (``hvp``)::

    E   = C Z - T^T              (O, N)   w_i - t_i
    GW  = 2 E R                  (O, N)   the gradient's cotangent, gw_i = 2 r_i (w_i - t_i)
    dGW = 2 dW R                 (O, N)   d(gw_i) = 2 r_i dw_i, the Gauss-Newton cotangent
    hC  = dGW Z^T + GW dZ^T      (O, H)   d(gw z^T) = d(gw) z^T + gw dz^T
    GZ  = C^T GW                 (H, N)   gz_i
    dGZ = C^T dGW + dC^T GW      (H, N)   d(C^T gw) = C^T d(gw) + dC^T gw
    dS  = (1 - 2U) * S * dY      (H, N)   d(u (1 - u)) = (1 - 2u) du, du = s dy
    dGY = dGZ * S + GZ * dS      (H, N)   d(gz * s) = d(gz) s + gz ds
    hA  = dGY X,  hB = dGZ X     (H, D)   d(gy x^T), d(gz x^T)  (x is data: dx = 0)

each divided by rho. What H V adds to G V is every term with GW in it: GW dZ^T (C's tangent
meets the tangent of z), dC^T GW (dC meets the cotangent, in hB and hA) and GZ * dS (the
sigmoid's second derivative, sigmoid'' = s (1 - 2u)). All of them vanish where the residuals
w_i - t_i do, so at a zero-residual fit H = G.

**The blocks of G.** Vectorise a matrix row-major, vec(M)[h D + d] = M[h, d] (``jnp.ravel``;
the order of ``jax.flatten_util.ravel_pytree``), so that (P ⊗ Q) vec(V) = vec(P V Q^T). From
the tangent lines, the columns of J_i for each parameter (s_i = u_i (1 - u_i))::

    dw_i = C dB x_i           J_i^B = C ⊗ x_i^T                 (O, HD)
    dw_i = dC z_i             J_i^C = I_O ⊗ z_i^T               (O, OH)
    dw_i = C (s_i * dA x_i)   J_i^A = C diag(s_i) ⊗ x_i^T       (O, HD)

and with (P ⊗ Q)^T (P' ⊗ Q') = P^T P' ⊗ Q^T Q', M = C^T C (H, H)::

    G_BB = M ⊗ XX,                       XX = (2 / rho) X^T R X     (D, D)
    G_CC = I_O ⊗ ZZ,                     ZZ = (2 / rho) Z R Z^T     (H, H)
    G_AA = (2 / rho) sum_i r_i (M ∘ s_i s_i^T) ⊗ x_i x_i^T                 (HD, HD)

(the factor 2 / rho on the data side). G_BB and G_CC are each ONE Kronecker product,
exactly; G_AA is a sum of N of them: s_i moves with the row, where C did not. K-FAC's
approximation takes the mean of each factor apart (the weights 2 r_i / rho sum to 2)::

    G_AA ~ (M ∘ SS) ⊗ XX,   SS = (1 / rho) S R S^T                          (H, H)

exact when s_i is the same for every row of non-zero weight (one row, say), and sharing
XX with G_BB. ``kfac_error`` measures how far it is from G_AA.

**The whole of G** (``ggn_matrix``, for a direct solve where P is small). Summing the
products of the columns above over o, with w_i = 2 r_i / rho, Phi (HD, N) the columns
s_i ⊗ x_i, W = diag(w), and the blocks indexed [hd, ke] (A, B) and [hd, oh'] (C)::

    G_AA[hd, ke]  = M_hk (Phi W Phi^T)[hd, ke]     sum_i w_i M_hk s_ih s_ik x_id x_ie
    G_AB[hd, ke]  = M_hk (Phi W X)[hd, e]          sum_i w_i M_hk s_ih x_id x_ie
    G_BB[hd, ke]  = M_hk (X^T W X)[d, e]           = M ⊗ XX
    G_AC[hd, oh'] = C_oh (Phi W Z^T)[hd, h']       sum_i w_i C_oh s_ih x_id z_ih'
    G_BC[hd, oh'] = C_oh (X^T W Z^T)[d, h']        sum_i w_i C_oh x_id z_ih'
    G_CC[oh, o'h'] = delta_oo' (Z W Z^T)[h, h']    = I_O ⊗ ZZ

and the lower blocks their transposes: five Gram matrices of the rows (Phi W Phi^T costs
N (HD)^2 multiply-adds, the others N K^3 or less at D = H = O = K), never an (O, P) J_i
(explicit J^T R J would cost N O P^2, and P products ``ggn_vp`` 10 N K^2 P).

**The damped inverse** of a Kronecker product through the eigendecompositions of its
factors, P = Q_P diag(p) Q_P^T and Q = Q_Q diag(q) Q_Q^T: P ⊗ Q + lam I = (Q_P ⊗ Q_Q)
(diag(p) ⊗ diag(q) + lam I) (Q_P ⊗ Q_Q)^T, so::

    (P ⊗ Q + lam I)^{-1} vec(V) = vec(Q_P [(Q_P^T V Q_Q) / (p q^T + lam)] Q_Q^T)
    (I_O ⊗ ZZ + lam I)^{-1} vec(V) = vec(V Q_Z diag(1 / (z + lam)) Q_Z^T)

(the division elementwise), O(H^3 + D^3) for the decompositions, once per point, and
O(H D (H + D)) per solve, for any lam: a Levenberg-Marquardt loop changes lam without
decomposing again. ``precondition`` applies these three to V: exact for the B and C blocks,
the inverse of K-FAC's form for the A block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from abc_jax.core.backward import chunked_sum, rows_per_chunk
from abc_jax.core.model import Batch, Params, sigmoid


def total_weight(batch: Batch) -> jax.Array:
    """rho = sum_i r_i (N for unit weights), in the rows' dtype."""
    X, r = batch.X, batch.weights
    return jnp.asarray(X.shape[0], X.dtype) if r is None else jnp.sum(r)


def weighted(G: jax.Array, r: jax.Array | None) -> jax.Array:
    """G R: column i of G (F, N) times r_i (G for unit weights)."""
    return G if r is None else G * r[None, :]


class TangentRows(NamedTuple):
    """The forward rows and the tangent rows of a batch along V, feature-major."""

    U: jax.Array  # (H, N)  u_i = sigmoid(A x_i)
    S: jax.Array  # (H, N)  s_i = u_i (1 - u_i)
    Z: jax.Array  # (H, N)  z_i = u_i + B x_i
    dY: jax.Array  # (H, N)  dy_i = dA x_i
    dZ: jax.Array  # (H, N)  dz_i = s_i * dy_i + dB x_i
    dW: jax.Array  # (O, N)  dw_i = dC z_i + C dz_i


def tangent_rows(params: Params, X: jax.Array, V: Params) -> TangentRows:
    """Forward mode over the rows X (N, D) along V = (dA, dB, dC) (dx = 0), all rows at once."""
    (A, B, C), (dA, dB, dC) = params, V
    Xt = X.T  # (D, N)
    U = sigmoid(A @ Xt)  # (H, N)  u = sigmoid(A x)
    S = U * (1 - U)  # (H, N)  sigmoid'(y) = u (1 - u)
    Z = U + B @ Xt  # (H, N)  z = u + B x
    dY = dA @ Xt  # (H, N)  dy = dA x
    dZ = S * dY + dB @ Xt  # (H, N)  dz = du + dv = s * dy + dB x
    dW = dC @ Z + C @ dZ  # (O, N)  dw = dC z + C dz
    return TangentRows(U, S, Z, dY, dZ, dW)


def ggn_vp_sum(params: Params, batch: Batch, V: Params) -> tuple[Params, jax.Array]:
    """(sum_i r_i J_i^T 2 J_i V, rho) over the rows of ``batch``: the module's Gauss-Newton
    lines before the division by rho."""
    rw = tangent_rows(params, batch.X, V)
    GW = weighted(2 * rw.dW, batch.weights)  # (O, N)  gw_i = 2 r_i dw_i
    GZ = params.C.T @ GW  # (H, N)  gz_i = C^T gw_i
    GY = GZ * rw.S  # (H, N)  gy_i = gz_i * s_i
    return Params(A=GY @ batch.X, B=GZ @ batch.X, C=GW @ rw.Z.T), total_weight(batch)


def ggn_vp(params: Params, batch: Batch, V: Params, chunk_size: int | None = None) -> Params:
    """G V, G = (2 / rho) sum_i r_i J_i^T J_i the Gauss-Newton matrix of the batch loss.

    Args:
        params: A (H, D), B (H, D), C (O, H).
        batch: X (N, D), weights (N,) or None, T (N, O) or None (G does not depend on T).
        V: a tangent ``Params`` of the params' shapes.
        chunk_size: rows per chunk, summed in one compiled loop (None: the whole batch).

    Returns:
        ``Params`` of the params' shapes: (GY X, GZ X, GW Z^T) / rho with the Gauss-Newton
        cotangent gw_i = 2 r_i dw_i (module docstring). About a forward pass, a tangent
        pass and a backward pass of the batch: 10 N K^2 multiply-adds at D = H = O = K.
    """
    gsum, weight = chunked_sum(lambda b: ggn_vp_sum(params, b, V), batch,
                               rows_per_chunk(chunk_size, params, batch))
    return jax.tree.map(lambda g: g / weight, gsum)


def hvp_sum(params: Params, batch: Batch, V: Params) -> tuple[Params, jax.Array]:
    """(sum_i r_i (d^2 L_i / dparams^2) V, rho): the module's Hessian lines before the
    division by rho."""
    C, dC = params.C, V.C
    X, r, T = batch
    rw = tangent_rows(params, X, V)
    W = C @ rw.Z  # (O, N)  w_i = C z_i
    E = W if T is None else W - T.T  # (O, N)  w_i - t_i
    GW = weighted(2 * E, r)  # (O, N)  gw_i = 2 r_i (w_i - t_i)
    dGW = weighted(2 * rw.dW, r)  # (O, N)  d(gw_i) = 2 r_i dw_i
    hC = dGW @ rw.Z.T + GW @ rw.dZ.T  # (O, H)  d(gw z^T) = d(gw) z^T + gw dz^T
    GZ = C.T @ GW  # (H, N)  gz_i = C^T gw_i
    dGZ = C.T @ dGW + dC.T @ GW  # (H, N)  d(C^T gw) = C^T d(gw) + dC^T gw
    dS = (1 - 2 * rw.U) * rw.S * rw.dY  # (H, N)  d(u (1 - u)) = (1 - 2u) s dy
    dGY = dGZ * rw.S + GZ * dS  # (H, N)  d(gz * s) = d(gz) s + gz ds
    return Params(A=dGY @ X, B=dGZ @ X, C=hC), total_weight(batch)


def hvp(params: Params, batch: Batch, V: Params, chunk_size: int | None = None) -> Params:
    """H V, H the Hessian of the batch loss w.r.t. (A, B, C), by hand.

    Args and returns as ``ggn_vp``. The Gauss-Newton product plus the terms that carry the
    residuals w_i - t_i (module docstring): the sigmoid's second derivative, dC^T gw and
    gw dz^T. Equal to ``ggn_vp`` where every residual is 0. About 14 N K^2 multiply-adds at
    D = H = O = K.
    """
    hsum, weight = chunked_sum(lambda b: hvp_sum(params, b, V), batch,
                               rows_per_chunk(chunk_size, params, batch))
    return jax.tree.map(lambda h: h / weight, hsum)


# --- the blocks of G --------------------------------------------------------------


class Factors(NamedTuple):
    """The Kronecker factors of the Gauss-Newton blocks (module docstring)."""

    M: jax.Array  # (H, H)  C^T C
    XX: jax.Array  # (D, D)  (2 / rho) X^T R X
    ZZ: jax.Array  # (H, H)  (2 / rho) Z R Z^T
    SS: jax.Array  # (H, H)  (1 / rho) S R S^T, s_i = u_i (1 - u_i): K-FAC's mean for A


def factor_sums(params: Params, batch: Batch) -> tuple[jax.Array, ...]:
    """(X^T R X, Z R Z^T, S R S^T, rho) over the rows of ``batch``."""
    A, B, _ = params
    X, r, _ = batch
    U = sigmoid(A @ X.T)  # (H, N)
    Z, S = U + B @ X.T, U * (1 - U)  # (H, N)
    Xr = X if r is None else X * r[:, None]  # (N, D)  r_i x_i
    return X.T @ Xr, weighted(Z, r) @ Z.T, weighted(S, r) @ S.T, total_weight(batch)


def kronecker_factors(params: Params, batch: Batch, chunk_size: int | None = None) -> Factors:
    """M = C^T C, XX = (2 / rho) X^T R X, ZZ = (2 / rho) Z R Z^T, SS = (1 / rho) S R S^T.

    G_BB = M ⊗ XX and G_CC = I_O ⊗ ZZ exactly; (M ∘ SS) ⊗ XX is K-FAC's G_AA. Three
    Gram matrices of the rows, ``chunk_size`` rows at a time (None: all at once).
    """
    XX, ZZ, SS, rho = chunked_sum(lambda b: factor_sums(params, b), batch,
                                  rows_per_chunk(chunk_size, params, batch))
    return Factors(M=params.C.T @ params.C, XX=2 * XX / rho, ZZ=2 * ZZ / rho, SS=SS / rho)


def ggn_blocks(params: Params, batch: Batch) -> Params:
    """The diagonal blocks of G as dense matrices, row-major vec: A, B (HD, HD), C (OH, OH).

    G_BB = M ⊗ XX and G_CC = I_O ⊗ ZZ from the factors; G_AA = (2 / rho) sum_i r_i
    (M ∘ s_i s_i^T) ⊗ x_i x_i^T, formed as (M ⊗ 1_{DxD}) ∘ (2 / rho) Phi R Phi^T with
    Phi (HD, N) the columns s_i ⊗ x_i: ((M ∘ s s^T) ⊗ x x^T)[hd, ke] = M_hk (s_h x_d)(s_k x_e).
    O((HD)^2 + HD N) memory: for small models (checks, measurements), not for training.
    """
    A, C = params.A, params.C
    X, r, _ = batch
    (H, D), O = A.shape, C.shape[0]
    f = kronecker_factors(params, batch)
    U = sigmoid(A @ X.T)  # (H, N)
    Phi = (U * (1 - U))[:, None, :] * X.T[None, :, :]  # (H, D, N)  s_ih x_id
    Phi = Phi.reshape(H * D, -1)  # (HD, N)  column i: s_i ⊗ x_i
    G_AA = jnp.kron(f.M, jnp.ones((D, D), A.dtype)) * (weighted(Phi, r) @ Phi.T)
    return Params(A=2 * G_AA / total_weight(batch), B=jnp.kron(f.M, f.XX),
                  C=jnp.kron(jnp.eye(O, dtype=C.dtype), f.ZZ))


def flatten(params: Params) -> jax.Array:
    """(P,) the params as one vector, A, B, C each row-major (``ravel_pytree``'s order)."""
    return jnp.concatenate([p.ravel() for p in params])


def unflatten(v: jax.Array, like: Params) -> Params:
    """``Params`` of ``like``'s shapes from a vector (P,) in ``flatten``'s order."""
    sizes = [p.size for p in like]
    parts = jnp.split(v, [sizes[0], sizes[0] + sizes[1]])
    return Params(*(a.reshape(p.shape) for a, p in zip(parts, like, strict=True)))


def gram_sums(params: Params, batch: Batch) -> tuple[jax.Array, ...]:
    """(Phi R Phi^T, Phi R X, Phi R Z^T, X^T R X, X^T R Z^T, Z R Z^T, rho) over the rows of
    ``batch``: the Gram matrices the blocks of G are made of (module docstring)."""
    A, B, _ = params
    X, r, _ = batch
    (H, D), N = A.shape, X.shape[0]
    U = sigmoid(A @ X.T)  # (H, N)  u_i
    Z, S = U + B @ X.T, U * (1 - U)  # (H, N)  z_i, s_i
    Phi = (S[:, None, :] * X.T[None, :, :]).reshape(H * D, N)  # (HD, N)  s_i ⊗ x_i
    Phr = weighted(Phi, r)  # (HD, N)  r_i (s_i ⊗ x_i)
    Xr = X if r is None else X * r[:, None]  # (N, D)  r_i x_i
    return (Phr @ Phi.T, Phr @ X, Phr @ Z.T, Xr.T @ X, Xr.T @ Z.T, weighted(Z, r) @ Z.T,
            total_weight(batch))


def ggn_matrix(params: Params, batch: Batch, chunk_size: int | None = None) -> jax.Array:
    """G = (2 / rho) sum_i r_i J_i^T J_i as a dense (P, P) matrix, in ``flatten``'s order.

    Assembled from its blocks (module docstring, "The whole of G"), the Gram matrices summed
    ``chunk_size`` rows at a time (None: all at once). O(P^2) memory: for small models
    (P = 2HD + OH up to a few thousand), where a direct solve with it is cheap.
    """
    (H, D), O = params.A.shape, params.C.shape[0]
    M, Ct = params.C.T @ params.C, params.C.T  # (H, H), (H, O)
    PP, PX, PZ, XX, XZ, ZZ, rho = chunked_sum(lambda b: gram_sums(params, b), batch,
                                              rows_per_chunk(chunk_size, params, batch))
    w = 2 / rho
    HD, OH = H * D, O * H
    AA = M[:, None, :, None] * (w * PP).reshape(H, D, H, D)
    AB = M[:, None, :, None] * (w * PX).reshape(H, D, 1, D)
    BB = M[:, None, :, None] * (w * XX)[None, :, None, :]
    AC = Ct[:, None, :, None] * (w * PZ).reshape(H, D, 1, H)
    BC = Ct[:, None, :, None] * (w * XZ)[None, :, None, :]
    CC = jnp.eye(O, dtype=M.dtype)[:, None, :, None] * (w * ZZ)[None, :, None, :]
    AA, AB, BB = (a.reshape(HD, HD) for a in (AA, AB, BB))
    AC, BC, CC = AC.reshape(HD, OH), BC.reshape(HD, OH), CC.reshape(OH, OH)
    return jnp.block([[AA, AB, AC], [AB.T, BB, BC], [AC.T, BC.T, CC]])


def kfac_block(f: Factors) -> jax.Array:
    """K-FAC's form of G_AA, (M ∘ SS) ⊗ XX (HD, HD), dense."""
    return jnp.kron(f.M * f.SS, f.XX)


def kfac_error(params: Params, batch: Batch) -> jax.Array:
    """||G_AA - (M ∘ SS) ⊗ XX||_F / ||G_AA||_F: how far K-FAC's single Kronecker product is
    from the exact A block (a scalar; 0 when every row of non-zero weight has the same s_i).
    Dense, O((HD)^2) memory, as ``ggn_blocks``."""
    exact = ggn_blocks(params, batch).A
    return jnp.linalg.norm(exact - kfac_block(kronecker_factors(params, batch))) / \
        jnp.linalg.norm(exact)


# --- the block preconditioner -------------------------------------------------------


class Eigh(NamedTuple):
    """A symmetric positive semi-definite matrix as Q diag(values) Q^T."""

    values: jax.Array  # (n,)  >= 0 (rounding's negative values set to 0)
    vectors: jax.Array  # (n, n)  orthonormal columns


class BlockEigh(NamedTuple):
    """The eigendecompositions the block preconditioner solves with (module docstring)."""

    MS: Eigh  # M ∘ SS  (H, H): the A block's first factor (K-FAC's form)
    M: Eigh  # M = C^T C  (H, H): the B block's first factor
    XX: Eigh  # (D, D): the second factor of the A and B blocks
    ZZ: Eigh  # (H, H): the C block, I_O ⊗ ZZ


def eigh(S: jax.Array) -> Eigh:
    """S = Q diag(values) Q^T for a symmetric PSD S, negative rounding clipped to 0."""
    values, vectors = jnp.linalg.eigh(S)
    return Eigh(jnp.maximum(values, 0), vectors)


def block_eigh(f: Factors) -> BlockEigh:
    """The four eigendecompositions, (H^3 + D^3) work: once per point, for every damping."""
    return BlockEigh(MS=eigh(f.M * f.SS), M=eigh(f.M), XX=eigh(f.XX), ZZ=eigh(f.ZZ))


def preconditioner(params: Params, batch: Batch, chunk_size: int | None = None) -> BlockEigh:
    """``block_eigh(kronecker_factors(params, batch, chunk_size))``: what ``precondition``
    needs at this point."""
    return block_eigh(kronecker_factors(params, batch, chunk_size))


def kron_solve(P: Eigh, Q: Eigh, V: jax.Array, damping: Any) -> jax.Array:
    """(P ⊗ Q + damping I)^{-1} vec(V) as a matrix like V (p, q), row-major vec."""
    Vt = P.vectors.T @ V @ Q.vectors  # (p, q)  (Q_P ⊗ Q_Q)^T vec(V)
    Vt = Vt / (P.values[:, None] * Q.values[None, :] + damping)  # the diagonal's inverse
    return P.vectors @ Vt @ Q.vectors.T  # (Q_P ⊗ Q_Q) back


def precondition(eig: BlockEigh, V: Params, damping: Any) -> Params:
    """(blocks + damping I)^{-1} V, block by block: ``Params`` of V's shapes.

    A: ((M ∘ SS) ⊗ XX + damping I)^{-1} vec(V.A) (K-FAC's form of G_AA);
    B: (M ⊗ XX + damping I)^{-1} vec(V.B) and C: (I_O ⊗ ZZ + damping I)^{-1} vec(V.C), the
    exact damped inverses of G_BB and G_CC. ``damping`` > 0 (a scalar, traced or not).
    No P x P matrix: two (H, H) or (D, D) products each side of an elementwise division.
    """
    ZZ = eig.ZZ
    C = ((V.C @ ZZ.vectors) / (ZZ.values[None, :] + damping)) @ ZZ.vectors.T  # V (ZZ + d)^-1
    return Params(A=kron_solve(eig.MS, eig.XX, V.A, damping),
                  B=kron_solve(eig.M, eig.XX, V.B, damping), C=C)
