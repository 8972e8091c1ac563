"""The one training engine: weighted mini-batch epochs against a plain reference, held-out
evaluation and patience per member, callbacks, cross-validation as members, resume."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import make_problem, ref_batch_loss

import abc_jax
from abc_jax import Batch

D, H, O = 4, 5, 3  # all different
KW = dict(progress=False, epochs_per_chunk=6)


def member(tree, m):
    return jax.tree.map(lambda a: a[m], tree)


def ref_minibatch_gd(params, X, T, w, lr, epochs, b, key):
    """Plain Python over the reference loss: each epoch a permutation (fold_in(key, e)) of
    the rows of non-zero weight in batches of b; the epoch's loss is the batch losses
    weighted by the sum of each batch's row weights, each before its own update."""
    rows, losses = np.flatnonzero(w > 0), []
    for e in range(epochs):
        perm = rows[np.asarray(jax.random.permutation(jax.random.fold_in(key, e), len(rows)))]
        total = weight = 0.0
        for s in range(0, len(perm), b):
            i = perm[s:s + b]
            L, g = jax.value_and_grad(ref_batch_loss)(params, X[i], T[i], w[i])
            total, weight = total + float(L) * w[i].sum(), weight + w[i].sum()
            params = jax.tree.map(lambda p, d: p - lr * d, params, g)
        losses.append(total / weight)
    return params, np.asarray(losses)


def weighted_problem(seed=0, N=11):
    params, X = make_problem(seed, D, H, O, N)
    rng = np.random.default_rng(seed)
    T = jnp.asarray(rng.standard_normal((N, O)))
    w = rng.uniform(0.2, 3.0, N) * (rng.uniform(size=N) > 0.2)  # non-uniform, some 0
    return params, X, T, w


def test_weighted_mini_batch_epochs_equal_a_plain_reference():
    # a mini-batch's loss counts by the sum of its rows' weights, not by its row count
    params, X, T, w = weighted_problem()
    key, lr, b = jax.random.key(4), 0.05, 3  # several batches, the last one short
    want_params, want_losses = ref_minibatch_gd(params, X, T, w, lr, 5, b, key)
    got = abc_jax.train(params, Batch(X, jnp.asarray(w), T), lr=lr, epochs=5, batch_size=b,
                        key=key, **KW)
    np.testing.assert_allclose(got.losses, want_losses, rtol=1e-12)
    chex.assert_trees_all_close(got.params, want_params, rtol=1e-12)
    # members of train_many: each its own weights (as many non-zero) and keys
    w2 = np.where(w > 0, 1.0 + np.arange(len(w)), 0.0)
    keys = jax.random.split(key, 2)
    many = abc_jax.train_many(params, Batch(X, jnp.asarray(np.stack([w, w2])), T), lr=lr,
                              epochs=5, batch_size=b, key=keys, **KW)
    for m, wm in enumerate((w, w2)):
        p, L = ref_minibatch_gd(params, X, T, wm, lr, 5, b, keys[m])
        np.testing.assert_allclose(many.losses[m], L, rtol=1e-12)
        chex.assert_trees_all_close(member(many.params, m), p, rtol=1e-12)


def held_out_problem():
    rng = np.random.default_rng(1)
    teacher = abc_jax.Params(*(jnp.asarray(rng.standard_normal(s)) for s in
                               [(H, D), (H, D), (O, H)]))
    X = jnp.asarray(rng.standard_normal((40, D)))
    T = abc_jax.predict(teacher, X) + jnp.asarray(rng.standard_normal((40, O)))
    params = abc_jax.init_params(jax.random.key(2), D, H, O, dtype=jnp.float64)
    return params, Batch(X[:8], T=T[:8]), Batch(X[8:], T=T[8:])


def test_members_with_held_out_data_and_patience_each_equal_their_own_train(tmp_path):
    params, fit, held = held_out_problem()
    lrs = [0.01, 0.03, 0.06]
    kw = dict(epochs=400, eval_every=10, patience=3, **KW)
    many = abc_jax.train_many(params, fit, lr=lrs, eval_data=held, **kw)
    stopped = np.asarray(many.stopped_at)
    assert (stopped > 0).any(), "patience stopped some member"
    for m, lr in enumerate(lrs):
        alone = abc_jax.train(params, fit, lr=lr, eval_data=held, **kw)
        k = len(alone.eval_losses)
        np.testing.assert_allclose(many.eval_losses[m, :k], alone.eval_losses, rtol=1e-12)
        assert np.isnan(np.asarray(many.eval_losses[m, k:])).all()  # after its stop: none
        assert int(many.best_epoch[m]) == alone.best_epoch
        n = len(alone.losses)
        np.testing.assert_allclose(many.losses[m, :n], alone.losses, rtol=1e-12)
        chex.assert_trees_all_close(member(many.params, m), alone.params, rtol=1e-12)
    # resumed from a checkpoint part way: bit for bit the uninterrupted run
    abc_jax.train_many(params, fit, lr=lrs, eval_data=held, checkpoint_dir=tmp_path,
                       **kw | dict(epochs=40))
    resumed = abc_jax.train_many(params, fit, lr=lrs, eval_data=held, checkpoint_dir=tmp_path,
                                 **kw)
    for a, b in zip(resumed, many, strict=True):
        if a is not None:
            chex.assert_trees_all_equal(a, b)


