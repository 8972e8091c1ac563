"""Bad input at every public function: a clear error of abc_jax's own, never a silent NaN.

One test per contract, each run over every public function it applies to:

1. Bad input (a rank, a shape, a dtype, a type, a Python value) raises
   ``ValueError``/``TypeError`` from abc_jax's own code, naming the argument
   and what was expected, before anything is traced or compiled.
2. A NaN/inf in an input is a ``ValueError`` naming the argument, the count and
   the position of the first one.
3. Finite inputs whose result overflows the dtype raise ``FloatingPointError``
   with the one overflow message, which suggests the next wider dtype.
4. Inside a caller's ``jax.jit``/``vmap``/``grad`` the shape checks still run
   and the value checks are skipped: a NaN flows through to the result.
"""

import contextlib
import functools
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import abc_jax
from abc_jax import Batch, Params, validation

D, H, O, N = 5, 4, 3, 6  # all different
PACKAGE = os.path.dirname(abc_jax.__file__)

FNS = {
    "forward": abc_jax.forward,
    "loss": abc_jax.loss,
    "abc_loss": abc_jax.abc_loss,
    "manual_grad": abc_jax.manual_grad,
    "batch_loss": abc_jax.batch_loss,
    "batch_grad": abc_jax.batch_grad,
    "batch_value_and_grad": abc_jax.batch_value_and_grad,
    "per_sample_grads": abc_jax.per_sample_grads,
    "oracle_grad": abc_jax.oracle_grad,
    "fd_grad": abc_jax.fd_grad,
    "train": functools.partial(abc_jax.train, lr=0.1, epochs=2, progress=False),
    "train_per_sample": functools.partial(abc_jax.train_per_sample, lr=0.1, epochs=2,
                                          progress=False),
}
SAMPLE_FNS = ("forward", "loss", "abc_loss", "manual_grad")  # one sample x (D,)
TRAIN_FNS = ("train", "train_per_sample")  # they run their own compiled loop
BATCH_FNS = tuple(f for f in FNS if f not in SAMPLE_FNS)  # X (N, D) or a Batch


