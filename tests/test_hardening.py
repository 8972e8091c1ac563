"""Bad input at every public entry point: a clear error of abc_jax's own, never a silent NaN.

A property test (hypothesis) draws a shape, an entry point and one way of
getting its input wrong: a wrong rank, a dtype, shapes that do not chain, a
NaN or inf placed anywhere in X or in the params, finite values that
overflow the dtype, or a wrong argument type. Every call must end in
``ValueError``/``TypeError``/``FloatingPointError`` (``DataError`` is a
``ValueError``) whose message names the argument, raised by abc_jax itself:
the innermost frame of the traceback lies in the abc_jax package, never
inside JAX.
"""

from __future__ import annotations

import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import abc_jax
from abc_jax import Params

PACKAGE = os.path.dirname(abc_jax.__file__)
ERRORS = (ValueError, TypeError, FloatingPointError)

SAMPLE_FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "manual_grad": abc_jax.manual_grad,
    "abc_loss": abc_jax.abc_loss,
}
BATCH_FNS = {
    "batch_loss": abc_jax.batch_loss,
    "batch_grad": abc_jax.batch_grad,
    "per_sample_grads": abc_jax.per_sample_grads,
    "oracle_grad": abc_jax.oracle_grad,
    "fd_grad": abc_jax.fd_grad,
    "train": lambda p, X, **kw: abc_jax.train(p, X, **({"lr": 0.01, "epochs": 2} | kw),
                                              progress=False),
    "train_per_sample": lambda p, X, **kw: abc_jax.train_per_sample(
        p, X, **({"lr": 0.01, "epochs": 2} | kw), progress=False),
}
ALL_FNS = {**SAMPLE_FNS, **BATCH_FNS}


def _assert_own_error(call, name):
    """call() raises one of ERRORS, from abc_jax's code, with ``name`` in the message."""
    with pytest.raises(ERRORS) as info:
        out = call()
        pytest.fail(f"no error; returned {jax.tree.map(np.asarray, out)}")
    message = str(info.value)
    assert name in message, f"{name!r} not named in: {message}"
    innermost = traceback.extract_tb(info.value.__traceback__)[-1].filename
    assert innermost.startswith(PACKAGE), f"raised from {innermost}: {message}"


def _problem(D, H, O, N, dtype, seed):
    rng = np.random.default_rng(seed)
    params = Params(
        jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), dtype),
        jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), dtype),
        jnp.asarray(rng.normal(size=(O, H)) / np.sqrt(H), dtype),
    )
    return params, jnp.asarray(rng.normal(size=(N, D)), dtype)


dims = st.integers(1, 4)
settings_ = settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@st.composite
def bad_calls(draw):
    """(fn name, params, data, kwargs, the name the error must carry)."""
    D, H, O, N = draw(dims), draw(dims), draw(dims), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([jnp.float32, jnp.float64]))
    params, X = _problem(D, H, O, N, dtype, draw(st.integers(0, 3)))
    fn = draw(st.sampled_from(sorted(ALL_FNS)))
    sample = fn in SAMPLE_FNS
    data, dname = (X[0], "x") if sample else (X, "X")
    kind = draw(st.sampled_from([
        "data_rank", "data_width", "data_dtype", "data_nonfinite", "data_type",
        "params_nonfinite", "params_chain", "params_rank", "params_dtype", "params_type",
        "overflow", *([] if sample else ["empty"]),
    ]))
    if kind == "data_rank":
        data = draw(st.sampled_from([jnp.ones(()), jnp.ones((1, 1, D), dtype)]))
        if sample:
            data = draw(st.sampled_from([jnp.ones(()), jnp.ones((2, D), dtype)]))
        return fn, params, data, {}, dname
    if kind == "data_width":
        wrong = data.shape[-1] + draw(st.integers(1, 3))
        return fn, params, jnp.ones((*data.shape[:-1], wrong), dtype), {}, dname
    if kind == "data_dtype":
        bad = draw(st.sampled_from([jnp.complex64, jnp.bool_]))
        return fn, params, data.astype(bad), {}, dname
    if kind == "data_type":
        return fn, params, draw(st.sampled_from(["1 2 3", {"x": 1}, None])), {}, dname
    if kind == "empty":
        return fn, params, jnp.ones((0, D), dtype), {}, dname
    if kind == "data_nonfinite":
        index = tuple(draw(st.integers(0, n - 1)) for n in data.shape)
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return fn, params, data.at[index].set(value), {}, dname
    if kind == "overflow":  # finite, but the loss leaves the dtype's range
        big = np.finfo(dtype).max ** 0.75
        return fn, params, data * jnp.asarray(big, dtype), {}, "overflow"
    field = draw(st.sampled_from(["A", "B", "C"]))
    p = getattr(params, field)
    if kind == "params_nonfinite":
        index = tuple(draw(st.integers(0, n - 1)) for n in p.shape)
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return fn, params._replace(**{field: p.at[index].set(value)}), data, {}, f"params.{field}"
    if kind == "params_chain":
        r, c = p.shape
        wrong = jnp.ones((r, c + 1) if field != "A" else (r + 1, c), dtype)
        return fn, params._replace(**{field: wrong}), data, {}, "params"
    if kind == "params_rank":
        return fn, params._replace(**{field: p.ravel()}), data, {}, f"params.{field}"
    if kind == "params_dtype":
        wrong = draw(st.sampled_from([jnp.int32, jnp.complex64]))
        return fn, params._replace(**{field: p.astype(wrong)}), data, {}, f"params.{field}"
    bad = draw(st.sampled_from([dict(params), list(params)[:2], "params", None]))
    if isinstance(bad, dict):
        bad = params._asdict()
    return fn, bad, data, {}, "params"


