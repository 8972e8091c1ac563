"""Forward mode by hand against the independent plain-jnp loss, and its transpose.

The references are ``jax.jvp`` and ``jax.grad`` of ``_reference.ref_loss`` (its
own sigmoid and contractions). Tolerances as for the backward pass: relative
1e-12 in float64, 1e-5 in float32, on shapes with D, H, O all different.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import SHAPES, assert_rel_close, make_problem, ref_batch_loss, ref_loss
from jax.test_util import check_grads

import abc_jax
from abc_jax import Batch, Params
from abc_jax.core import tangents


def tangent_like(params, seed):
    rng = np.random.default_rng(seed)
    return Params(*(jnp.asarray(rng.standard_normal(p.shape), p.dtype) for p in params))


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.mark.smoke
@pytest.mark.parametrize("D,H,O", SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float64, 1e-12), (jnp.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_manual_jvp_matches_jax_jvp(D, H, O, dtype, tol):
    params, X = make_problem(0, D, H, O, N=1, dtype=dtype)
    t = tangent_like(params, 1)
    dx = jnp.asarray(np.random.default_rng(2).standard_normal(D), dtype)
    L, dL = abc_jax.manual_jvp(params, X[0], t, dx)
    ref_L, ref_dL = jax.jvp(ref_loss, (params, X[0]), (t, dx))
    assert L.dtype == dtype and dL.dtype == dtype
    assert rel(L, ref_L) <= tol and rel(dL, ref_dL) <= tol
    # no x tangent: the derivative along the parameters alone
    _, dL_params = abc_jax.manual_jvp(params, X[0], t)
    _, ref_params = jax.jvp(ref_loss, (params, X[0]), (t, jnp.zeros_like(dx)))
    assert rel(dL_params, ref_params) <= tol


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_batch_jvp_is_the_weighted_mean_of_the_sample_jvps(D, H, O):
    params, X = make_problem(1, D, H, O, N=9)
    t = tangent_like(params, 3)
    L, dL = abc_jax.batch_jvp(params, X, t)
    ref_L, ref_dL = jax.jvp(lambda p: ref_batch_loss(p, X), (params,), (t,))
    assert rel(L, ref_L) <= 1e-12 and rel(dL, ref_dL) <= 1e-12
    r = jnp.asarray(np.random.default_rng(4).uniform(0, 2, 9)).at[3].set(0.0)
    L, dL = abc_jax.batch_jvp(params, Batch(X, r), t)
    per = jax.vmap(lambda x: jax.jvp(ref_loss, (params, x), (t, jnp.zeros_like(x))))(X)
    assert rel(L, r @ per[0] / r.sum()) <= 1e-12 and rel(dL, r @ per[1] / r.sum()) <= 1e-12


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_the_gradient_from_p_jvps_equals_the_gradient(D, H, O):
    params, X = make_problem(2, D, H, O, N=6)
    assert_rel_close(abc_jax.jvp_grad(params, X), jax.grad(ref_batch_loss)(params, X), 1e-12)


@pytest.mark.parametrize("D,H,O", SHAPES)
def test_the_transposed_manual_jvp_is_the_manual_vjp(D, H, O):
    # dL is linear in the tangent; its transpose, applied to the cotangent g, is the
    # backward pass: the two hand-derived rules are one derivative read both ways
    params, X = make_problem(3, D, H, O, N=1)
    x = X[0]
    _, res = abc_jax.forward(params, x)
    g = 0.7

    def tangent_map(t):
        return tangents.jvp(params, x, t, jnp.zeros_like(x))[1]

    (transposed,) = jax.linear_transpose(tangent_map, params)(jnp.asarray(g))
    assert_rel_close(transposed, abc_jax.manual_vjp(params, res, g), 1e-12)


# Second order (each a dozen compilations) at one shape, first order at the other; with a
# target (test_forward_mode_with_a_target) the other way round.
@pytest.mark.parametrize("D,H,O,order", [
    pytest.param(*SHAPES[0], 1, marks=pytest.mark.integration), (*SHAPES[1], 2)])
def test_abc_loss_jvp_in_both_modes_to_second_order(D, H, O, order):
    params, X = make_problem(4, D, H, O, N=1)
    x = X[0]
    # eps below check_grads' 1e-4: its central differences of the second order then err
    # by O(eps^2) times the third derivative, ~1e-9 instead of ~3e-5 at (3, 7, 2)
    check_grads(abc_jax.abc_loss_jvp, (params, x), order=order, modes=["fwd", "rev"], eps=1e-5)
    assert_rel_close(jax.grad(abc_jax.abc_loss_jvp)(params, x), jax.grad(ref_loss)(params, x),
                     1e-12)
    hessian = jax.hessian(abc_jax.abc_loss_jvp, argnums=1)(params, x)  # (D, D)
    assert_rel_close(hessian, jax.hessian(ref_loss, argnums=1)(params, x), 1e-12)
    L, lin = jax.linearize(abc_jax.abc_loss_jvp, params, x)
    assert rel(L, ref_loss(params, x)) <= 1e-12
    t = tangent_like(params, 5)
    dx = jnp.ones_like(x)
    assert rel(lin(t, dx), jax.jvp(ref_loss, (params, x), (t, dx))[1]) <= 1e-12
    assert rel(abc_jax.abc_loss_jvp(params, x), ref_loss(params, x)) <= 1e-12


def test_forward_mode_through_abc_loss_points_to_its_twin():
    params, X = make_problem(5, 4, 3, 2, N=1)
    x = X[0]
    with pytest.raises(TypeError, match="use abc_loss_jvp"):
        jax.jacfwd(abc_jax.abc_loss)(params, x)
    with pytest.raises(TypeError, match="use abc_loss_jvp"):
        jax.jvp(abc_jax.abc_loss, (params, x), (params, x))


def test_bad_tangents_are_named():
    params, X = make_problem(6, 4, 3, 2, N=3)
    t = tangent_like(params, 0)
    with pytest.raises(ValueError, match=r"tangents\.C must be \(O, H\) with H = 3"):
        abc_jax.batch_jvp(params, X, t._replace(C=t.C.T))
    with pytest.raises(ValueError, match=r"tangents\.A must have the shape of params\.A"):
        abc_jax.batch_jvp(params, X, Params(t.A[:, :2], t.B[:, :2], t.C))
    with pytest.raises(TypeError, match=r"tangents must be Params.*Params\(\*\*d\)"):
        abc_jax.manual_jvp(params, X[0], dict(t._asdict()))
    with pytest.raises(ValueError, match="x_tangent"):
        abc_jax.manual_jvp(params, X[0], t, jnp.ones(5))
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"X\[1, 2\]"):
        abc_jax.batch_jvp(params, X.at[1, 2].set(jnp.nan), t)


@pytest.mark.parametrize("D,H,O", [SHAPES[0], pytest.param(*SHAPES[1],
                                                              marks=pytest.mark.integration)])
@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float64, 1e-12), (jnp.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_forward_mode_with_a_target(D, H, O, dtype, tol):
    params, X = make_problem(7, D, H, O, N=1, dtype=dtype)
    x, rng = X[0], np.random.default_rng(8)
    t, dt = (jnp.asarray(rng.standard_normal(O), dtype) for _ in range(2))
    dp, dx = tangent_like(params, 9), jnp.asarray(rng.standard_normal(D), dtype)
    L, dL = abc_jax.manual_jvp(params, x, dp, dx, t=t, t_tangent=dt)
    ref_L, ref_dL = jax.jvp(ref_loss, (params, x, t), (dp, dx, dt))
    assert rel(L, ref_L) <= tol and rel(dL, ref_dL) <= tol
    _, dL_fixed_t = abc_jax.manual_jvp(params, x, dp, dx, t=t)  # t as data: dt = 0
    assert rel(dL_fixed_t, jax.jvp(ref_loss, (params, x, t), (dp, dx, 0 * dt))[1]) <= tol
    if dtype == jnp.float64:  # the custom JVP: both modes, second order, through t too
        order = 2 if (D, H, O) == SHAPES[0] else 1
        check_grads(abc_jax.abc_loss_jvp, (params, x, t), order=order, modes=["fwd", "rev"],
                    eps=1e-5)
        got = jax.jacfwd(abc_jax.abc_loss_jvp, argnums=2)(params, x, t)
        np.testing.assert_allclose(got, jax.grad(ref_loss, argnums=2)(params, x, t), rtol=tol)
        assert_rel_close(jax.grad(abc_jax.abc_loss_jvp)(params, x, t),
                         jax.grad(ref_loss)(params, x, t), tol)


def test_bad_targets_in_forward_mode_are_named():
    params, X = make_problem(6, 4, 3, 2, N=1)
    dp = tangent_like(params, 0)
    with pytest.raises(ValueError, match="t_tangent needs t"):
        abc_jax.manual_jvp(params, X[0], dp, t_tangent=jnp.ones(2))
    with pytest.raises(ValueError, match=r"t_tangent must have O = 2 entries"):
        abc_jax.manual_jvp(params, X[0], dp, t=jnp.ones(2), t_tangent=jnp.ones(3))
    with pytest.raises(ValueError, match=r"t must have O = 2 entries"):
        abc_jax.abc_loss_jvp(params, X[0], jnp.ones(4))
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"tangents\.B must be finite"):
        abc_jax.manual_jvp(params, X[0], dp._replace(B=dp.B.at[0, 0].set(jnp.nan)))
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"t_tangent must be finite"):
        abc_jax.manual_jvp(params, X[0], dp, t=jnp.ones(2), t_tangent=jnp.array([0, jnp.inf]))