def make_problem(dtype=np.float64, seed=0):
    """Params and X (N, D) as NumPy arrays: building them compiles nothing."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) / 2).astype(dtype)

    return Params(normal(H, D), normal(H, D), normal(O, H)), normal(N, D)


def data_for(fn, X):
    """(the data argument of ``fn``, its name): one sample x or the batch X."""
    return (X[0], "x") if fn in SAMPLE_FNS else (X, "X")


def with_value(a, index, value):
    a = np.array(a)
    a[index] = value
    return a


@contextlib.contextmanager
def compilations():
    """The names of the functions JAX traces or compiles inside the block."""
    # JAX compiles its transfer of a NumPy scalar once per process: done here, before
    # watching, so that only what the call itself compiles is seen.
    jnp.asarray(np.float64(0), np.float64)
    seen = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            seen.append(kwargs.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------- 1. bad input

# (id, bad data from the good one, error, message). The messages name the
# argument and what was expected.
BATCH_DATA = [
    ("rank-1", lambda X: X[0], ValueError,
     rf"X must be a batch of shape \(N, D\) = \(N, {D}\), got shape \({D},\)"),
    ("rank-3", lambda X: X[None], ValueError, rf"X must .*\(N, D\).*got shape \(1, {N}, {D}\)"),
    ("width", lambda X: X[:, 1:], ValueError,
     rf"X must have D = {D} columns .*got shape \({N}, {D - 1}\)"),
    ("empty", lambda X: X[:0], ValueError, r"X must hold at least one sample \(N >= 1\)"),
    ("bool", lambda X: X > 0, TypeError, r"X must hold real numbers, got dtype bool"),
    ("complex", lambda X: X + 1j, TypeError, r"X must hold real numbers, got dtype complex"),
    ("str", lambda X: "1 2 3", TypeError, r"X must be an array, got str"),
    ("weights-shape", lambda X: Batch(X, np.ones(N + 1)), ValueError,
     rf"weights must have shape \(N,\) = \({N},\).*got \({N + 1},\)"),
]
SAMPLE_DATA = [
    ("rank-2", lambda x: np.stack([x, x]), ValueError,
     rf"x must be one sample of shape \(D,\) = \({D},\), got shape \(2, {D}\)"),
    ("rank-0", lambda x: x[0], ValueError, r"x must be one sample of shape \(D,\).*got shape \(\)"),
    ("width", lambda x: x[1:], ValueError,
     rf"x must have D = {D} entries .*got shape \({D - 1},\)"),
    ("bool", lambda x: x > 0, TypeError, r"x must hold real numbers, got dtype bool"),
    ("str", lambda x: "1 2 3", TypeError, r"x must be an array, got str"),
]
PARAMS = [
    ("dict", lambda p: p._asdict(), TypeError, r"params must be Params.*dict.*Params\(\*\*d\)"),
    ("2-tuple", lambda p: p[:2], TypeError, r"params must be Params\(A, B, C\) \(a 3-tuple"),
    ("C-wrong-H", lambda p: p._replace(C=np.ones((O, H + 1))), ValueError,
     rf"params\.C must be \(O, H\) with H = {H}.*do not chain"),
    ("B-not-A", lambda p: p._replace(B=np.ones((H, D + 1))), ValueError,
     rf"params\.B must have the shape of A, \(H, D\) = \({H}, {D}\), got \({H}, {D + 1}\)"),
    ("A-rank-1", lambda p: p._replace(A=p.A.ravel()), ValueError,
     rf"params\.A must be a matrix \(rank 2\), got shape \({H * D},\)"),
    ("int", lambda p: Params(*(a.astype(np.int32) for a in p)), TypeError,
     r"params\.A must have a floating dtype, got int32"),
    ("mixed", lambda p: p._replace(C=p.C.astype(np.float32)), TypeError,
     r"params\.A, \.B, \.C must share one dtype"),
    ("empty", lambda p: Params(np.ones((0, D)), np.ones((0, D)), np.ones((O, 0))), ValueError,
     r"params dimensions must be >= 1"),
]
X64 = r"float64 needs x64 enabled: call jax\.config\.update\('jax_enable_x64', True\)"
INT_TYPE, INT_MIN = r" must be an int, got", r" must be >= "
REAL, POSITIVE = r" must be a real number", r" must be a finite number > 0"
# (function, keyword, [(id, value, error, message)]): the message follows the keyword.
ARGUMENTS = [
    *[(f, "precision", [("name", "fast", ValueError, r" must be None or one of \('highest'"),
                        ("int", 1, TypeError, r" must be None or one of")])
      for f in FNS if f != "abc_loss"],
    *[(f, "chunk_size", [("0", 0, ValueError, INT_MIN + "1, got 0"),
                         ("-2", -2, ValueError, INT_MIN + "1, got -2"),
                         ("float", 2.5, TypeError, INT_TYPE + " float"),
                         ("bool", True, TypeError, INT_TYPE + " bool"),
                         ("str", "4", TypeError, INT_TYPE + " str")])
      for f in ("batch_grad", "batch_value_and_grad", "train")],
    *[(f, "epochs", [("-1", -1, ValueError, INT_MIN + "0, got -1"),
                     ("float", 3.0, TypeError, INT_TYPE + " float"),
                     ("str", "3", TypeError, INT_TYPE + " str"),
                     ("None", None, TypeError, INT_TYPE + " NoneType")]) for f in TRAIN_FNS],
    *[(f, "lr", [("0", 0, ValueError, POSITIVE), ("-1", -1.0, ValueError, POSITIVE),
                 ("nan", float("nan"), ValueError, POSITIVE),
                 ("inf", float("inf"), ValueError, POSITIVE),
                 ("str", "0.1", TypeError, REAL), ("bool", True, TypeError, REAL),
                 ("list", [0.1], TypeError, REAL)]) for f in TRAIN_FNS],
    *[(f, "lr", [("None", None, TypeError, r" is required without an optimizer")])
      for f in TRAIN_FNS],
    *[(f, "epochs_per_chunk", [("0", 0, ValueError, INT_MIN + "1"),
                               ("float", 2.5, TypeError, INT_TYPE + " float")])
      for f in TRAIN_FNS],
    ("train", "batch_size", [("0", 0, ValueError, INT_MIN + "1, got 0"),
                             ("float", 2.5, TypeError, INT_TYPE + " float"),
                             ("str", "2", TypeError, INT_TYPE + " str"),
                             ("bool", True, TypeError, INT_TYPE + " bool")]),
    ("train", "optimizer", [("str", "adam", TypeError, r" must be an optax\.GradientTransf"),
                            ("factory", optax.adam, TypeError, r" must be an optax\.Gradient")]),
    ("train", "grad", [("autodiff", "autodiff", ValueError, r" must be one of \('manual'")]),
    ("fd_grad", "eps", [("0", 0.0, ValueError, POSITIVE), ("-1e-3", -1e-3, ValueError, POSITIVE),
                        ("nan", float("nan"), ValueError, POSITIVE),
                        ("inf", float("inf"), ValueError, POSITIVE),
                        ("str", "1e-3", TypeError, REAL), ("bool", True, TypeError, REAL)]),
]
KEY = r" must be (a|one) jax\.random key, e\.g\. jax\.random\.key\(0\)"
_KEY = jax.random.key(0)
_X13 = jnp.ones((13, D), jnp.float32)  # a shape and dtype no other test converts


def without_x64(call):
    """``call`` with x64 disabled (the tests' conftest enables it)."""
    def run(params, X):
        with jax.enable_x64(False):
            return call(params, X)
    return run


# Calls of their own: (id, call, error, message).
OTHERS = [
    *[(f"train-key-{i}", lambda p, X, k=k: FNS["train"](p, X, batch_size=2, key=k), TypeError,
       "key" + KEY) for i, k in [("int", 0), ("str", "key"), ("numpy", np.zeros(2, np.uint32)),
                                 ("floats", jnp.ones(3))]],
    ("train-key-None", lambda p, X: FNS["train"](p, X, batch_size=2), ValueError,
     r"key is required with batch_size"),
    *[(f"init_params-key-{i}", lambda p, X, k=k: abc_jax.init_params(k, 3), TypeError, "key" + KEY)
      for i, k in [("int", 0), ("str", "0"), ("numpy", np.zeros(2, np.uint32)), ("None", None)]],
    *[(f"init_params-{kw}-{i}", lambda p, X, kw=kw, v=v: abc_jax.init_params(
        _KEY, **({"in_dim": 3} | {kw: v})), err, kw + msg)
      for kw, i, v, err, msg in [
          ("in_dim", "0", 0, ValueError, " must be >= 1, got 0"),
          ("in_dim", "float", 3.0, TypeError, " must be an int, got float"),
          ("in_dim", "bool", True, TypeError, " must be an int, got bool"),
          ("in_dim", "str", "3", TypeError, " must be an int, got str"),
          ("hidden_dim", "0", 0, ValueError, " must be >= 1, got 0"),
          ("out_dim", "-1", -1, ValueError, " must be >= 1, got -1"),
          ("dtype", "int32", jnp.int32, TypeError, " must be a floating dtype, got int32"),
          ("dtype", "name", "fast", TypeError, " must be a floating dtype, got 'fast'")]],
    ("init_params-float64-without-x64", without_x64(lambda p, X: abc_jax.init_params(
        _KEY, 3, dtype=jnp.float64)), ValueError, "dtype " + X64),
    ("batch_grad-float64-params-without-x64", without_x64(abc_jax.batch_grad), ValueError,
     "params dtype " + X64),
    ("shard_batch-str", lambda p, X: abc_jax.shard_batch("abc"), ValueError,
     r"X must be a batch of shape \(N, D\), got shape \(\)"),
    ("shard_batch-rank-1", lambda p, X: abc_jax.shard_batch(X[0]), ValueError,
     rf"X must be a batch of shape \(N, D\), got shape \({D},\)"),
    ("forward-data-rank-2-float32", lambda p, X: abc_jax.forward(p, _X13), ValueError,
     rf"x must be one sample of shape \(D,\) = \({D},\), got shape \(13, {D}\)"),
    ("shard_batch-mesh-str", lambda p, X: abc_jax.shard_batch(X, mesh="data"), TypeError,
     r"mesh must be a jax\.sharding\.Mesh, got str"),
]


def _bad_input_cases():
    """pytest params (build, error, message), deterministic ids: ``build(params, X)``
    makes the bad input and returns the call to make with it."""
    cases = []
    for f in FNS:
        data, params = SAMPLE_DATA if f in SAMPLE_FNS else BATCH_DATA, PARAMS
        cases += [(f"{f}-data-{i}", lambda p, X, f=f, bad=bad: functools.partial(
            FNS[f], p, bad(data_for(f, X)[0])), err, msg) for i, bad, err, msg in data]
        cases += [(f"{f}-params-{i}", lambda p, X, f=f, bad=bad: functools.partial(
            FNS[f], bad(p), data_for(f, X)[0]), err, msg) for i, bad, err, msg in params]
    for f, kw, values in ARGUMENTS:
        cases += [(f"{f}-{kw}-{i}", lambda p, X, f=f, kw=kw, v=v: functools.partial(
            FNS[f], p, data_for(f, X)[0], **{kw: v}), err, kw + msg)
                  for i, v, err, msg in values]
    cases += [(i, lambda p, X, call=call: functools.partial(call, p, X), err, msg)
              for i, call, err, msg in OTHERS]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("build,error,message", _bad_input_cases())
def test_bad_input_raises_a_named_error_before_compiling(build, error, message):
    params, X = make_problem()
    call = build(Params(*map(jnp.asarray, params)), X)  # NumPy params would be converted
    with compilations() as compiled:
        with pytest.raises(error, match=message) as info:
            call()
    assert compiled == [], f"compiled {compiled} before raising {info.value!r}"
    innermost = traceback.extract_tb(info.value.__traceback__)[-1].filename
    assert innermost.startswith(PACKAGE), f"raised from {innermost}, not by abc_jax"


@pytest.mark.parametrize("fn", FNS)
def test_the_compile_monitor_sees_a_valid_call_compile(fn):
    # The control for "compiled == []" above: a D no other call uses (loss calls forward).
    rng, d = np.random.default_rng(1), 7 + list(FNS).index(fn)
    params = Params(*(rng.normal(size=s) / 3 for s in [(2, d), (2, d), (9, 2)]))
    X = rng.normal(size=(3, d))
    with compilations() as compiled:
        out = FNS[fn](params, data_for(fn, X)[0])
    assert compiled, "a first call at new shapes compiled nothing the monitor saw"
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(out))


