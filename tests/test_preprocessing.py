"""Preprocessing (``abc_jax.preprocessing``) against scikit-learn's StandardScaler with sample
weights, applied and undone by ``predict`` against a plain NumPy forward pass, and stored
with the params (``save_params`` / ``load_preprocessing``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import abc_jax
from abc_jax import Batch, Params, Preprocessing

D, H, O, N = 4, 5, 3, 12  # all different

sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")


def data():
    """Rows of unequal scales, targets far from 0, weights non-uniform with zero-weight rows
    in the middle whose values (huge, one NaN) must take no part."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D)) * [1.0, 1000.0, 0.01, 3.0] + [5.0, -200.0, 0.0, 1.0]
    T = rng.standard_normal((N, O)) * [10.0, 0.5, 2.0] + [100.0, -3.0, 0.0]
    w = rng.uniform(0.5, 3.0, N)
    w[[4, 5, 8]] = 0.0
    X[4], T[5] = 1e6, 1e6
    X[8, 2] = np.nan
    return X, T, w


def scalers(X, T, w):
    """The reference: StandardScaler fitted on the rows of non-zero weight, with their weights."""
    used = w > 0
    return tuple(sklearn_preprocessing.StandardScaler().fit(A[used], sample_weight=w[used])
                 for A in (X, T))


def ref_outputs(params, X):
    """W (N, O) = C (sigmoid(A x) + B x) row by row, plain NumPy."""
    A, B, C = (np.asarray(a) for a in params)
    return (1 / (1 + np.exp(-X @ A.T)) + X @ B.T) @ C.T


def test_fit_matches_standard_scaler_with_sample_weights():
    X, T, w = data()
    sx, st = scalers(X, T, w)
    prep = abc_jax.fit_preprocessing(Batch(X, w, T), bias=True)
    np.testing.assert_allclose(prep.x_mean, sx.mean_, rtol=1e-12)
    np.testing.assert_allclose(prep.x_scale, sx.scale_, rtol=1e-12)
    np.testing.assert_allclose(prep.t_mean, st.mean_, rtol=1e-12)
    np.testing.assert_allclose(prep.t_scale, st.scale_, rtol=1e-12)
    np.testing.assert_array_equal(prep.constant, [1.0])
    assert prep.x_mean.dtype == jnp.float64
    # a constant column gets scale 1, as StandardScaler's: it maps to 0, not NaN
    Xc = X.copy()
    Xc[:, 1] = 7.0
    prep_c = abc_jax.fit_preprocessing(Batch(Xc, w))
    assert float(prep_c.x_scale[1]) == 1.0 == scalers(Xc, T, w)[0].scale_[1]
    assert prep_c.t_mean is None and prep_c.constant.shape == (0,)


