"""Levenberg-Marquardt (``levenberg_marquardt``) against a plain reference: G from an explicit
``jax.jacfwd`` J, the step solved by NumPy, the damping by Nielsen's rule written out; CG equals
the direct solve; a member of ``train_many`` is its own ``train`` (held-out data, patience); a
resumed run is bit for bit; bad arguments are named before anything compiles.

Float64, D, H, O = 3, 5, 2 (all different), row weights in [0.5, 2] with two zero rows in the
middle, targets.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    assert_rel_close,
    assert_resumes_bit_for_bit,
    make_problem,
    raises_before_compiling,
    ref_batch_loss,
    ref_outputs,
)

import abc_jax
from abc_jax import Batch, Params, levenberg_marquardt

D, H, O, N = 3, 5, 2, 9
KW = dict(progress=False, epochs_per_chunk=3)


def problem(seed=0, gain=1.0):
    """Params (A scaled by ``gain``), a Batch with targets and weights, rows 3 and 5 weigh 0."""
    params, X = make_problem(seed, D, H, O, N)
    rng = np.random.default_rng(seed + 100)
    r = rng.uniform(0.5, 2.0, N)
    r[[3, 5]] = 0.0
    return (params._replace(A=gain * params.A),
            Batch(X, jnp.asarray(r), jnp.asarray(rng.standard_normal((N, O)))))


def flat(params):
    return np.concatenate([np.asarray(a).ravel() for a in params])


def unflat(v, like):
    cut = np.cumsum([a.size for a in like])[:-1]
    return Params(*(jnp.asarray(a.reshape(p.shape)) for a, p in
                    zip(np.split(v, cut), like, strict=True)))


@functools.cache
def jacobian_fn():
    return jax.jit(jax.jacfwd(ref_outputs))


def ref_gauss_newton(params, batch):
    """(G, g) from the explicit Jacobian of the plain-jnp outputs: G = (2 / sum r) J^T R J,
    g = (2 / sum r) J^T R (W - T), J (N, O, P) by ``jax.jacfwd``."""
    J = jacobian_fn()(params, batch.X)
    J = np.concatenate([np.asarray(j).reshape(N, O, -1) for j in J], axis=2)  # (N, O, P)
    r = np.asarray(batch.weights)
    E = np.asarray(ref_outputs(params, batch.X)) - np.asarray(batch.T)  # (N, O)
    G = 2 * np.einsum("n,nop,noq->pq", r, J, J) / r.sum()
    g = 2 * np.einsum("n,no,nop->p", r, E, J) / r.sum()
    return G, g


def ref_step(params, batch, lam):
    """(p + d, rho) with d = -(G + lam I)^{-1} g solved by NumPy and rho = (L(p) - L(p + d))
    / -(g^T d + d^T G d / 2), the losses from the plain-jnp reference."""
    G, g = ref_gauss_newton(params, batch)
    d = np.linalg.solve(G + lam * np.eye(len(g)), -g)
    trial = unflat(flat(params) + d, params)
    loss = functools.partial(ref_batch_loss, X=batch.X, T=batch.T, r=batch.weights)
    return trial, (loss(params) - loss(trial)) / -(g @ d + d @ G @ d / 2)


def nielsen(lam, nu, rho):
    """Nielsen's rule, as documented: accepted (rho > 0) or rejected."""
    if rho > 0:
        return lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
    return lam * nu, 2 * nu


def one_epoch(step, params, state, batch):
    return jax.jit(step.epoch, static_argnums=4)(params, state, batch, None, 0)


@pytest.mark.smoke
def test_one_step_equals_the_reference_and_the_damping_follows_nielsen():
    """gain 3, lam = 0.1: accepted with rho = 0.42, where max(1/3, 1 - (2 rho - 1)^3) = 1.003,
    so a rule that ignored rho (or took 1/3) would differ."""
    params, batch = problem(0, gain=3.0)
    lam = 0.1
    want, rho = ref_step(params, batch, lam)
    assert 0.2 < rho < 0.6
    out = abc_jax.train(params, batch, step=levenberg_marquardt(lam), epochs=1, **KW)
    assert_rel_close(out.params, want, 1e-12)
    np.testing.assert_allclose(out.losses, [ref_batch_loss(params, batch.X, batch.T,
                                                           batch.weights)], rtol=1e-12)
    step = levenberg_marquardt(lam)
    loss, p, state = one_epoch(step, params, step.init(params, step.hyper), batch)
    assert loss == out.losses[0]
    assert_rel_close(p, want, 1e-12)
    np.testing.assert_allclose([state.damping, state.nu], nielsen(lam, 2.0, rho), rtol=1e-10)