# --------------------------------------------------------------- 2. NaN/inf inputs

# (id, where, value): X and x hold a second bad entry after the first.
NONFINITE = [("X-nan", "data", np.nan), ("A-inf", "params.A", np.inf),
             ("C-neg-inf", "params.C", -np.inf), ("weights-nan", "weights", np.nan)]


def _nonfinite_cases():
    return [pytest.param(f, where, value, id=f"{f}-{i}")
            for f in FNS for i, where, value in NONFINITE
            if not (where == "weights" and f in SAMPLE_FNS)]


@pytest.mark.parametrize("fn,where,value", _nonfinite_cases())
def test_nonfinite_input_is_named_with_its_position(fn, where, value):
    params, X = make_problem()
    data, name = data_for(fn, X)
    if where == "data":
        index = (2,) if fn in SAMPLE_FNS else (2, 3)
        data = with_value(with_value(data, index, value), (-1,) * data.ndim, np.inf)
        count = 2
    elif where == "weights":
        index, name, count = (4,), "weights", 1
        data = Batch(data, with_value(np.ones(N), index, value))
    else:
        field = where[-1]
        index, name, count = (1, 2), where, 1
        params = params._replace(**{field: with_value(getattr(params, field), index, value)})
    where_ = rf"{name}\[{', '.join(map(str, index))}\]".replace(".", r"\.")
    message = (rf"^{name.replace('.', r'[.]')} must be finite: it holds {count} NaN/inf "
               rf"value\(s\), first {where_} is {value}$")
    with pytest.raises(ValueError, match=message):
        FNS[fn](params, data)