def test_apply_and_undo_against_the_scalers():
    X, T, w = data()
    sx, st = scalers(X, T, w)
    prep = abc_jax.fit_preprocessing(Batch(X, w, T), bias=True)
    rows = w > 0
    out = abc_jax.apply_preprocessing(prep, Batch(X[rows], w[rows], T[rows]))
    np.testing.assert_allclose(out.X, np.c_[sx.transform(X[rows]), np.ones(rows.sum())],
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.T, st.transform(T[rows]), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(out.weights, w[rows])
    np.testing.assert_allclose(abc_jax.undo_preprocessing(prep, out.T), T[rows], rtol=1e-12)
    # under jit the same
    jitted = jax.jit(abc_jax.apply_preprocessing)(prep, X[rows])
    np.testing.assert_allclose(jitted, out.X, rtol=1e-15)
    # 1-D targets of one output keep their shape
    p1 = abc_jax.fit_preprocessing(Batch(X[rows], T=T[rows, 0]))
    assert abc_jax.apply_preprocessing(p1, Batch(X[rows], T=T[rows, 0])).T.shape == (rows.sum(),)


def test_without_standardize_only_the_constant_column():
    X, T, w = data()
    prep = abc_jax.fit_preprocessing(Batch(X, w, T), standardize=False, bias=True)
    out = abc_jax.apply_preprocessing(prep, Batch(X, w, T))
    np.testing.assert_array_equal(out.X, np.c_[X, np.ones(N)])
    np.testing.assert_array_equal(out.T, T)
    np.testing.assert_array_equal(abc_jax.undo_preprocessing(prep, T), T)


def test_predict_applies_and_undoes_the_preprocessing():
    X, T, w = data()
    sx, st = scalers(X, T, w)
    prep = abc_jax.fit_preprocessing(Batch(X, w, T), bias=True)
    params = abc_jax.init_params(jax.random.key(2), D + 1, H, O, dtype=jnp.float64)
    rows = w > 0
    want = ref_outputs(params, np.c_[sx.transform(X[rows]), np.ones(rows.sum())])
    want = st.inverse_transform(want)
    got = abc_jax.predict(params, X[rows], preprocessing=prep)
    np.testing.assert_allclose(got, want, rtol=1e-11)
    # a Batch: its rows of non-zero weight, in the targets' units
    Xf = np.where(np.isnan(X), 0.0, X)
    got_batch = abc_jax.predict(params, Batch(Xf, w, T), preprocessing=prep)
    np.testing.assert_allclose(got_batch, want, rtol=1e-11)
    # without preprocessing, predict is unchanged: the scaled inputs give the scaled outputs
    scaled = abc_jax.predict(params, abc_jax.apply_preprocessing(prep, X[rows]))
    np.testing.assert_allclose(abc_jax.undo_preprocessing(prep, scaled), want, rtol=1e-11)


def test_bad_input_is_named():
    X, T, _ = data()
    X = X[:4]
    T = T[:4]
    prep = abc_jax.fit_preprocessing(Batch(X[:3], T=T[:3]), bias=True)
    params = abc_jax.init_params(jax.random.key(0), D + 1, H, O, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"X must have shape \(N, 4\)"):
        abc_jax.predict(params, X[:3, :3], preprocessing=prep)
    with pytest.raises(ValueError, match="params take D = 4: pass the preprocessing"):
        abc_jax.predict(abc_jax.init_params(jax.random.key(0), D, H, O), X, preprocessing=prep)
    with pytest.raises(TypeError, match=r"preprocessing must be an abc_jax\.Preprocessing"):
        abc_jax.predict(params, X, preprocessing={"x_mean": 0})
    with pytest.raises(ValueError, match="fitted without them"):
        abc_jax.apply_preprocessing(abc_jax.fit_preprocessing(X), Batch(X, T=T))
    with pytest.raises(ValueError, match="T must have O = 3 columns"):
        abc_jax.apply_preprocessing(prep, Batch(X, T=T[:, :2]))
    with pytest.raises(TypeError, match="standardize must be True or False"):
        abc_jax.fit_preprocessing(X, standardize="yes")
    with pytest.raises(ValueError, match="weights must not all be 0"):
        abc_jax.fit_preprocessing(Batch(X, np.zeros(4)))
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\)"):
        abc_jax.fit_preprocessing(Batch(X, np.ones(5)))
    with pytest.raises(ValueError, match=r"W must have shape \(n, 3\)"):
        abc_jax.undo_preprocessing(prep, T[:, :1])


def test_stored_with_the_params_and_alone(tmp_path):
    X, T, w = data()
    prep = abc_jax.fit_preprocessing(Batch(X, w, T), bias=True)
    params = abc_jax.init_params(jax.random.key(1), D + 1, H, O, dtype=jnp.float64)
    path = abc_jax.save_params(tmp_path / "params.npz", params, preprocessing=prep)
    back = abc_jax.load_preprocessing(path)
    assert isinstance(back, Preprocessing)
    for a, b in zip(back, prep, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(abc_jax.load_params(path), Params)  # the params read as before
    # a file without it (an older one) loads, and has none
    abc_jax.save_params(tmp_path / "plain.npz", params)
    assert abc_jax.load_preprocessing(tmp_path / "plain.npz") is None
    # a run folder: its params.npz's, else its preprocessing.npz (a run that saved no params)
    run = tmp_path / "run"
    abc_jax.save_preprocessing(run / "preprocessing.npz", prep._replace(t_mean=None,
                                                                         t_scale=None))
    assert abc_jax.load_preprocessing(run).t_mean is None
    # where the folder has params.npz, it alone says: a stale preprocessing.npz beside is not read
    abc_jax.save_params(run / "params.npz", params)
    assert abc_jax.load_preprocessing(run) is None
    (tmp_path / "empty").mkdir()
    assert abc_jax.load_preprocessing(tmp_path / "empty") is None
    with pytest.raises(ValueError, match="params take D = 4"):
        abc_jax.save_params(tmp_path / "bad.npz", abc_jax.init_params(jax.random.key(0), D),
                            preprocessing=prep)
    with pytest.raises(ValueError, match="no such file"):
        abc_jax.load_preprocessing(tmp_path / "missing.npz")
