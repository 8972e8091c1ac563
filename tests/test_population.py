"""train_many: every member equals its own train call (seeds, lrs, keys, data, weights,
targets, Optax), one member's divergence leaves the others, checkpoints, bad input named."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abc_jax import Batch, Params, TrainManyResult, init_params, train, train_many
from abc_jax.checkpoint import checkpoint_epoch

D, H, O, N, M = 3, 4, 2, 12, 3  # rectangular: a transposed gradient cannot hide
LR = 0.05
KW = dict(progress=False, epochs_per_chunk=7)  # several chunks per run


def stacked_params(m=M, dtype=jnp.float64):
    """One init_params per seed, stacked: A (m, H, D), B (m, H, D), C (m, O, H)."""
    ps = [init_params(jax.random.key(s), D, H, O, dtype=dtype) for s in range(m)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def data(m=None, n=N, seed=1):
    shape = (n, D) if m is None else (m, n, D)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def member(tree, m):
    return jax.tree.map(lambda a: a[m], tree)


def assert_member_equals(r: TrainManyResult, m: int, alone, rtol=1e-12):
    np.testing.assert_allclose(r.losses[m], alone.losses, rtol=rtol)
    chex.assert_trees_all_close(member(r.params, m), alone.params, rtol=rtol)


def test_seeds_and_learning_rates_each_equal_their_own_train():
    params, X, lrs = stacked_params(), data(), np.array([0.02, 0.05, 0.1])
    r = train_many(params, X, lr=lrs, epochs=20, **KW)
    assert isinstance(r, TrainManyResult) and r.losses.shape == (M, 20)
    assert r.params.A.shape == (M, H, D) and r.params.C.shape == (M, O, H)
    assert not np.asarray(r.diverged).any() and np.asarray(r.diverged_at).tolist() == [-1] * M
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), X, lr=lrs[m], epochs=20, **KW))
    assert len({float(v) for v in r.losses[:, -1]}) == M  # they really differ


def test_shared_params_with_mini_batches_from_folded_keys():
    params, X, key = stacked_params(1), data(), jax.random.key(7)
    p0 = member(params, 0)
    r = train_many(p0, X, lr=LR, epochs=9, batch_size=5, key=key, members=M, **KW)
    for m in range(M):
        alone = train(p0, X, lr=LR, epochs=9, batch_size=5, key=jax.random.fold_in(key, m), **KW)
        assert_member_equals(r, m, alone)
    assert not np.allclose(r.losses[0], r.losses[1])  # other mini-batches, other losses
    keys = jax.random.split(key, M)  # stacked keys: used as given
    r = train_many(p0, X, lr=LR, epochs=4, batch_size=5, key=keys, **KW)
    assert_member_equals(r, 2, train(p0, X, lr=LR, epochs=4, batch_size=5, key=keys[2], **KW))


def test_per_member_data_weights_and_targets():
    params, Xs = stacked_params(), data(M)
    T = jax.random.normal(jax.random.key(3), (M, N, O), jnp.float64)
    r = train_many(params, Batch(Xs, T=T), lr=LR, epochs=10, **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), Batch(Xs[m], T=T[m]), lr=LR,
                                         epochs=10, **KW))
    X = data()  # one X, weights per member (a bootstrap), targets shared
    w = jnp.asarray(np.random.default_rng(0).integers(0, 3, (M, N)), jnp.float64).at[:, 0].set(1)
    r = train_many(params, Batch(X, w, T[0]), lr=LR, epochs=10, **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), Batch(X, w[m], T[0]), lr=LR,
                                         epochs=10, **KW))


def test_optax_optimizer_and_per_member_learning_rate():
    params, X = stacked_params(), data()
    r = train_many(params, X, epochs=12, optimizer=optax.adam(0.01), **KW)
    for m in range(M):
        assert_member_equals(r, m, train(member(params, m), X, epochs=12,
                                         optimizer=optax.adam(0.01), **KW))
    lrs = [0.001, 0.01, 0.03]
    per_member = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.asarray(lrs))
    r = train_many(params, X, epochs=12, grad="oracle", optimizer=per_member, **KW)
    for m in (0, 2):
        own = optax.inject_hyperparams(optax.adam)(learning_rate=lrs[m])
        assert_member_equals(r, m, train(member(params, m), X, epochs=12, optimizer=own, **KW))
    with pytest.raises(TypeError, match=r"an optimizer carries its own rate.*inject_hyperparams"):
        train_many(params, X, lr=lrs, epochs=2, optimizer=optax.adam(0.01), **KW)
    with pytest.raises(TypeError, match="an optimizer carries its own rate"):
        train(member(params, 0), X, lr=0.1, epochs=2, optimizer=optax.adam(0.01), **KW)


def test_one_member_diverges_the_others_finish():
    params, X = stacked_params(), data()
    lrs = np.array([0.05, 1e3, 0.02])
    r = train_many(params, X, lr=lrs, epochs=30, **KW)
    assert np.asarray(r.diverged).tolist() == [False, True, False]
    e = int(r.diverged_at[1])
    assert 0 < e < 30
    assert np.isfinite(r.losses[1, :e]).all() and not np.isfinite(r.losses[1, e:]).any()
    chex.assert_tree_all_finite(r.params)
    for m in (0, 2):
        assert_member_equals(r, m, train(member(params, m), X, lr=lrs[m], epochs=30, **KW))
    from abc_jax import DivergenceError

    with pytest.raises(DivergenceError) as info:  # the frozen member: train's error result
        train(member(params, 1), X, lr=1e3, epochs=30, **KW)
    assert info.value.epoch == e
    chex.assert_trees_all_close(member(r.params, 1), info.value.result.params, rtol=1e-12)
    np.testing.assert_allclose(r.losses[1, :e], info.value.result.losses, rtol=1e-12)


def test_all_members_diverged_stops_early_and_pads():
    r = train_many(stacked_params(2), data(), lr=[1e3, 2e3], epochs=60, **KW)
    assert np.asarray(r.diverged).all() and r.losses.shape == (2, 60)
    assert np.isnan(r.losses[:, -1]).all()


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    params, X, key = stacked_params(), data(), jax.random.key(5)
    kw = dict(lr=[0.05, 1e3, 0.02], batch_size=4, key=key, **KW)
    whole = train_many(params, X, epochs=25, **kw)
    train_many(params, X, epochs=14, checkpoint_dir=tmp_path, **kw)
    assert checkpoint_epoch(tmp_path) == 14
    rest = train_many(params, X, epochs=25, checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(np.asarray(rest.losses), np.asarray(whole.losses))
    chex.assert_trees_all_equal(rest.params, whole.params)
    np.testing.assert_array_equal(np.asarray(rest.diverged_at), np.asarray(whole.diverged_at))
    with pytest.raises(ValueError, match="lr"):  # another run's checkpoint is refused
        train_many(params, X, epochs=25, checkpoint_dir=tmp_path, **(kw | dict(lr=0.01)))


def test_chunk_size_changes_nothing():
    params, X = stacked_params(), data()
    a = train_many(params, X, lr=LR, epochs=6, **KW)
    b = train_many(params, X, lr=LR, epochs=6, chunk_size=5, **KW)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (dict(X=data(2)), ValueError, "X has 2"),  # 3 params members, 2 data members
        (dict(lr=[0.1, 0.2]), ValueError, "lr has 2"),
        (dict(lr=[0.1, -0.2, 0.1]), ValueError, "lr must be finite and > 0"),
        (dict(lr=np.ones((3, 1))), ValueError, "lr must be a number or an array"),
        (dict(key=jax.random.split(jax.random.key(0), 4), batch_size=2), ValueError, "key has 4"),
        (dict(X=Batch(data(), jnp.ones((2, N)))), ValueError, "weights has 2"),
        (dict(X=Batch(data(), T=jnp.ones((M, N, O + 1)))), ValueError, "T must have shape"),
        (dict(X=data()[:, :2]), ValueError, "X must have D = 3"),
        (dict(X=jnp.ones((1, 2, N, D))), ValueError, "X must have rank 2"),
        (dict(members=5), ValueError, "members has 5"),
        (dict(batch_size=2), ValueError, "key is required"),
        (dict(epochs=-1), ValueError, "epochs"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(X=data().at[3, 1].set(jnp.nan)), ValueError, r"X\[3, 1\]"),
        (dict(X=Batch(data(), jnp.zeros((M, N)).at[:2].set(1.0))), ValueError, r"members \[2\]"),
    ],
)
def test_bad_input_is_named(args, error, match):
    kw = dict(params=stacked_params(), X=data(), lr=LR, epochs=2, progress=False) | args
    with pytest.raises(error, match=match):
        train_many(kw.pop("params"), kw.pop("X"), **kw)


def test_nothing_gives_the_member_count():
    with pytest.raises(ValueError, match="members=M"):
        train_many(member(stacked_params(), 0), data(), lr=LR, epochs=2, progress=False)


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
