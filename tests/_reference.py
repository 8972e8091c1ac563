"""What the tests share: an independent plain-jnp loss, problems, errors, compile monitors.

The reference loss has its own sigmoid, 0.5 (1 + tanh(y / 2)) (finite with a
finite derivative for any y), and its own contractions, so a bug shared by the
package's forward pass and its ``oracle_grad`` cannot hide. Errors are
relative per parameter: max |got - ref| / max |ref|.
"""

import contextlib
import functools
import os
import re
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import Params

# (D, H, O) the gradient tests share, all different (a transposed gradient has the wrong
# shape): H < D in the first, H > D in the second. Every test that needs no shape of its own
# uses these, so each function compiles at few shapes.
SHAPES = [(5, 4, 3), (3, 7, 2)]
F64_TOL, F32_TOL, FD_TOL = 1e-12, 1e-5, 1e-7

# The public batch functions (params, X) the transformation tests run: test_api under jit,
# vmap and weights; multidevice_checks on a sharded batch. Each adds its own.
BATCH_FNS = {
    "batch_loss": abc_jax.batch_loss,
    "batch_grad": abc_jax.batch_grad,
    "batch_grad_chunked": functools.partial(abc_jax.batch_grad, chunk_size=3),
    "batch_value_and_grad": abc_jax.batch_value_and_grad,
    "oracle_grad": abc_jax.oracle_grad,
    "fd_grad": abc_jax.fd_grad,
}


def ref_sigmoid(y):
    return 0.5 * (1 + jnp.tanh(0.5 * y))


# jitted: a test runs them eagerly (under jax.grad, vmap, hessian), where each operation
# would otherwise compile on its own.
@jax.jit
def ref_loss(params, x, t=0.0):
    """||C (sigmoid(A x) + B x) - t||^2 for one sample, in plain jnp."""
    A, B, C = params
    z = ref_sigmoid(jnp.einsum("hd,d->h", A, x)) + jnp.einsum("hd,d->h", B, x)
    w = jnp.einsum("oh,h->o", C, z)
    return jnp.sum((w - t) ** 2)


@jax.jit
def ref_batch_loss(params, X, T=0.0, r=None):
    """sum_i r_i ||C (sigmoid(A x_i) + B x_i) - t_i||^2 / sum_i r_i (r None: the mean)."""
    A, B, C = params
    Z = ref_sigmoid(jnp.einsum("hd,nd->nh", A, X)) + jnp.einsum("hd,nd->nh", B, X)
    W = jnp.einsum("oh,nh->no", C, Z)
    losses = jnp.sum((W - T) ** 2, axis=1)
    return jnp.mean(losses) if r is None else jnp.sum(r * losses) / jnp.sum(r)


@jax.jit
def ref_outputs(params, X):
    """W (N, O), row i the output C (sigmoid(A x_i) + B x_i) of X[i], in plain jnp: the map whose
    Jacobian rows J_i = dw_i / d(A, B, C) make the Gauss-Newton matrix."""
    A, B, C = params
    Z = ref_sigmoid(jnp.einsum("hd,nd->nh", A, X)) + jnp.einsum("hd,nd->nh", B, X)
    return jnp.einsum("oh,nh->no", C, Z)


def make_problem(seed, D, H, O, N, dtype=jnp.float64):
    """Params with entries ~ N(0, 1 / fan_in) and X ~ N(0, 1), so y = A x is O(1).

    Drawn with NumPy: jax.random would compile its kernels again for every new
    shape, which dominates the run time of a shape-sweeping suite.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in=1):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

    params = Params(A=normal((H, D), D), B=normal((H, D), D), C=normal((O, H), H))
    return params, normal((N, D))



# The training tests' problem (test_train, test_loop, test_update, test_checkpoint): one
# shape and one draw, so their compiled loops are shared across the files.
TRAIN_DIMS = (4, 6, 3, 10)  # D, H, O, N, all different: a transposed gradient cannot hide
TRAIN_LR = 0.05


def train_problem(dtype=jnp.float64, n=TRAIN_DIMS[3]):
    """params = init_params(key(0), D, H, O) and X (n, D) ~ Normal(0, 1) from key(1)."""
    D, H, O, _ = TRAIN_DIMS
    params = abc_jax.init_params(jax.random.key(0), D, H, O, dtype=dtype)
    return params, jax.random.normal(jax.random.key(1), (n, D), dtype)

def rel_errors(got, ref):
    """Per leaf: max |got - ref| / max |ref| (max |got - ref| where ref is all zero)."""
    chex.assert_trees_all_equal_structs(got, ref)
    errs = []
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert g.shape == r.shape, (g.shape, r.shape)
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        err, scale = np.max(np.abs(g - r)), np.max(np.abs(r))
        errs.append(float(err / scale) if scale > 0 else float(err))
    return errs


def max_rel_err(got, ref):
    """Largest over leaves of max |got - ref| / max |ref|."""
    return max(rel_errors(got, ref))


def assert_rel_close(got, ref, tol):
    errs = rel_errors(got, ref)
    # NaN compares False, so a NaN anywhere fails here too.
    assert all(e <= tol for e in errs), f"relative errors {errs} exceed {tol}"


@contextlib.contextmanager
def compilations():
    """The names of the functions JAX compiles inside the block (JAX's monitoring events)."""
    seen = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/backend_compile"):
            seen.append(kwargs.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


PACKAGE = os.path.dirname(abc_jax.__file__)


# What turning a NumPy input into a JAX array may compile (once per shape and dtype):
# anything else seen before a bad input's error means the check came too late.
CONVERSIONS = {"jit(stage)", "jit(convert_element_type)"}


def exactly(message):
    """A ``match`` pattern: the error's message starts with ``message``, character for
    character (and ends there, if ``message`` ends with ``$``)."""
    end = message.endswith("$")
    return "^" + re.escape(message.removesuffix("$")) + ("$" if end else "")


def names(*fragments):
    """A ``match`` pattern: the message names each of ``fragments`` (the argument, the fix),
    in order, whatever the words around them."""
    return "(?s)" + ".*".join(re.escape(f) for f in fragments)


def raises_before_compiling(call, error, message):
    """``call()`` raises ``error`` from abc_jax's code, its message starting with ``message``
    (a string) or naming each of its fragments (a tuple: ``names``), having compiled nothing
    but input conversions."""
    pattern = names(*message) if isinstance(message, tuple) else exactly(message)
    with compilations() as compiled, pytest.raises(error, match=pattern) as info:
        call()
    assert set(compiled) <= CONVERSIONS, f"compiled {compiled} before raising {info.value!r}"
    innermost = traceback.extract_tb(info.value.__traceback__)[-1].filename
    assert innermost.startswith(PACKAGE), f"raised from {innermost}, not by abc_jax"



def assert_results_equal(a, b):
    """Two TrainResults (or TrainManyResults), losses and params bit for bit."""
    np.testing.assert_array_equal(np.asarray(a.losses), np.asarray(b.losses))
    for x, y in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_resumes_bit_for_bit(run, tmp_path, epochs, first):
    """``run(epochs, checkpoint_dir)`` stopped after ``first`` epochs and called again resumes
    to the run straight through: every field of the result equal, leaf for leaf."""
    whole = run(epochs, None)
    run(first, tmp_path)
    resumed = run(epochs, tmp_path)
    for a, b in zip(resumed, whole, strict=True):
        if a is not None:
            chex.assert_trees_all_equal(a, b)


def assert_results_close(a, b, rtol, atol=0.0):
    np.testing.assert_allclose(a.losses, b.losses, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(a.params, b.params, rtol=rtol, atol=atol)
