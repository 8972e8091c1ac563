"""Curvature by hand against autodiff of the independent plain-jnp loss, and the Gauss-Newton
blocks against an explicit J^T J.

References: ``jax.jvp(jax.grad(ref_batch_loss))`` for the Hessian-vector product, jvp then
vjp of ``ref_outputs`` for the Gauss-Newton-vector product, ``jax.jacfwd(ref_outputs)`` for
the blocks, NumPy for the Kronecker factors and the damped solves. Float64, relative 1e-12,
D, H, O all different, weights with zero rows in the middle, targets, O > 1.
"""

import functools
import re

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    assert_rel_close,
    make_problem,
    max_rel_err,
    raises_before_compiling,
    ref_batch_loss,
    ref_outputs,
    ref_sigmoid,
)

import abc_jax
from abc_jax import Batch, Params
from abc_jax.core import curvature

D, H, O, N = 3, 5, 2, 9
CHUNK = 4  # 9 rows: two chunks of 4 and a last one of 1


def tangent_like(params, seed):
    rng = np.random.default_rng(seed)
    return Params(*(jnp.asarray(rng.standard_normal(p.shape), p.dtype) for p in params))


def weighted_batch(seed, D, H, O, N, zero_rows=(3, 5)):
    """Params, and a Batch with targets and weights in [0.5, 2] except 0 on ``zero_rows``."""
    params, X = make_problem(seed, D, H, O, N)
    rng = np.random.default_rng(seed + 100)
    r = rng.uniform(0.5, 2.0, N)
    r[list(zero_rows)] = 0.0
    return params, Batch(X, jnp.asarray(r), jnp.asarray(rng.standard_normal((N, O))))


@jax.jit
def ref_hvp(params, batch, V):
    """jax.jvp of jax.grad of the plain-jnp weighted loss: the derivative of the gradient."""
    grad = jax.grad(lambda p: ref_batch_loss(p, batch.X, batch.T, batch.weights))
    return jax.jvp(grad, (params,), (V,))[1]


@jax.jit
def ref_ggn_vp(params, batch, V):
    """J^T (2 R J V) / sum r: jax.jvp of the outputs, then jax.vjp of the outputs."""
    outputs = functools.partial(ref_outputs, X=batch.X)
    dW = jax.jvp(outputs, (params,), (V,))[1]  # (N, O)  J_i V
    r = batch.weights
    return jax.vjp(outputs, params)[1](2 * r[:, None] * dW / jnp.sum(r))[0]


PRODUCTS = {"ggn_vp": (abc_jax.ggn_vp, ref_ggn_vp), "hvp": (abc_jax.hvp, ref_hvp)}


@pytest.mark.smoke
@pytest.mark.parametrize("chunk_size", [None, CHUNK])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_curvature_products_match_autodiff(name, chunk_size):
    fn, ref = PRODUCTS[name]
    params, batch = weighted_batch(0, D, H, O, N)
    V = tangent_like(params, 1)
    got = fn(params, batch, V, chunk_size=chunk_size)
    assert all(g.dtype == jnp.float64 for g in got)
    assert_rel_close(got, ref(params, batch, V), 1e-12)


