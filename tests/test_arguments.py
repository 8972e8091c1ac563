"""train_many's per-member arguments (``engine.arguments``): the member axes of params, data,
weights, targets, lr and keys must agree, each disagreement named before anything compiles,
as are non-finite params or data and uneven rows with mini-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import exactly, raises_before_compiling

import abc_jax
from abc_jax import Batch, Params, init_params, train, train_many

D, H, O, N, M = 3, 4, 2, 12, 3  # rectangular
LR = 0.05
TRAIN = {"lr": 0.1, "epochs": 2, "progress": False}


def stacked_params(m=M, dtype=jnp.float64):
    """One init_params per seed, stacked: A (m, H, D), B (m, H, D), C (m, O, H)."""
    ps = [init_params(jax.random.key(s), D, H, O, dtype=dtype) for s in range(m)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def data(m=None, n=N, seed=1):
    shape = (n, D) if m is None else (m, n, D)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


P, X = stacked_params(), data()
STACKED = jax.tree.map(lambda a: np.asarray(a[:2]), P)  # two members (NumPy arrays)
STACKED_JAX = Params(*(jnp.stack([a[0]] * 7) for a in P))  # seven members, a shape of its own


def case(id_, call, error, message):
    return pytest.param(call, error, message, id=id_)


MEMBER_RULES = [
    case("train_many-member-axes-disagree",
         lambda: abc_jax.train_many(STACKED, X, **(TRAIN | {"lr": np.array([0.1, 0.2, 0.3])})),
         ValueError, "the leading (member) axes disagree: params has 2, lr has 3"),
    case("train_many-stacked-jax-params",
         lambda: abc_jax.train_many(STACKED_JAX, X, **(TRAIN | {"lr": np.array([0.1, 0.2])})),
         ValueError, "the leading (member) axes disagree: params has 7, lr has 2"),
]


@pytest.mark.parametrize("call,error,message", MEMBER_RULES)
def test_member_axes_that_disagree_are_named(call, error, message):
    raises_before_compiling(call, error, message)
AXES = "the leading (member) axes disagree: "


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (dict(X=data(2)), ValueError, AXES + "X has 2, params has 3"),
        (dict(lr=[0.1, 0.2]), ValueError, AXES + "params has 3, lr has 2"),
        (dict(lr=[0.1, -0.2, 0.1]), ValueError, "lr must be finite and > 0"),
        (dict(lr=np.ones((3, 1))), TypeError, "lr must be a number or an array"),
        (dict(key=jax.random.split(jax.random.key(0), 4), batch_size=2), ValueError,
         AXES + "params has 3, key has 4"),
        (dict(X=Batch(data(), jnp.ones((2, N)))), ValueError, AXES + "weights has 2, params has 3"),
        (dict(X=Batch(data(), T=jnp.ones((M, N, O + 1)))), ValueError, "T must have shape"),
        (dict(X=data()[:, :2]), ValueError, "X must have D = 3"),
        (dict(X=jnp.ones((1, 2, N, D))), ValueError, "X must have rank 2"),
        (dict(members=5), ValueError, AXES + "params has 3, members has 5"),
        (dict(batch_size=2), ValueError, "key is required"),
        (dict(X=data().at[3, 1].set(jnp.nan)), ValueError,
         "X must be finite: it holds 1 NaN/inf value(s), first X[3, 1] is nan"),
        (dict(X=Batch(data(), jnp.zeros((M, N)).at[:2].set(1.0))), ValueError,
         "weights must not all be 0 for members [2]"),
    ],
)
def test_bad_input_is_named(args, error, message):
    kw = dict(params=P, X=X, lr=LR, epochs=2, progress=False) | args
    with pytest.raises(error, match=exactly(message)):
        train_many(kw.pop("params"), kw.pop("X"), **kw)


def test_nothing_gives_the_member_count():
    with pytest.raises(ValueError, match="members=M"):
        train_many(jax.tree.map(lambda a: a[0], P), data(), lr=LR, epochs=2, progress=False)


def test_params_members_must_agree():
    p = stacked_params()
    with pytest.raises(ValueError, match="leading"):
        train_many(Params(p.A, p.B, p.C[:2]), data(), lr=LR, epochs=2, progress=False)


def test_uneven_nonzero_weights_with_mini_batches_are_refused():
    w = jnp.ones((M, N)).at[0, 0].set(0.0)
    with pytest.raises(ValueError, match="same number of rows"):
        train_many(stacked_params(), Batch(data(), w), lr=LR, epochs=2, batch_size=3,
                   key=jax.random.key(0), progress=False)


def test_refuses_to_be_traced():
    with pytest.raises(TypeError, match="own compiled loop"):
        jax.jit(lambda X: train_many(stacked_params(), X, lr=LR, epochs=1).losses)(data())
def test_non_finite_params_are_named_before_training():
    params = jax.tree.map(lambda a: a[0], P)
    bad = params._replace(B=params.B.at[0, 1].set(jnp.inf))
    with pytest.raises(ValueError, match=exactly(
            "params.B must be finite: it holds 1 NaN/inf value(s), first params.B[0, 1] is inf")):
        train(bad, X, **TRAIN)