def test_per_member_held_out_data():
    params, fit, held = held_out_problem()
    X2 = jnp.stack([held.X, held.X[::-1] * 0.5])
    T2 = jnp.stack([held.T, held.T[::-1]])
    many = abc_jax.train_many(params, fit, lr=0.05, members=2, epochs=30, eval_every=10,
                              eval_data=Batch(X2, T=T2), **KW)
    for m in range(2):
        alone = abc_jax.train(params, fit, lr=0.05, epochs=30, eval_every=10,
                              eval_data=Batch(X2[m], T=T2[m]), **KW)
        np.testing.assert_allclose(many.eval_losses[m], alone.eval_losses, rtol=1e-12)


def test_callbacks_add_metrics_and_can_stop_the_run():
    params, fit, held = held_out_problem()
    seen = []

    def gradient_norm(epoch, p, metrics):
        seen.append((epoch, metrics["eval_loss"]))
        g = abc_jax.batch_grad(p, fit)
        return {"grad_norm": float(jnp.sqrt(sum(jnp.sum(a * a) for a in g))),
                "stop": epoch >= 20}

    r = abc_jax.train(params, fit, lr=0.05, epochs=100, eval_every=10, eval_data=held,
                      callbacks=[gradient_norm], **KW)
    np.testing.assert_array_equal(r.eval_epochs, [0, 10, 20])
    assert r.losses.shape == (20,)  # stopped at the evaluation that asked
    assert [e for e, _ in seen] == [0, 10, 20]
    np.testing.assert_allclose([v for _, v in seen], r.eval_losses, rtol=1e-12)
    at_10 = abc_jax.train(params, fit, lr=0.05, epochs=10, **KW).params
    g = abc_jax.batch_grad(at_10, fit)
    np.testing.assert_allclose(r.metrics["grad_norm"][1],
                               float(jnp.sqrt(sum(jnp.sum(a * a) for a in g))), rtol=1e-12)


def test_callbacks_of_train_many_act_per_member():
    params, fit, _ = held_out_problem()

    def stop_the_first(epoch, p, metrics):
        assert p.A.shape == (3, H, D) and metrics["loss"].shape == (3,)
        return {"C_norm": jnp.sqrt(jnp.sum(p.C ** 2, axis=(1, 2))),
                "stop": np.array([epoch >= 10, False, False])}

    r = abc_jax.train_many(params, fit, lr=[0.01, 0.02, 0.03], epochs=30, eval_every=10,
                           callbacks=[stop_the_first], **KW)
    assert np.asarray(r.stopped_at).tolist() == [10, -1, -1]
    assert np.isnan(np.asarray(r.losses[0, 10:])).all() and np.isfinite(r.losses[1:]).all()
    assert r.metrics["C_norm"].shape == (3, 4)  # epochs 0, 10, 20, 30
    with pytest.raises(TypeError, match="a callback must return a dict of metrics or None"):
        abc_jax.train(params, fit, lr=0.01, epochs=2, callbacks=[lambda e, p, m: 1.0], **KW)


def test_cross_validation_equals_one_train_call_per_fold():
    params, X, T, w = weighted_problem(3, N=13)
    data = Batch(X, jnp.asarray(w), T)
    cv = abc_jax.cross_validate(params, data, folds=3, lr=0.05, epochs=25, eval_every=5, **KW)
    assert cv["fold"].tolist().count(-1) == int((w == 0).sum())  # weight 0: in no fold
    for k in range(3):
        inside = jnp.asarray(np.where(cv["fold"] == k, w, 0.0))
        alone = abc_jax.train(params, Batch(X, jnp.asarray(w) - inside, T), lr=0.05, epochs=25,
                              eval_every=5, eval_data=Batch(X, inside, T), **KW)
        np.testing.assert_allclose(cv["held_out_loss"][k], alone.eval_losses[-1], rtol=1e-12)
        chex.assert_trees_all_close(member(cv["result"].params, k), alone.params, rtol=1e-12)
    held = cv["held_out_loss"]
    assert cv["mean"] == pytest.approx(np.mean(held)) and cv["std"] == pytest.approx(
        np.std(held, ddof=1))