def test_the_residual_terms_are_what_the_hessian_adds():
    params, batch = weighted_batch(0, D, H, O, N)
    V = tangent_like(params, 1)
    ggn, hess = abc_jax.ggn_vp(params, batch, V), abc_jax.hvp(params, batch, V)
    # with residuals, each block of H V differs from G V (sigmoid'', dC^T gw, gw dz^T) ...
    assert min(max_rel_err(h, g) for h, g in zip(hess, ggn, strict=True)) > 0.05
    # ... G does not depend on the targets ...
    assert_rel_close(abc_jax.ggn_vp(params, batch._replace(T=None), V), ggn, 1e-12)
    # ... and at a zero-residual fit (targets = the outputs) H = G
    fitted = batch._replace(T=ref_outputs(params, batch.X))
    assert_rel_close(abc_jax.hvp(params, fitted, V), ggn, 1e-12)
    assert_rel_close(abc_jax.hvp(params, fitted, V), ref_hvp(params, fitted, V), 1e-12)


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_curvature_products_under_jit_and_vmap(name):
    fn, ref = PRODUCTS[name]
    params, batch = weighted_batch(2, D, H, O, N)
    V = tangent_like(params, 3)
    jitted = jax.jit(functools.partial(fn, chunk_size=CHUNK))
    assert_rel_close(jitted(params, batch, V), ref(params, batch, V), 1e-12)
    # three members, each its own params and tangent, one shared batch
    members = [weighted_batch(s, D, H, O, N)[0] for s in (4, 5, 6)]
    tangents = [tangent_like(params, s) for s in (7, 8, 9)]
    stack = functools.partial(jax.tree.map, lambda *a: jnp.stack(a))
    got = jax.vmap(fn, in_axes=(0, None, 0))(stack(*members), batch, stack(*tangents))
    for m, (p, v) in enumerate(zip(members, tangents, strict=True)):
        assert_rel_close(jax.tree.map(lambda a, m=m: a[m], got), ref(p, batch, v), 1e-12)


def dot_precisions(fn, precision, params, batch, V):
    """The (lhs, rhs) precision of every product in ``fn``'s HLO under a caller's jax.jit."""
    text = jax.jit(functools.partial(fn, chunk_size=CHUNK, precision=precision)).lower(
        params, batch, V).as_text()
    found = re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)
    assert len(found) == text.count("stablehlo.dot_general") > 0
    return set(found)


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_every_product_is_highest_unless_the_caller_chooses(name):
    params, batch = weighted_batch(0, D, H, O, N)
    params, batch = jax.tree.map(lambda a: a.astype(jnp.float32), (params, batch))
    V = tangent_like(params, 1)
    fn = PRODUCTS[name][0]
    with jax.default_matmul_precision("bfloat16"):
        assert dot_precisions(fn, None, params, batch, V) == {("HIGHEST", "HIGHEST")}
    assert dot_precisions(fn, "default", params, batch, V) == {("DEFAULT", "DEFAULT")}


# --- the blocks of G ------------------------------------------------------------------


def explicit_blocks(params, batch):
    """The diagonal blocks of (2 / sum r) sum_i r_i J_i^T J_i from jax.jacfwd of the outputs,
    row-major vec (the columns of J_i for A are dw_i / dA[h, d] at h D + d)."""
    J = jax.jacfwd(ref_outputs)(params, batch.X)  # A: (N, O, H, D), ...
    r = np.asarray(batch.weights)
    scale = 2 * r / r.sum()
    return Params(*(np.einsum("n,nop,noq->pq", scale, *(np.asarray(j).reshape(N_, O_, -1),) * 2)
                    for j in J for N_, O_ in [j.shape[:2]]))


def numpy_factors(params, batch):
    """M = C^T C, XX = (2 / sum r) X^T R X, ZZ = (2 / sum r) Z^T R Z, SS = S^T R S / sum r,
    rows as (N, .) NumPy arrays."""
    A, B, C = (np.asarray(p) for p in params)
    X, r = np.asarray(batch.X), np.asarray(batch.weights)
    U = np.asarray(ref_sigmoid(X @ A.T))  # (N, H)
    Z, S, rho = U + X @ B.T, U * (1 - U), r.sum()
    return C.T @ C, 2 * X.T @ (r[:, None] * X) / rho, 2 * Z.T @ (r[:, None] * Z) / rho, \
        S.T @ (r[:, None] * S) / rho


