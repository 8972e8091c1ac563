"""The public array functions (``abc_jax.api``: the edge plus one ``jax.jit`` each) under JAX
transformations, dtypes, Optax and grad-of-grad, and their matmul precision policy.

jit equals no-jit, vmap equals a Python loop, a jitted step traces and
compiles once per shape, a ``Batch`` of row weights passes through jit, vmap
and grad, argument checks run inside a trace while value checks are left to
eager calls, float32 in gives float32 out with x64 on, an Optax step equals
the same step written by hand, and second derivatives through the custom_vjp
equal those of a plain-jnp loss.
"""

import functools
import os
import re
import subprocess
import sys

import _reference
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import compilations, max_rel_err, ref_batch_loss, ref_loss
from _reference import make_problem as ref_problem

import abc_jax
from abc_jax import Batch, edge

D, H, O = 5, 4, 3  # all different


def make_problem(seed, N, dtype=jnp.float64, shape=(D, H, O)):
    return _reference.make_problem(seed, *shape, N, dtype)


def batch_abc_loss(params, X):
    return jnp.mean(jax.vmap(abc_jax.abc_loss, in_axes=(None, 0))(params, X))


# ---------------------------------------------------------------- jit


def _vjp_at_x(params, x):
    return abc_jax.manual_vjp(params, abc_jax.forward(params, x)[1], 2.0)


BATCH_FNS = {
    **_reference.BATCH_FNS,
    "per_sample_grads": abc_jax.per_sample_grads,
    "grad_batch_abc_loss": jax.grad(batch_abc_loss, argnums=(0, 1)),
}
SAMPLE_FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "manual_grad": abc_jax.manual_grad,
    "manual_vjp": _vjp_at_x,
    "abc_loss": abc_jax.abc_loss,
    "grad_abc_loss": jax.grad(abc_jax.abc_loss, argnums=(0, 1)),
}


# jit and eager evaluate the same formulas; XLA may fuse (and so round) them differently.
# Finite differences divide a loss difference by 2 eps (eps ~ 6e-6 in float64), which
# magnifies a last-bit difference in L to ~1e-10 of the gradient.
JIT_VS_EAGER = {"fd_grad": 1e-9}


@pytest.mark.parametrize("name", list(SAMPLE_FNS))
def test_jit_equals_eager_sample(name):
    fn = SAMPLE_FNS[name]
    params, X = make_problem(1, N=1)
    eager = fn(params, X[0])
    jitted = jax.jit(fn)(params, X[0])
    chex.assert_tree_all_finite(eager)
    assert max_rel_err(jitted, eager) <= 1e-14


def test_jit_with_params_closed_over():
    # Params as constants of the traced function, X traced: still the same answer.
    params, X = make_problem(2, N=17)
    jitted = jax.jit(lambda X: abc_jax.batch_grad(params, X, chunk_size=2))(X)
    assert max_rel_err(jitted, abc_jax.batch_grad(params, X)) <= 1e-14


# ---------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", ["forward", "loss", "manual_grad", "abc_loss", "grad_abc_loss"])
def test_vmap_over_samples_equals_loop(name):
    fn = SAMPLE_FNS[name]
    params, X = make_problem(3, N=17)
    batched = jax.vmap(fn, in_axes=(None, 0))(params, X)
    looped = jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(params, x) for x in X])
    assert max_rel_err(batched, looped) <= 1e-14


def test_vmap_over_params_equals_loop():
    # Three parameter sets, one sample: the params themselves are batched tracers.
    stacked = jax.tree.map(lambda *ps: jnp.stack(ps), *[make_problem(s, N=1)[0] for s in range(3)])
    x = make_problem(9, N=1)[1][0]
    for fn in (abc_jax.manual_grad, abc_jax.abc_loss, jax.grad(abc_jax.abc_loss)):
        batched = jax.vmap(fn, in_axes=(0, None))(stacked, x)
        looped = [fn(jax.tree.map(lambda a, i=i: a[i], stacked), x) for i in range(3)]
        looped = jax.tree.map(lambda *xs: jnp.stack(xs), *looped)
        assert max_rel_err(batched, looped) <= 1e-14


