"""The training arguments (``train``, ``train_many`` and the steps they build): one case per
rule, each a ``ValueError``/``TypeError`` from abc_jax's own code that names the argument
and the fix, raised before anything compiles; training always checks values (NaN/inf),
with or without ``value_checks()``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import exactly, raises_before_compiling

import abc_jax
from abc_jax import Batch, Params, edge

D, H, O, N = 5, 4, 3, 6  # all different
PRECISIONS = "('highest', 'high', 'default', 'float32', 'tensorfloat32', 'bfloat16')"
KEY_MSG = "key must be a jax.random key, e.g. jax.random.key(0), got "
FLOATS = jnp.ones(3)  # an array that is not a key


def problem():
    """Params (JAX arrays) and X (N, D) (a NumPy array), made without compiling anything."""
    rng = np.random.default_rng(0)
    return (Params(*(jnp.asarray(rng.standard_normal(s) / 2) for s in [(H, D), (H, D), (O, H)])),
            rng.standard_normal((N, D)) / 2)


P, X = problem()


def case(id_, call, error, message):
    return pytest.param(call, error, message, id=id_)


def test_train_many_takes_stacked_params_not_a_list():
    raises_before_compiling(lambda: abc_jax.train_many([P, P], X, **TRAIN), TypeError,
                            "params must be one Params(A, B, C), got a list of 2: stack them "
                            "into one Params with a leading axis, "
                            "jax.tree.map(lambda *a: jnp.stack(a), *params)")


def with_value(a, index, value):
    a = np.array(a)
    a[index] = value
    return a


TRAIN = {"lr": 0.1, "epochs": 2, "progress": False}


def train_with(**kw):
    """A call of ``train`` on the good problem with ``kw`` changed."""
    return lambda: abc_jax.train(P, X, **(TRAIN | kw))


TRAIN_RULES = [  # on train (train_many where it differs)
    *[case(f"epochs-{i}", train_with(epochs=v), err, msg)
      for i, v, err, msg in [("-1", -1, ValueError, "epochs must be >= 0, got -1"),
                             ("float", 3.0, TypeError, "epochs must be an int, got float"),
                             ("None", None, TypeError, "epochs must be an int, got NoneType")]],
    *[case(f"lr-{i}", train_with(lr=v), err, msg)
      for i, v, err, msg in [("0", 0, ValueError, ("lr", "finite and > 0", "got 0")),
                             ("nan", np.nan, ValueError, ("lr", "finite and > 0", "got nan")),
                             ("str", "0.1", TypeError, ("lr", "a number", "str '0.1'")),
                             ("bool", True, TypeError, ("lr", "a number", "bool True")),
                             ("list", [0.1], ValueError, ("one value", "train_many", "'lr': 1")),
                             ("missing", None, TypeError, ("lr is required", "lr=0.1"))]],
    case("lr-with-optimizer", train_with(optimizer=optax.adam(1e-3)), TypeError,
         ("lr goes with the hand-rolled rule", "optimizer=optax.adam(1e-3)",
          "inject_hyperparams")),
    case("train_many-lr-with-optimizer",
         lambda: abc_jax.train_many(P, X, optimizer=optax.adam(1e-3), members=2, **TRAIN),
         TypeError, ("lr goes with the hand-rolled rule", "learning_rate=rates")),
    *[case(f"{kw}-{i}", train_with(**{kw: v}), err, msg)
      for kw, i, v, err, msg in [
          ("epochs_per_chunk", "0", 0, ValueError, "epochs_per_chunk must be >= 1, got 0"),
          ("eval_every", "float", 2.5, TypeError, "eval_every must be an int, got float"),
          ("checkpoint_every", "-1", -1, ValueError, "checkpoint_every must be >= 1, got -1"),
          ("patience", "str", "3", TypeError, "patience must be an int, got str"),
          ("batch_size", "0", 0, ValueError, "batch_size must be >= 1, got 0"),
          ("batch_size", "bool", True, TypeError, "batch_size must be an int, got bool"),
          ("optimizer", "str", "adam", TypeError,
           ("optimizer must be an optax.GradientTransformation", "got str")),
          ("optimizer", "factory", optax.adam, TypeError,
           ("optimizer must be an optax.GradientTransformation", "got function")),
          ("grad", "name", "autodiff", ValueError,
           "grad must be one of ('manual', 'oracle'), got 'autodiff'"),
          ("chunk_size", "0", 0, ValueError, "chunk_size must be >= 1, got 0"),
          ("precision", "int", 32, TypeError, f"precision must be None or one of {PRECISIONS}, "
                                              "got int"),
          ("lr", "inf", np.inf, ValueError, ("lr", "finite and > 0", "inf"))]],
    *[case(f"key-{i}", train_with(batch_size=2, key=k), TypeError, msg)
      for i, k, msg in [("int", 0, KEY_MSG + "int"),
                        ("numpy", np.zeros(2, np.uint32), KEY_MSG + "ndarray"),
                        ("floats", FLOATS, "key must be one jax.random key, e.g. "
                                           "jax.random.key(0), got dtype float64 and shape (3,)")]],
    case("key-missing", train_with(batch_size=2), ValueError,
         ("key is required", "mini-batches", "key=jax.random.key(0)")),
    case("key-without-draws", train_with(key=jax.random.key(0)), ValueError,
         ("key", "draws nothing", "drop key")),
    case("step-and-its-knobs", train_with(step=abc_jax.gradient_step(lr=0.1)), ValueError,
         ("step and lr contradict", "drop step")),
    case("lbfgs-with-privacy", lambda: abc_jax.train(
        P, X, optimizer=optax.lbfgs(), epochs=2, key=jax.random.key(0), progress=False,
        privacy=abc_jax.DPSGD(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.3)),
         ValueError, ("privacy", "value_fn", "first-order optimizer")),
    case("privacy-with-batch_size", lambda: abc_jax.train(
        P, X, lr=0.1, epochs=2, key=jax.random.key(0), progress=False, batch_size=2,
        privacy=abc_jax.DPSGD(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.3)),
         ValueError, ("batch_size", "Poisson samples", "drop batch_size")),
    case("patience-without-eval_data", train_with(patience=2), ValueError,
         "patience needs eval_data: early stopping watches the held-out loss"),
    case("T-vector-with-O-3", lambda: abc_jax.train(P, Batch(X, None, np.zeros(N)), **TRAIN),
         ValueError, ("T must have shape (N, O) = (6, 3)", "got (6,)")),  # O > 1: no broadcast
    case("train_many-T-vector-with-O-3", lambda: abc_jax.train_many(
        P, Batch(X, None, np.zeros((2, N))), **TRAIN), ValueError, ("T", "(6, 3)")),
    case("eval_data-without-targets", lambda: abc_jax.train(
        P, Batch(X, None, np.zeros((N, O))), eval_data=X, **TRAIN), ValueError,
         "eval_data: the training batch has targets T and eval_data has none"),
    case("eval_data-with-targets", train_with(eval_data=Batch(X, None, np.zeros((N, O)))),
         ValueError,
         "eval_data: eval_data has targets T and the training batch has none"),
]


@pytest.mark.parametrize("call,error,message", TRAIN_RULES)
def test_a_bad_training_argument_is_named(call, error, message):
    raises_before_compiling(call, error, message)


def test_training_always_checks_values():
    assert not edge.values_checked()
    with pytest.raises(ValueError, match=exactly(
            "X must be finite: it holds 1 NaN/inf value(s), first X[2, 3] is nan") + "$"):
        abc_jax.train(P, with_value(X, (2, 3), np.nan), **TRAIN)