def test_the_gauss_newton_blocks_are_the_explicit_jtj():
    params, batch = weighted_batch(10, 3, 4, 2, 7, zero_rows=(2, 4))  # D=3, H=4, O=2, N=7
    ref = explicit_blocks(params, batch)
    M, XX, ZZ, SS = numpy_factors(params, batch)
    # the structure, in NumPy: B and C exactly one Kronecker product each
    np.testing.assert_allclose(ref.B, np.kron(M, XX), rtol=0, atol=1e-12 * np.abs(ref.B).max())
    np.testing.assert_allclose(ref.C, np.kron(np.eye(2), ZZ), rtol=0,
                               atol=1e-12 * np.abs(ref.C).max())
    # the package's blocks and factors
    assert_rel_close(curvature.ggn_blocks(params, batch), ref, 1e-12)
    f = curvature.kronecker_factors(params, batch, chunk_size=3)
    assert_rel_close(tuple(f), (M, XX, ZZ, SS), 1e-12)
    # K-FAC's single product for A is not the sum of five (4% off here, far above rounding),
    # and the error is reported
    kfac = np.kron(M * SS, XX)
    want = np.linalg.norm(ref.A - kfac) / np.linalg.norm(ref.A)
    assert want > 1e-2
    assert abs(float(curvature.kfac_error(params, batch)) - want) <= 1e-12 * want
    assert_rel_close(curvature.kfac_block(f), kfac, 1e-12)
    # with one row of non-zero weight the sum has one term: K-FAC is exact
    one = batch._replace(weights=jnp.zeros(7).at[4].set(1.5))
    assert float(curvature.kfac_error(params, one)) <= 1e-14


@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_the_whole_gauss_newton_matrix_is_the_explicit_jtj(chunk_size):
    """Every block, the off-diagonal ones too, in ``ravel_pytree``'s order."""
    params, batch = weighted_batch(0, D, H, O, N)
    J = jax.jacfwd(ref_outputs)(params, batch.X)
    J = np.concatenate([np.asarray(j).reshape(N, O, -1) for j in J], axis=2)  # (N, O, P)
    r = np.asarray(batch.weights)
    ref = 2 * np.einsum("n,nop,noq->pq", r, J, J) / r.sum()
    assert_rel_close(curvature.ggn_matrix(params, batch, chunk_size), ref, 1e-12)
    V = tangent_like(params, 1)
    flat = curvature.flatten(V)
    np.testing.assert_array_equal(flat, jax.flatten_util.ravel_pytree(V)[0])
    chex.assert_trees_all_equal(curvature.unflatten(flat, params), V)


@pytest.mark.parametrize("damping", [1.0, 0.05])
def test_the_preconditioner_inverts_the_damped_blocks(damping):
    params, batch = weighted_batch(10, 3, 4, 2, 7, zero_rows=(2, 4))
    ref = explicit_blocks(params, batch)
    M, XX, _, SS = numpy_factors(params, batch)
    V = tangent_like(params, 11)
    damped = Params(np.kron(M * SS, XX), ref.B, ref.C)  # A: K-FAC's form; B, C: exact
    GV = Params(*((g + damping * np.eye(len(g))) @ np.asarray(v).ravel()
                  for g, v in zip(damped, V, strict=True)))
    GV = Params(*(g.reshape(v.shape) for g, v in zip(GV, V, strict=True)))
    eig = curvature.preconditioner(params, batch, chunk_size=3)
    got = jax.jit(curvature.precondition)(eig, GV, jnp.asarray(damping))
    assert_rel_close(got, V, 1e-12)
    # for the exact A block it is only K-FAC's approximation
    exact_A = ((ref.A + damping * np.eye(12)) @ np.asarray(V.A).ravel()).reshape(4, 3)
    solved = curvature.precondition(eig, GV._replace(A=exact_A), damping).A
    assert max_rel_err(solved, V.A) > 1e-3


def test_bad_tangents_are_named():
    params, batch = weighted_batch(0, D, H, O, N)
    V = tangent_like(params, 1)
    for fn in (abc_jax.ggn_vp, abc_jax.hvp):
        narrow = Params(V.A[:, :2], V.B[:, :2], V.C)  # D = 2 where params have D = 3
        raises_before_compiling(lambda fn=fn, narrow=narrow: fn(params, batch, narrow),
                                ValueError, f"tangents.A must have the shape of params.A, "
                                            f"{(H, D)}, got {(H, 2)}")
    with pytest.raises(TypeError, match=r"tangents must be Params.*Params\(\*\*d\)"):
        abc_jax.hvp(params, batch, dict(V._asdict()))
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        abc_jax.ggn_vp(params, batch, V, chunk_size=0)
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"tangents\.C must be finite"):
        abc_jax.ggn_vp(params, batch, V._replace(C=V.C.at[1, 0].set(jnp.inf)))