def test_vmap_of_batch_grad_over_batches_equals_loop():
    params, X = make_problem(4, N=12)
    Xs = X.reshape(3, 4, D)
    batched = jax.vmap(abc_jax.batch_grad, in_axes=(None, 0))(params, Xs)
    looped = jax.tree.map(lambda *xs: jnp.stack(xs), *[abc_jax.batch_grad(params, b) for b in Xs])
    assert max_rel_err(batched, looped) <= 1e-14


# ---------------------------------------------------------------- tracing and compiling


@pytest.mark.smoke
def test_jitted_step_traces_once():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, X):
        g = abc_jax.batch_grad(params, X)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, g)

    params, X = make_problem(5, N=17)
    params = step(params, X)
    params = step(params, X + 1.0)  # new values, same shapes and dtypes
    params = step(params, np.asarray(X))  # a NumPy array of the same shape
    chex.assert_tree_all_finite(params)
    # A new shape is a new trace, which the counter refuses: the guard works.
    with pytest.raises(AssertionError, match="traced"):
        step(params, X[:4])


def test_jitted_abc_loss_step_traces_once():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, X):
        return jax.value_and_grad(batch_abc_loss)(params, X)

    params, X = make_problem(6, N=17)
    for i in range(3):
        loss, g = step(params, X * (i + 1))
        params = jax.tree.map(lambda p, g: p - 0.01 * g, params, g)
    chex.assert_tree_all_finite((loss, params))


EAGER_FNS = ["batch_grad", "batch_grad_chunked", "batch_value_and_grad", "batch_loss",
             "oracle_grad", "per_sample_grads"]


@pytest.mark.smoke
@pytest.mark.parametrize("name", EAGER_FNS)
def test_eager_call_does_not_recompile(name):
    # Every eager call is one jit; a shape no other test uses compiles once, then new
    # values (a NumPy array too) reuse that executable.
    fn = BATCH_FNS.get(name, abc_jax.batch_loss)
    params, X = make_problem(7, N=11, shape=(13, 2, 9))
    X2, w1, w2 = X * 2.0, jnp.ones(11), jnp.arange(11.0) + 1
    with compilations() as first:
        fn(params, X)
    assert len(first) == 1, first
    with compilations() as again:
        fn(params, X2)
        fn(params, np.asarray(X))
    assert again == []
    with compilations() as weighted:
        fn(params, Batch(X, w1))  # weights are data: a new signature, compiled once
        fn(params, Batch(X, w2))
    assert len(weighted) == 1, weighted


# ---------------------------------------------------------------- Batch under transformations


def _weighted(seed, N):
    params, X = make_problem(seed, N)
    w = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 2.0, N)).at[0].set(0.0)
    return params, X, w


def ref_weighted_loss(params, X, w):
    losses = jax.vmap(ref_loss, in_axes=(None, 0))(params, X)
    return jnp.sum(w * losses) / jnp.sum(w)


WEIGHTED_FNS = ["batch_loss", "batch_grad", "batch_grad_chunked", "batch_value_and_grad",
                "oracle_grad", "fd_grad"]


@pytest.mark.parametrize("name", WEIGHTED_FNS)
def test_batch_of_weights_under_jit_equals_eager_and_reference(name):
    fn = BATCH_FNS[name]
    params, X, w = _weighted(20, 17)
    eager = fn(params, Batch(X, w))
    assert max_rel_err(jax.jit(fn)(params, Batch(X, w)), eager) <= JIT_VS_EAGER.get(name, 1e-14)
    value, grad = ref_weighted_loss(params, X, w), jax.grad(ref_weighted_loss)(params, X, w)
    want = {"batch_loss": value, "batch_value_and_grad": (value, grad)}.get(name, grad)
    assert max_rel_err(eager, want) <= (1e-7 if name == "fd_grad" else 1e-12)


