"""DP-SGD in the engine (``privacy=DPSGD(...)``): without noise and clipping it is ``train``;
one step against vmap(grad) of the reference loss with the documented Poisson mask; the
noise is the documented ``jax.random.normal``; epsilon is dp-accounting's; a sweep's
member is its own ``train``; a resumed run is bit for bit; bad arguments are named."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import assert_resumes_bit_for_bit, make_problem, max_rel_err, ref_loss

import abc_jax
from abc_jax import DPSGD, Batch, Params

dp_accounting = pytest.importorskip("dp_accounting")

D, H, O, N = 4, 6, 3, 24  # all different
KW = dict(progress=False, epochs_per_chunk=3)


def problem(seed=0):
    """Params, and a Batch with targets and row weights, two rows of weight 0 (padding)."""
    params, X = make_problem(seed, D, H, O, N)
    rng = np.random.default_rng(seed + 1)
    r = rng.uniform(0.5, 2.0, N)
    r[[3, 10]] = 0.0
    return params, Batch(X, jnp.asarray(r), jnp.asarray(rng.standard_normal((N, O))))


def step_key(key, epoch, step):
    return jax.random.fold_in(jax.random.fold_in(key, epoch), step)


@pytest.mark.integration  # two more private loops
def test_no_noise_no_clip_every_row_is_train(key):
    params, batch = problem()
    X = batch._replace(weights=jnp.ones(N))  # the private step divides by q n, not sum(r)
    plain = abc_jax.train(params, X, lr=0.1, epochs=6, **KW)
    private = abc_jax.train(params, X, lr=0.1, epochs=6, key=key, **KW,
                            privacy=DPSGD(clip_norm=1e300, noise_multiplier=0.0,
                                          sampling_rate=1.0))
    assert max_rel_err(private.params, plain.params) <= 1e-12
    np.testing.assert_allclose(private.losses, plain.losses, rtol=1e-12)
    assert private.sampling_rate == 1.0 and private.epsilon == np.inf  # sigma = 0: no privacy


def ref_private_grad(params, batch, key, q, c):
    """sum over the sampled rows of the clipped r_i grad L_i, / (q n): the mask drawn as
    documented, per-sample gradients by vmap(jax.grad) of the reference loss."""
    g = jax.vmap(jax.grad(ref_loss), in_axes=(None, 0, 0))(params, batch.X, batch.T)
    g = jax.tree.map(lambda a: a * batch.weights[:, None, None], g)  # g_i = r_i dL_i/dp
    norm = jnp.sqrt(sum(jnp.sum(a**2, axis=(1, 2)) for a in g))  # (N,)
    m = jax.random.bernoulli(jax.random.fold_in(key, 0), jnp.float64(q), (N,))
    f = jnp.where(m, jnp.minimum(1.0, c / norm), 0.0)  # (N,)
    n = int(jnp.sum(batch.weights > 0))
    return Params(*(jnp.einsum("n,n...->...", f, a) / (q * n) for a in g)), m, f


def test_step_equals_clipped_reference(key):
    params, batch = problem()
    q, c, lr = 0.7, 0.5, 0.05  # round(1 / q) = 1: one step an epoch
    out = abc_jax.train(params, batch, lr=lr, epochs=1, key=key, **KW,
                        privacy=DPSGD(clip_norm=c, noise_multiplier=0.0, sampling_rate=q))
    ref, m, f = ref_private_grad(params, batch, step_key(key, 0, 0), q, c)
    assert 0 < int(m.sum()) < N and (f[m] < 1).any() and (f[m] == 1).any()  # a real test
    got = jax.tree.map(lambda p, p1: (p - p1) / lr, params, out.params)
    assert max_rel_err(got, ref) <= 1e-12


def test_noise_is_the_documented_normal(key):
    """The step's noise, exactly: sigma c / (q n) times jax.random.normal with leaf j's key
    fold_in(fold_in(k_s, 1), j), k_s = fold_in(fold_in(key, epoch), step)."""
    params, batch = problem()
    q, c, sigma, lr = 0.7, 0.3, 2.0, 1.0  # round(1 / q) = 1: one step an epoch
    runs = [abc_jax.train(params, batch, lr=lr, epochs=1, key=key, **KW,
                          privacy=DPSGD(clip_norm=c, noise_multiplier=s, sampling_rate=q))
            for s in (0.0, sigma)]
    got = jax.tree.map(lambda a, b: (a - b) / lr, runs[0].params, runs[1].params)
    k = jax.random.fold_in(step_key(key, 0, 0), 1)
    scale = sigma * c / (q * (N - 2))  # n: the rows of non-zero weight
    want = Params(*(scale * jax.random.normal(jax.random.fold_in(k, j), p.shape, p.dtype)
                    for j, p in enumerate(params)))
    assert max_rel_err(got, want) <= 1e-9  # a difference of two runs: rounding of p


def direct_epsilon(sigma, q, steps, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    return acc.get_epsilon(delta)


def test_epsilon_is_dp_accountings(key):
    params, batch = problem()
    n = N - 2  # two padding rows
    out = abc_jax.train(params, batch, lr=0.05, epochs=5, key=key, **KW,
                        privacy=DPSGD(clip_norm=1.0, noise_multiplier=1.3, sampling_rate=0.5))
    assert out.delta == 1 / n and out.sampling_rate == 0.5
    assert out.epsilon == direct_epsilon(1.3, 0.5, 5 * 2, 1 / n)  # 2 steps an epoch


def test_sweep_member_is_its_own_train(key):
    params, batch = problem()
    clips, sigmas = [0.3, 1.0, 3.0], [0.5, 1.0, 0.0]
    kw = dict(lr=0.05, epochs=4, **KW)
    many = abc_jax.train_many(params, batch, key=key, **kw, privacy=DPSGD(
        clip_norm=clips, noise_multiplier=sigmas, sampling_rate=0.5, delta=1e-3))
    assert many.losses.shape == (3, 4)
    np.testing.assert_array_equal(many.delta, [1e-3] * 3)
    np.testing.assert_array_equal(many.epsilon, [direct_epsilon(s, 0.5, 8, 1e-3)
                                                 for s in sigmas[:2]] + [np.inf])
    for m, (c, s) in enumerate(zip(clips, sigmas, strict=True)):
        alone = abc_jax.train(params, batch, key=jax.random.fold_in(key, m), **kw,
                              privacy=DPSGD(clip_norm=c, noise_multiplier=s, sampling_rate=0.5,
                                            delta=1e-3))
        assert max_rel_err(jax.tree.map(lambda a, m=m: a[m], many.params), alone.params) <= 1e-12
        np.testing.assert_allclose(many.losses[m], alone.losses, rtol=1e-12)
        assert many.epsilon[m] == alone.epsilon


def test_resumed_run_is_bit_for_bit(key, tmp_path):
    params, batch = problem()
    kw = dict(lr=0.05, key=key, checkpoint_every=2, **KW,
              privacy=DPSGD(clip_norm=0.5, noise_multiplier=1.0, sampling_rate=0.5))
    assert_resumes_bit_for_bit(lambda epochs, path: abc_jax.train(
        params, batch, epochs=epochs, checkpoint_dir=path, **kw), tmp_path, 6, 2)
    with pytest.raises(ValueError, match="privacy"):  # another run's checkpoint is refused
        abc_jax.train(params, batch, epochs=6, checkpoint_dir=tmp_path, **kw | dict(
            privacy=DPSGD(clip_norm=0.5, noise_multiplier=2.0, sampling_rate=0.5)))


@pytest.mark.parametrize("kw, error, match", [
    (dict(clip_norm=0.0), ValueError, "clip_norm"),
    (dict(clip_norm="1"), TypeError, "clip_norm"),
    (dict(clip_norm=[[1.0]]), TypeError, "clip_norm"),
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(noise_multiplier=np.inf), ValueError, "noise_multiplier"),
    (dict(sampling_rate=0.0), ValueError, "sampling_rate"),
    (dict(sampling_rate=1.5), ValueError, "sampling_rate"),
    (dict(sampling_rate="0.1"), TypeError, "sampling_rate"),
    (dict(sampling="fixed"), ValueError, "sampling"),
    (dict(delta=1.0), ValueError, "delta"),
])
def test_bad_dpsgd_is_named(kw, error, match):
    with pytest.raises(error, match=match):
        DPSGD(**dict(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.1) | kw)


def test_private_mode_contradictions_are_named(key, monkeypatch):
    params, X = make_problem(0, D, H, O, N)
    ok = DPSGD(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5)
    kw = dict(lr=0.1, epochs=1, **KW)
    for extra, error, match in [
        (dict(privacy=ok), ValueError, "key is required: the step draws Poisson samples"),
        (dict(privacy=ok, key=key, batch_size=4), ValueError, "batch_size"),
        (dict(privacy=ok, key=key, grad="oracle"), ValueError, "grad"),
        (dict(privacy="dp", key=key), TypeError, "DPSGD"),
        (dict(key=key, privacy=DPSGD(clip_norm=[1.0, 2.0], noise_multiplier=1.0,
                                     sampling_rate=0.5)), ValueError, "train_many"),
    ]:
        with pytest.raises(error, match=match):
            abc_jax.train(params, X, **kw | extra)
    with pytest.raises(ValueError, match=r"privacy\.noise_multiplier has 3"):
        abc_jax.train_many(params, X, lr=[0.1, 0.2], epochs=1, key=key, **KW, privacy=DPSGD(
            clip_norm=1.0, noise_multiplier=[1.0, 1.0, 2.0], sampling_rate=0.5))
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[privacy\]"') as info:
        abc_jax.train(params, X, **kw, key=key, privacy=ok)
    assert isinstance(info.value, abc_jax.PrivacyAccountingError)


@pytest.mark.integration  # two more compiled private loops
def test_chunked_rows_and_optax_route_through_the_same_step(key):
    params, batch = problem()
    kw = dict(epochs=3, key=key, **KW,
              privacy=DPSGD(clip_norm=0.5, noise_multiplier=1.0, sampling_rate=0.5))
    plain = abc_jax.train(params, batch, lr=0.05, **kw)
    other = abc_jax.train(params, batch, optimizer=optax.sgd(0.05), chunk_size=5, **kw)
    assert max_rel_err(other.params, plain.params) <= 1e-12
    np.testing.assert_allclose(other.losses, plain.losses, rtol=1e-12)


def test_several_steps_an_epoch_each_with_its_own_key_and_q_accounted(key):
    """q = 0.3: S = round(1 / q) = 3 steps an epoch, so a step that reused another's key or
    an accountant given another q (1 / S = 0.33) would differ. The reference: each step
    written out from the documented keys, per-sample gradients by vmap(grad)."""
    params, batch = problem()
    q, c, sigma, lr, epochs = 0.3, 0.5, 0.8, 0.05, 2
    out = abc_jax.train(params, batch, lr=lr, epochs=epochs, key=key, **KW,
                        privacy=DPSGD(clip_norm=c, noise_multiplier=sigma, sampling_rate=q))
    n = N - 2
    p, masks = params, []
    for e in range(epochs):
        for s in range(3):
            k = step_key(key, e, s)
            g, m, _ = ref_private_grad(p, batch, k, q, c)
            masks.append(m)
            xi = [jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), j), a.shape,
                                    a.dtype) for j, a in enumerate(p)]
            p = Params(*(a - lr * (ga + sigma * c * x / (q * n))
                         for a, ga, x in zip(p, g, xi, strict=True)))
    assert len({tuple(np.asarray(m).tolist()) for m in masks}) == len(masks)  # all differ
    assert max_rel_err(out.params, p) <= 1e-12
    assert out.sampling_rate == q and out.epsilon == direct_epsilon(sigma, q, epochs * 3, 1 / n)


def test_for_epsilon_is_the_smallest_noise_the_accountant_allows(key):
    """At q = 0.3 (3 steps an epoch), 7 epochs, delta 1e-5: the accountant called directly
    gives at most the target at sigma and more just below it; a run of those epochs reports
    that epsilon."""
    target, q, epochs, delta = 2.0, 0.3, 7, 1e-5
    priv = DPSGD.for_epsilon(target, delta=delta, sampling_rate=q, epochs=epochs, clip_norm=1.5)
    sigma = priv.noise_multiplier
    assert (priv.clip_norm, priv.sampling_rate, priv.delta) == (1.5, q, delta)
    assert direct_epsilon(sigma, q, epochs * 3, delta) <= target
    assert direct_epsilon(sigma - 1e-4, q, epochs * 3, delta) > target
    assert direct_epsilon(sigma, q, epochs * 3, delta) == pytest.approx(target, rel=1e-5)
    params, batch = problem()
    out = abc_jax.train(params, batch, lr=0.05, epochs=epochs, key=key, **KW, privacy=priv)
    assert out.epsilon == direct_epsilon(sigma, q, epochs * 3, delta) and out.delta == delta
    assert DPSGD.for_epsilon(np.inf, delta=delta, sampling_rate=q, epochs=epochs,
                             clip_norm=1.5).noise_multiplier == 0.0


def test_for_epsilon_summarises_dp_accountings_warnings_once(caplog):
    """A large target puts sigma where dp-accounting leaves out low fractional orders next to
    the best one: one RuntimeWarning, nothing logged; bad targets are named."""
    with pytest.warns(RuntimeWarning, match="left out 7 RDP order") as record:
        DPSGD.for_epsilon(100.0, delta=1e-5, sampling_rate=0.3, epochs=50, clip_norm=1.0)
    assert len(record) == 1 and not [r for r in caplog.records if r.name == "absl"]
    for bad, error in [(0.0, ValueError), (np.nan, ValueError), ("1", TypeError)]:
        with pytest.raises(error, match="epsilon must be"):
            DPSGD.for_epsilon(bad, delta=1e-5, sampling_rate=0.3, epochs=5, clip_norm=1.0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        DPSGD.for_epsilon(1.0, delta=1e-5, sampling_rate=0.3, epochs=0, clip_norm=1.0)
    with pytest.raises(ValueError, match="delta must be in"):
        DPSGD.for_epsilon(1.0, delta=2.0, sampling_rate=0.3, epochs=5, clip_norm=1.0)