# --------------------------------------------------------------- 3. overflow

# (id, dtype, what is scaled, by how much, the advice it must give, and must not)
OVERFLOW = [("float16-X", np.float16, "X", 3000.0, "or use float32 params", "float64"),
            ("float32-params", np.float32, "params", 1e15, "or use float64 (", "use float32"),
            ("float64-X", np.float64, "X", 1e200, ")", "use float")]
@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("dtype,scaled,scale,advice,wrong", [c[1:] for c in OVERFLOW],
                         ids=[c[0] for c in OVERFLOW])
def test_overflow_raises_the_one_floating_point_error(fn, dtype, scaled, scale, advice, wrong):
    params, X = make_problem(dtype)
    if scaled == "X":
        X = X * dtype(scale)
    else:
        params = Params(*(p * dtype(scale) for p in params))
    data, name = data_for(fn, X)
    with pytest.raises(FloatingPointError) as expected:
        validation.raise_overflow(Params(*map(jnp.asarray, params)), jnp.asarray(data), name)
    one = str(expected.value)
    assert f"overflows {np.dtype(dtype).name}" in one and f"max |{name}| = " in one, one
    assert one.endswith(f"Rescale {name} (or the params)") == (advice == ")"), one
    assert advice in one and wrong not in one, one
    with pytest.raises(FloatingPointError) as info:
        FNS[fn](params, data)
    message = str(info.value)
    assert one in message, message
    assert "smaller learning rate" not in message, message


