"""The matmul precision policy: "highest" unless the caller chooses otherwise.

On a CPU every precision computes the same float32 products, so the policy is
checked where it is decided: in the lowered computation, whose dot products
carry the precision a GPU would honour. A public function is one ``jax.jit``
whether it is called eagerly or inside the caller's ``jax.jit``, so lowering it
under ``jax.jit`` shows what both run. On a GPU the TF32 error itself is checked
against what a 10-bit mantissa predicts.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import make_problem, max_rel_err, ref_batch_loss

import abc_jax
from abc_jax import edge

BATCH_FNS = {
    "batch_grad": abc_jax.batch_grad,
    "batch_grad_chunked": functools.partial(abc_jax.batch_grad, chunk_size=4),
    "batch_value_and_grad": abc_jax.batch_value_and_grad,
    "batch_loss": abc_jax.batch_loss,
    "oracle_grad": abc_jax.oracle_grad,
    "per_sample_grads": abc_jax.per_sample_grads,
    "fd_grad": abc_jax.fd_grad,
}
SAMPLE_FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "manual_grad": abc_jax.manual_grad,
}
# What jax.default_matmul_precision makes of each name, as HLO spells it.
HLO = {"highest": "HIGHEST", "float32": "HIGHEST", "high": "HIGH", "tensorfloat32": "HIGH",
       "default": "DEFAULT", "bfloat16": "DEFAULT"}


def _problem(name):
    params, X = make_problem(0, 5, 4, 3, 9, jnp.float32)
    return params, (X[0] if name in SAMPLE_FNS else X)


def _fn(name):
    return BATCH_FNS.get(name) or SAMPLE_FNS[name]


def _dot_precisions(text):
    """Every dot product's precision pair; asserts that each one states it."""
    dots = text.count("stablehlo.dot_general")
    found = re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)
    assert dots > 0, "no product in the computation"
    assert len(found) == dots, "a product without an explicit precision"
    return set(found)


def _traced(name, precision):
    """The HLO of the public function traced under the caller's jax.jit."""
    params, X = _problem(name)
    fn = functools.partial(_fn(name), precision=precision)
    return jax.jit(fn).lower(params, X).as_text()


ALL = list(BATCH_FNS) + list(SAMPLE_FNS)


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
    params, X = make_problem(0, 5, 4, 3, 9)
    for fn in (*BATCH_FNS.values(), *SAMPLE_FNS.values(), abc_jax.train):
        x = X[0] if fn in SAMPLE_FNS.values() else X
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
    params, X = make_problem(1, 5, 4, 3, 33, jnp.float32)
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
    params, X = make_problem(2, 256, 256, 256, 4096, jnp.float32)
    X64 = jnp.asarray(X, jnp.float64)
    want = jax.grad(ref_batch_loss)(jax.tree.map(lambda p: p.astype(jnp.float64), params), X64)
    exact = max_rel_err(abc_jax.batch_grad(params, X), want)
    fast = max_rel_err(abc_jax.batch_grad(params, X, precision="default"), want)
    assert exact <= 1e-5
    assert 2.0**-14 <= fast <= 2.0**-6, fast
