"""The hand-rolled rule (``core.update.gradient_descent``) is an Optax transformation whose
learning rate is data, and training with it equals training with ``optax.sgd``."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from _reference import TRAIN_DIMS, TRAIN_LR, assert_results_close, train_problem

from abc_jax import gradient_descent, train

D, H, O, N = TRAIN_DIMS  # all different: a transposed gradient cannot hide
LR = TRAIN_LR


make_problem = train_problem  # shared with the other training tests' files


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