@settings_
@given(bad_calls())
def test_every_entry_point_rejects_bad_input_with_its_own_error(case):
    fn, params, data, kwargs, name = case
    _assert_own_error(lambda: ALL_FNS[fn](params, data, **kwargs), name)


# Arguments of the wrong type or value: (function, keyword, values, error name).
_KEY = jax.random.key(0)
BAD_ARGS = [
    ("train", "lr", ["0.1", True, None, float("nan"), -1.0, 0, [0.1]]),
    ("train", "epochs", [3.0, "3", True, -1, None]),
    ("train", "batch_size", [2.5, "2", True, 0]),
    ("train", "chunk_size", [2.5, "2", True, 0, -3]),
    ("train", "epochs_per_chunk", [2.5, "10", False, 0]),
    ("train", "key", [0, "key", np.zeros(2, np.uint32), jnp.ones(3)]),
    ("train", "grad", ["autodiff", 1]),
    ("train", "optimizer", ["adam", optax.adam]),
    ("train_per_sample", "lr", ["0.1", True, float("inf")]),
    ("train_per_sample", "epochs", [2.0, "2", False]),
    ("batch_grad", "chunk_size", [1.5, "4", True, 0]),
    ("batch_grad", "precision", ["fast", 1]),
    ("fd_grad", "eps", ["1e-3", True, 0.0, float("nan")]),
]


@pytest.mark.parametrize(
    "fn,arg,value",
    [(fn, arg, v) for fn, arg, values in BAD_ARGS for v in values],
    ids=[f"{fn}-{arg}-{v!r}" for fn, arg, values in BAD_ARGS for v in values],
)
def test_bad_arguments_are_named(fn, arg, value):
    params, X = _problem(3, 4, 2, 5, jnp.float64, 0)
    kwargs = {arg: value}
    if fn == "train" and arg == "key":
        kwargs["batch_size"] = 2
    _assert_own_error(lambda: BATCH_FNS[fn](params, X, **kwargs), arg)


@pytest.mark.parametrize("key", [0, "0", np.zeros(2, np.uint32), jnp.ones(2), None])
def test_init_params_names_a_key_that_is_not_a_key(key):
    _assert_own_error(lambda: abc_jax.init_params(key, 3), "key")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(in_dim=3.0), "in_dim"),
        (dict(in_dim="3"), "in_dim"),
        (dict(in_dim=True), "in_dim"),
        (dict(in_dim=3, hidden_dim=0), "hidden_dim"),
        (dict(in_dim=3, out_dim=-1), "out_dim"),
        (dict(in_dim=3, dtype=jnp.int32), "dtype"),
    ],
)
def test_init_params_names_bad_dimensions(kwargs, name):
    _assert_own_error(lambda: abc_jax.init_params(_KEY, **kwargs), name)


@pytest.mark.parametrize(
    "X,name",
    [
        ("abc", "X"),
        (np.ones(3), "X"),
        (np.ones((0, 3)), "X"),
        (np.ones((2, 2, 2)), "X"),
    ],
)
def test_shard_batch_rejects_what_is_not_a_batch(X, name):
    _assert_own_error(lambda: abc_jax.shard_batch(X), name)


def test_shard_batch_rejects_a_mesh_that_is_not_one():
    _assert_own_error(lambda: abc_jax.shard_batch(np.ones((4, 3)), mesh="data"), "mesh")


@pytest.mark.parametrize(
    "content,suffix",
    [
        ("1,2\n3,x\n", ".csv"),
        ("1,2\n3\n", ".csv"),
        ("1,nan\n3,4\n", ".csv"),
        ("", ".csv"),
        ("1,2\n", ".txt"),
    ],
)
def test_load_data_errors_name_the_file(tmp_path, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(abc_jax.DataError) as info:
        abc_jax.load_data(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- the table of the report


def test_float32_data_times_1e30_is_an_overflow_error_everywhere():
    params, X = _problem(3, 3, 3, 6, jnp.float32, 1)
    X = X * jnp.float32(1e30)
    for name, fn in BATCH_FNS.items():
        if name.startswith("train"):
            continue
        _assert_own_error(lambda fn=fn: fn(params, X), "overflow")
    _assert_own_error(lambda: abc_jax.loss(params, X[0]), "overflow")


def test_train_says_the_initial_loss_is_not_finite_without_blaming_the_learning_rate():
    params, X = _problem(3, 3, 3, 6, jnp.float32, 1)
    with pytest.raises((*ERRORS, abc_jax.DivergenceError)) as info:
        abc_jax.train(params, X * jnp.float32(1e30), lr=0.1, epochs=3, progress=False)
    message = str(info.value)
    assert "initial" in message and "float64" in message, message
    assert "smaller learning rate" not in message, message


@pytest.mark.parametrize("field,index", [("A", (0, 0)), ("C", (1, 2))])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_params_are_named_with_their_index(field, index, value):
    params, X = _problem(3, 3, 3, 6, jnp.float64, 2)
    bad = params._replace(**{field: getattr(params, field).at[index].set(value)})
    where = rf"params\.{field}\[{index[0]}, {index[1]}\] is -?(nan|inf)"
    for fn in (abc_jax.batch_grad, abc_jax.batch_loss, abc_jax.oracle_grad,
               abc_jax.per_sample_grads):
        with pytest.raises(ValueError, match=where):
            fn(bad, X)
    for fn in (abc_jax.forward, abc_jax.manual_grad, abc_jax.loss):
        with pytest.raises(ValueError, match=where):
            fn(bad, X[0])