def test_vmap_over_batches_of_weights_equals_loop():
    params, X, w = _weighted(21, 12)
    Xs, ws = X.reshape(3, 4, D), w.reshape(3, 4) + 0.5
    for fn in (abc_jax.batch_loss, abc_jax.batch_grad, abc_jax.per_sample_grads):
        batched = jax.vmap(fn, in_axes=(None, 0))(params, Batch(Xs, ws))
        looped = [fn(params, Batch(x, r)) for x, r in zip(Xs, ws, strict=True)]
        assert max_rel_err(batched, jax.tree.map(lambda *a: jnp.stack(a), *looped)) <= 1e-14


def test_grad_through_a_batch_wrt_params_and_weights():
    params, X, w = _weighted(22, 17)
    got = jax.grad(abc_jax.batch_loss)(params, Batch(X, w))
    assert max_rel_err(got, abc_jax.batch_grad(params, Batch(X, w))) <= 1e-12
    dw = jax.grad(lambda r: abc_jax.batch_loss(params, Batch(X, r)))(w)
    assert max_rel_err(dw, jax.grad(ref_weighted_loss, argnums=2)(params, X, w)) <= 1e-12


def test_argument_checks_run_inside_a_trace():
    params, X = make_problem(23, N=17)

    @jax.jit
    def bad_shape(params, X):
        return abc_jax.batch_grad(params, X[:, :-1])

    with pytest.raises(ValueError, match="D = 5 columns"):
        bad_shape(params, X)
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\)"):
        jax.jit(abc_jax.batch_loss)(params, Batch(X, jnp.ones(4)))
    with pytest.raises(ValueError, match="x must be one sample"):
        jax.jit(abc_jax.manual_grad)(params, X)
    with pytest.raises(ValueError, match="chunk_size"):
        jax.jit(functools.partial(abc_jax.batch_grad, chunk_size=0))(params, X)


def test_value_checks_are_opt_in_and_left_to_eager_calls():
    # By default a NaN flows through as in any JAX function (the call does not wait for
    # the device); abc_jax.value_checks() names it; inside a trace values are unknown.
    params, X = make_problem(24, N=17)
    X = X.at[3, 1].set(jnp.nan)
    assert np.isnan(np.asarray(abc_jax.batch_grad(params, X).A)).any()
    with abc_jax.value_checks(), pytest.raises(ValueError, match=r"X\[3, 1\]"):
        abc_jax.batch_grad(params, X)
    with abc_jax.value_checks():
        assert np.isnan(np.asarray(jax.jit(abc_jax.batch_grad)(params, X).A)).any()
        with pytest.raises(ValueError, match="weights must be >= 0"):
            abc_jax.batch_loss(params, Batch(jnp.nan_to_num(X), -jnp.ones(17)))
        assert np.isfinite(jax.jit(abc_jax.batch_loss)(params, Batch(jnp.nan_to_num(X),
                                                                     -jnp.ones(17))))


