"""The hand-rolled rule (``core.update.gradient_descent``) is an Optax transformation whose
learning rate is data, and training with it equals training with ``optax.sgd``."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from _reference import assert_results_close

from abc_jax import gradient_descent, init_params, train

D, H, O, N = 4, 6, 3, 10  # all different (the shapes of test_train.py: its compilations)
LR = 0.05


def make_problem(dtype=jnp.float64, n=N):
    params = init_params(jax.random.key(0), D, H, O, dtype=dtype)
    X = jax.random.normal(jax.random.key(1), (n, D), dtype)
    return params, X


@pytest.mark.smoke
@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float64, 1e-12), (jnp.float32, 1e-6)])
def test_hand_rolled_rule_equals_optax_sgd(dtype, rtol):
    params, X = make_problem(dtype)
    ours = train(params, X, lr=LR, epochs=130, progress=False, epochs_per_chunk=10)
    sgd = train(params, X, epochs=130, optimizer=optax.sgd(LR), progress=False,
                epochs_per_chunk=10)
    assert_results_close(ours, sgd, rtol=rtol)
    assert ours.losses[-1] < 0.1 * ours.losses[0]


def test_gradient_descent_is_an_optax_transformation():
    params, _ = make_problem()
    gd = gradient_descent(0.5)
    assert isinstance(gd, optax.GradientTransformation)
    assert gd.update is gradient_descent(0.25).update  # lr is data: one compiled loop
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = gd.update(grads, gd.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new, jax.tree.map(lambda p: p - 0.5, params), rtol=1e-15)