def test_a_rejected_step_keeps_the_params_and_raises_the_damping():
    """lam = 1e-3 from a random start: the Gauss-Newton step overshoots (rho < 0) until lam
    has grown (1e-3 -> 2e-3 -> 8e-3 -> 6.4e-2 -> ..., nu 2 -> 4 -> 8 -> 16), the params
    stay; then a step is accepted and nu is 2 again."""
    params, batch = problem(0)
    step = levenberg_marquardt(1e-3)
    state, lam, nu, rejected = step.init(params, step.hyper), 1e-3, 2.0, 0
    for _ in range(8):
        want, rho = ref_step(params, batch, lam)
        loss, p, state = one_epoch(step, params, state, batch)
        np.testing.assert_allclose(loss, ref_batch_loss(params, batch.X, batch.T,
                                                        batch.weights), rtol=1e-12)
        lam, nu = nielsen(lam, nu, rho)
        np.testing.assert_allclose([state.damping, state.nu], [lam, nu], rtol=1e-10)
        if rho > 0:
            assert_rel_close(p, want, 1e-10)
            break
        chex.assert_trees_all_equal(p, params)
        rejected += 1
    assert rejected == 3 and rho > 0 and state.nu == 2.0  # then accepted


@pytest.mark.parametrize("precondition", [False, True])
def test_conjugate_gradients_equal_the_direct_solve(precondition):
    """cg_tol = 0 and 3P iterations: CG has converged (and runs on past it, 0/0 guarded)."""
    params, batch = problem(0, gain=3.0)
    direct = levenberg_marquardt(0.1)
    cg = levenberg_marquardt(0.1, solver="cg", cg_iters=3 * 40, cg_tol=0.0,
                             precondition=precondition)
    state = direct.init(params, direct.hyper)
    (l1, p1, s1), (l2, p2, s2) = (one_epoch(s, params, state, batch) for s in (direct, cg))
    assert_rel_close(p2, p1, 1e-8)
    np.testing.assert_allclose(s2.damping, s1.damping, rtol=1e-8)
    assert l1 == l2


@pytest.mark.parametrize("kw, tol", [({}, 1e-12), ({"solver": "cg", "precondition": True},
                                                  1e-10)])
def test_chunked_rows_give_the_same_step(kw, tol):
    """chunk_size 4 over 9 rows (two chunks and a remainder of 1, a zero-weight row in each
    of the first two) for the gradient, G or the products, the preconditioner and the loss;
    CG's iterations carry the sums' rounding on (1e-10)."""
    params, batch = problem(0, gain=3.0)
    whole, chunked = levenberg_marquardt(0.1, **kw), levenberg_marquardt(0.1, chunk_size=4, **kw)
    state = whole.init(params, whole.hyper)
    (l1, p1, s1), (l2, p2, s2) = (one_epoch(s, params, state, batch) for s in (whole, chunked))
    assert_rel_close(p2, p1, tol)
    np.testing.assert_allclose([l2, s2.damping], [l1, s1.damping], rtol=tol)


def test_float32_runs_in_float32():
    params, batch = problem(0, gain=3.0)
    params, batch = jax.tree.map(lambda a: a.astype(jnp.float32), (params, batch))
    out = abc_jax.train(params, batch, step=levenberg_marquardt(0.1, solver="cg"), epochs=3,
                        **KW)
    assert all(p.dtype == jnp.float32 for p in out.params) and out.losses.dtype == jnp.float32
    assert out.losses[-1] < out.losses[0]