@pytest.mark.integration
def test_the_environment_variable_turns_value_checks_on(tmp_path):
    code = ("import jax.numpy as jnp, abc_jax\n"
            "p = abc_jax.init_params(abc_jax_key := __import__('jax').random.key(0), 3)\n"
            "try:\n    abc_jax.batch_loss(p, jnp.full((2, 3), jnp.nan))\n"
            "except ValueError as e:\n    print('named:', e)\n")
    env = dict(os.environ, ABC_JAX_VALUE_CHECKS="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "named: X must be finite" in out


# ---------------------------------------------------------------- dtypes


def _x_variants(X32):
    X64_np = np.asarray(X32, np.float64)
    return {
        "float32": X32,
        "float64 numpy": X64_np,
        "float64 jax": jnp.asarray(X64_np),
        "int": np.asarray(np.round(X64_np), np.int32),
        "list": X64_np.tolist(),
    }


def _assert_dtype(tree, dtype):
    for leaf in jax.tree.leaves(tree):
        assert leaf.dtype == dtype, (leaf.dtype, dtype)


KINDS = ["float32", "float64 numpy", "float64 jax", "int", "list"]


@pytest.mark.parametrize(
    "kind,jit",
    [(k, False) for k in KINDS] + [(k, True) for k in ("float32", "float64 numpy", "int")],
)
def test_float32_params_give_float32_everywhere(kind, jit):
    params, X32 = make_problem(8, N=17, dtype=jnp.float32)
    X = _x_variants(X32)[kind]
    x = X[0]
    wrap = jax.jit if jit else (lambda f: f)
    if kind != "float32":  # the edge converts X alike for every function: two suffice
        outs = {"batch_grad": wrap(abc_jax.batch_grad)(params, X),
                "loss": wrap(abc_jax.loss)(params, x)}
    else:
        outs = {
            "batch_loss": wrap(abc_jax.batch_loss)(params, X),
            "batch_grad": wrap(abc_jax.batch_grad)(params, X),
            "batch_grad_chunked": wrap(functools.partial(abc_jax.batch_grad, chunk_size=3))(
                params, X),
            "per_sample_grads": wrap(abc_jax.per_sample_grads)(params, X),
            "oracle_grad": wrap(abc_jax.oracle_grad)(params, X),
            "fd_grad": wrap(abc_jax.fd_grad)(params, X),
            "forward": wrap(abc_jax.forward)(params, x),
            "loss": wrap(abc_jax.loss)(params, x),
            "manual_grad": wrap(abc_jax.manual_grad)(params, x),
            "abc_loss": wrap(abc_jax.abc_loss)(params, x),
            "grad_abc_loss": wrap(jax.grad(abc_jax.abc_loss))(params, x),
        }
    for name, out in outs.items():
        chex.assert_tree_all_finite(out)
        for leaf in jax.tree.leaves(out):
            assert leaf.dtype == jnp.float32, (name, leaf.dtype)


def test_float32_manual_vjp_sigmoid_init_params():
    params, X = make_problem(8, N=1, dtype=jnp.float32)
    _, res = abc_jax.forward(params, np.asarray(X[0], np.float64))
    _assert_dtype(res, jnp.float32)
    for g in (1.0, np.float64(2.0), jnp.asarray(2.0, jnp.float64)):
        _assert_dtype(abc_jax.manual_vjp(params, res, g), jnp.float32)
    _assert_dtype(abc_jax.sigmoid(jnp.zeros(3, jnp.float32)), jnp.float32)
    _assert_dtype(jax.grad(abc_jax.sigmoid)(jnp.float32(0.5)), jnp.float32)
    _assert_dtype(abc_jax.init_params(jax.random.key(0), 3), jnp.float32)
    _assert_dtype(abc_jax.init_params(jax.random.key(0), 3, dtype=jnp.float64), jnp.float64)
    # The x cotangent of a float32 sample is float32 as well.
    x32 = X[0]
    _assert_dtype(jax.grad(abc_jax.abc_loss, argnums=1)(params, x32), jnp.float32)


def test_float64_params_upcast_float32_data():
    params, X = make_problem(8, N=17)
    X32 = X.astype(jnp.float32)
    _assert_dtype(abc_jax.batch_grad(params, X32), jnp.float64)
    _assert_dtype(abc_jax.batch_loss(params, X32), jnp.float64)
    _assert_dtype(abc_jax.manual_grad(params, X32[0]), jnp.float64)
    _assert_dtype(abc_jax.abc_loss(params, X32[0]), jnp.float64)
    # Computed in float64 on the float32 values, not in float32.
    X_up = X32.astype(jnp.float64)
    assert max_rel_err(abc_jax.batch_grad(params, X32), abc_jax.batch_grad(params, X_up)) == 0


# ---------------------------------------------------------------- Optax


def test_optax_jitted_training_equals_manual_loop():
    chex.clear_trace_counter()
    params0, X = make_problem(12, N=17)
    lr = 0.05
    opt = optax.sgd(lr)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, X):
        loss, g = jax.value_and_grad(batch_abc_loss)(params, X)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = params0, opt.init(params0)
    ref = params0
    losses = []
    for _ in range(5):
        params, state, loss = step(params, state, X)
        losses.append(float(loss))
        ref = jax.tree.map(lambda p, g: p - lr * g, ref, jax.grad(ref_batch_loss)(ref, X))
    assert losses[-1] < losses[0]
    assert max_rel_err(params, ref) <= 1e-12