# --------------------------------------------------------------- 4. under jit, vmap, grad


def _transform(kind, fn):
    """``fn`` under a caller's jit, vmap (over a leading axis of the data) or grad."""
    f = FNS[fn]
    if kind == "jit":
        return jax.jit(f)
    if kind == "vmap":
        return lambda p, d: jax.vmap(f, in_axes=(None, 0))(p, jnp.stack([d, d]))

    def total(p, d):  # a scalar of every output, differentiated with respect to params
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(f(p, d)))

    return jax.grad(total)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("kind", ["jit", "vmap", "grad"])
def test_under_transformations_shapes_are_checked_values_are_not(fn, kind):
    params, X = map(lambda t: jax.tree.map(jnp.asarray, t), make_problem())
    data, name = data_for(fn, X)
    call = _transform(kind, fn)
    if fn in TRAIN_FNS:  # they refuse to be transformed, and say so
        with pytest.raises(TypeError, match=r"runs its own compiled loop: call it outside"):
            call(params, data)
        return
    with pytest.raises(ValueError, match=rf"{name} must have D = {D} "):
        call(params, data[..., 1:])
    with pytest.raises(ValueError, match=rf"params\.C must be \(O, H\) with H = {H}"):
        call(params._replace(C=jnp.ones((O, H + 1))), data)
    out = call(params, data.at[(0,) * data.ndim].set(jnp.nan))  # no error: values unknown
    assert any(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree.leaves(out))