def test_few_preconditioned_iterations_beat_plain_ones():
    """The block preconditioner is exact for B and C: after 3 iterations its step is closer
    to the direct one than plain CG's (measured against the NumPy solve)."""
    params, batch = problem(0, gain=3.0)
    want = ref_step(params, batch, 0.1)[0]
    errs = []
    for precondition in (False, True):
        step = levenberg_marquardt(0.1, solver="cg", cg_iters=3, cg_tol=0.0,
                                   precondition=precondition)
        p = one_epoch(step, params, step.init(params, step.hyper), batch)[1]
        errs.append(np.linalg.norm(flat(p) - flat(want)))
    assert errs[1] < errs[0] / 2, errs


def test_train_many_member_is_its_own_train_with_held_out_data_and_patience():
    """Held out: the training rows weighted otherwise. Member 0 (lam = 1e-3) has two steps
    rejected, so patience 2 stops it at epoch 2; the others run all 8 epochs."""
    params, batch = problem(0, gain=3.0)
    held = batch._replace(weights=batch.weights[::-1] + 0.1)
    lams = [1e-3, 0.1, 10.0]
    kw = dict(epochs=8, eval_data=held, patience=2, **KW)
    many = abc_jax.train_many(params, batch, step=levenberg_marquardt(jnp.array(lams)), **kw)
    assert many.losses.shape == (3, 8)
    for m, lam in enumerate(lams):
        alone = abc_jax.train(params, batch, step=levenberg_marquardt(lam), **kw)
        E = len(alone.losses)
        np.testing.assert_allclose(many.losses[m, :E], alone.losses, rtol=1e-12)
        assert_rel_close(jax.tree.map(lambda a, m=m: a[m], many.params), alone.params, 1e-12)
        np.testing.assert_allclose(many.eval_losses[m][~np.isnan(many.eval_losses[m])],
                                   alone.eval_losses, rtol=1e-12)
        assert int(many.best_epoch[m]) == alone.best_epoch
    np.testing.assert_array_equal(many.stopped_at, [2, -1, -1])


def test_resumed_run_is_bit_for_bit(tmp_path):
    params, batch = problem(0, gain=3.0)
    kw = dict(step=levenberg_marquardt(0.1), checkpoint_every=3, patience=2, **KW,
              eval_data=batch._replace(weights=batch.weights[::-1] + 0.1))
    assert_resumes_bit_for_bit(lambda epochs, path: abc_jax.train(
        params, batch, epochs=epochs, checkpoint_dir=path, **kw), tmp_path, 8, 3)
    with pytest.raises(ValueError, match="damping"):  # another run's checkpoint is refused
        abc_jax.train(params, batch, epochs=8, checkpoint_dir=tmp_path,
                      **kw | dict(step=levenberg_marquardt(1e-2)))


@pytest.mark.parametrize("kw, error, message", [
    (dict(solver="newton"), ValueError, ("solver", "'direct'", "'cg'")),
    (dict(damping=0.0), ValueError, ("damping", "> 0")),
    (dict(damping=[1e-3, -1.0]), ValueError, ("damping", "> 0")),
    (dict(damping="1e-3"), TypeError, ("damping", "a number or an array (M,)")),
    (dict(cg_iters=10), ValueError, ("cg_iters", "solver='cg'")),
    (dict(precondition=True), ValueError, ("precondition", "solver='cg'")),
    (dict(solver="cg", precondition="yes"), TypeError, ("precondition", "True or False")),
    (dict(solver="cg", cg_iters=0), ValueError, ("cg_iters", ">= 1")),
    (dict(solver="cg", cg_tol=-1.0), ValueError, ("cg_tol", ">= 0")),
    (dict(chunk_size=0), ValueError, ("chunk_size", ">= 1")),
])
def test_bad_arguments_are_named_before_compiling(kw, error, message):
    raises_before_compiling(lambda: levenberg_marquardt(**kw), error, message)


def test_the_step_carries_its_method():
    params, batch = problem()
    key = jax.random.key(0)
    raises_before_compiling(
        lambda: abc_jax.train(params, batch, step=levenberg_marquardt(), lr=0.1, epochs=1),
        ValueError, ("step and lr contradict",))
    raises_before_compiling(
        lambda: abc_jax.train(params, batch, step=levenberg_marquardt(), epochs=1, key=key),
        ValueError, ("key", "draws nothing"))
    raises_before_compiling(
        lambda: abc_jax.train_many(params, batch, step=levenberg_marquardt([0.1, 1.0]),
                                   epochs=1, members=3), ValueError, ("damping",))