# ---------------------------------------------------------------- grad of grad


def test_hessian_wrt_x():
    params, X = make_problem(13, N=2)
    hess = jax.jit(jax.hessian(abc_jax.abc_loss, argnums=1))
    ref_hess = jax.jit(jax.hessian(ref_loss, argnums=1))
    for x in X:
        got, ref = hess(params, x), ref_hess(params, x)
        assert got.shape == (D, D)
        assert max_rel_err(got, ref) <= 1e-10


def test_hessian_wrt_params():
    params, X = make_problem(14, N=1)
    got = jax.jit(jax.hessian(abc_jax.abc_loss))(params, X[0])
    ref = jax.jit(jax.hessian(ref_loss))(params, X[0])
    assert got.A.A.shape == (H, D, H, D)
    assert got.C.A.shape == (O, H, H, D)
    assert max_rel_err(got, ref) <= 1e-10


def test_grad_of_gradient_norm():
    # Reverse over reverse: d/d(params, x) of ||dL/dparams||^2.
    params, X = make_problem(15, N=1)
    x = X[0]

    def grad_norm(loss_fn):
        def f(params, x):
            g = jax.grad(loss_fn)(params, x)
            return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g))

        return f

    got = jax.grad(grad_norm(abc_jax.abc_loss), argnums=(0, 1))(params, x)
    ref = jax.grad(grad_norm(ref_loss), argnums=(0, 1))(params, x)
    assert max_rel_err(got, ref) <= 1e-10


def test_hessian_vector_product_over_batch():
    # Forward over reverse on the batch loss built from the custom_vjp.
    params, X = make_problem(16, N=17)
    v = jax.tree.map(jnp.ones_like, params)

    def hvp(loss_fn):
        return jax.jvp(jax.grad(loss_fn), (params, X), (v, jnp.zeros_like(X)))[1]

    assert max_rel_err(hvp(batch_abc_loss), hvp(ref_batch_loss)) <= 1e-10


# ---------------------------------------------------------------- matmul precision
#
# "highest" unless the caller chooses otherwise. On a CPU every precision computes the same
# float32 products, so the policy is checked where it is decided: in the lowered computation,
# whose dot products carry the precision a GPU would honour. A public function is one
# jax.jit whether it is called eagerly or inside the caller's jax.jit, so lowering it under
# jax.jit shows what both run. On a GPU the TF32 error itself is checked against what a
# 10-bit mantissa predicts.

PRECISION_BATCH_FNS = {
    "batch_grad": abc_jax.batch_grad,
    "batch_grad_chunked": functools.partial(abc_jax.batch_grad, chunk_size=4),
    "batch_value_and_grad": abc_jax.batch_value_and_grad,
    "batch_loss": abc_jax.batch_loss,
    "oracle_grad": abc_jax.oracle_grad,
    "per_sample_grads": abc_jax.per_sample_grads,
    "fd_grad": abc_jax.fd_grad,
}
PRECISION_SAMPLE_FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "manual_grad": abc_jax.manual_grad,
}
# What jax.default_matmul_precision makes of each name, as HLO spells it.
HLO = {"highest": "HIGHEST", "float32": "HIGHEST", "high": "HIGH", "tensorfloat32": "HIGH",
       "default": "DEFAULT", "bfloat16": "DEFAULT"}


def _precision_problem(name):
    params, X = ref_problem(0, 5, 4, 3, 9, jnp.float32)
    return params, (X[0] if name in PRECISION_SAMPLE_FNS else X)


def _fn(name):
    return PRECISION_BATCH_FNS.get(name) or PRECISION_SAMPLE_FNS[name]


