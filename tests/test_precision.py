"""The matmul precision policy: "highest" unless the caller chooses otherwise.

On a CPU every precision computes the same float32 products, so the policy is
checked where it is decided: in the lowered computation, whose dot products
carry the precision a GPU would honour. On a GPU the TF32 error itself is
checked against what a 10-bit mantissa predicts.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from _reference import make_problem, max_rel_err, ref_batch_loss

import abc_jax
from abc_jax import backward, model, oracles, validation

ENTRIES = {
    "batch_grad": (backward._batch_grad_entry, {}),
    "batch_grad_chunked": (backward._batch_grad_entry, {"chunk_size": 4}),
    "batch_loss": (model._batch_loss_entry, {}),
    "oracle_grad": (oracles._oracle_entry, {}),
    "per_sample_grads": (backward._per_sample_grads_entry, {}),
    "fd_grad": (oracles._fd_entry, {}),
}


def _dot_precisions(entry, params, X, **kwargs):
    text = entry.lower(params, X, **kwargs).as_text()
    found = re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)
    dots = text.count("stablehlo.dot_general")
    assert dots > 0 and len(found) <= dots
    return dots, found


@pytest.mark.smoke
@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_product_is_highest_by_default_whatever_the_global_setting(name):
    entry, kwargs = ENTRIES[name]
    params, X = make_problem(0, 5, 4, 3, 9, jnp.float32)
    with jax.default_matmul_precision("bfloat16"):
        dots, found = _dot_precisions(entry, params, X, **kwargs)
    assert len(found) == dots, "a product without an explicit precision"
    assert set(found) == {("HIGHEST", "HIGHEST")}


@pytest.mark.parametrize("precision,hlo", [("default", "DEFAULT"), ("high", "HIGH")])
def test_a_faster_precision_is_the_callers_choice(precision, hlo):
    entry, _ = ENTRIES["batch_grad"]
    params, X = make_problem(0, 5, 4, 3, 9, jnp.float32)
    dots, found = _dot_precisions(entry, params, X, precision=precision)
    assert len(found) == dots and set(found) == {(hlo, hlo)}


def test_precision_is_validated_before_tracing():
    params, X = make_problem(0, 5, 4, 3, 9)
    for fn in (abc_jax.batch_grad, abc_jax.batch_loss, abc_jax.oracle_grad,
               abc_jax.per_sample_grads):
        with pytest.raises(ValueError, match="precision"):
            fn(params, X, precision="fast")
        with pytest.raises(TypeError, match="precision"):
            fn(params, X, precision=3)
    assert validation.check_precision(None) == "highest"


@pytest.mark.smoke
def test_precision_argument_does_not_change_results_on_the_cpu_or_at_highest():
    params, X = make_problem(1, 5, 4, 3, 33, jnp.float32)
    want = jax.grad(ref_batch_loss)(params, X)  # the conftest pins "highest" globally
    assert max_rel_err(abc_jax.batch_grad(params, X), want) <= 1e-5
    assert max_rel_err(abc_jax.batch_grad(params, X, precision="highest"), want) <= 1e-5


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