def _dot_precisions(text):
    """Every dot product's precision pair; asserts that each one states it."""
    dots = text.count("stablehlo.dot_general")
    found = re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)
    assert dots > 0, "no product in the computation"
    assert len(found) == dots, "a product without an explicit precision"
    return set(found)


def _traced(name, precision):
    """The HLO of the public function traced under the caller's jax.jit."""
    params, X = _precision_problem(name)
    fn = functools.partial(_fn(name), precision=precision)
    return jax.jit(fn).lower(params, X).as_text()


ALL = list(PRECISION_BATCH_FNS) + list(PRECISION_SAMPLE_FNS)


@pytest.mark.smoke
@pytest.mark.parametrize("name", ALL)
def test_every_product_is_highest_by_default_whatever_the_global_setting(name):
    with jax.default_matmul_precision("bfloat16"):
        traced = _traced(name, None)
    assert _dot_precisions(traced) == {("HIGHEST", "HIGHEST")}


@pytest.mark.parametrize("precision", edge.PRECISIONS)
def test_every_named_precision_reaches_every_product(precision):
    want = {(HLO[precision], HLO[precision])}
    assert _dot_precisions(_traced("batch_grad", precision)) == want


@pytest.mark.parametrize("name", ["oracle_grad", "per_sample_grads", "manual_grad"])
def test_a_faster_precision_is_the_callers_choice(name):
    # Autodiff's products (oracle_grad) and the vmapped ones follow the choice too.
    assert _dot_precisions(_traced(name, "default")) == {("DEFAULT", "DEFAULT")}
    assert _dot_precisions(_traced(name, "high")) == {("HIGH", "HIGH")}


def test_precision_is_validated_before_tracing():
    params, X = ref_problem(0, 5, 4, 3, 9)
    for fn in (*PRECISION_BATCH_FNS.values(), *PRECISION_SAMPLE_FNS.values(), abc_jax.train):
        x = X[0] if fn in PRECISION_SAMPLE_FNS.values() else X
        kwargs = dict(lr=0.1, epochs=1) if fn is abc_jax.train else {}
        with pytest.raises(ValueError, match="precision"):
            fn(params, x, precision="fast", **kwargs)
        with pytest.raises(TypeError, match="precision"):
            fn(params, x, precision=3, **kwargs)
        if fn is not abc_jax.train:  # inside a trace as well (train refuses to be traced)
            with pytest.raises(ValueError, match="precision"):
                jax.jit(functools.partial(fn, precision="fast")).lower(params, x)
    assert edge.check_precision(None) == "highest"


@pytest.mark.smoke
def test_precision_argument_does_not_change_results_on_the_cpu_or_at_highest():
    params, X = ref_problem(1, 5, 4, 3, 33, jnp.float32)
    want = jax.grad(ref_batch_loss)(params, X)  # the conftest pins "highest" globally
    assert max_rel_err(abc_jax.batch_grad(params, X), want) <= 1e-5
    assert max_rel_err(abc_jax.batch_grad(params, X, precision="highest"), want) <= 1e-5
    if jax.default_backend() == "cpu":
        for p in edge.PRECISIONS:
            np.testing.assert_array_equal(abc_jax.batch_loss(params, X, precision=p),
                                          abc_jax.batch_loss(params, X))


@pytest.mark.smoke
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="TF32 exists on NVIDIA GPUs only")
def test_tf32_error_is_what_a_10_bit_mantissa_predicts():
    # K = 256 sums enough products that TF32's rounding (unit roundoff 2^-11,
    # about 4.9e-4, on each input) shows; "highest" stays at float32's level.
    params, X = ref_problem(2, 256, 256, 256, 4096, jnp.float32)
    X64 = jnp.asarray(X, jnp.float64)
    want = jax.grad(ref_batch_loss)(jax.tree.map(lambda p: p.astype(jnp.float64), params), X64)
    exact = max_rel_err(abc_jax.batch_grad(params, X), want)
    fast = max_rel_err(abc_jax.batch_grad(params, X, precision="default"), want)
    assert exact <= 1e-5
    assert 2.0**-14 <= fast <= 2.0**-6, fast
