"""abc_jax: one hand-derived backpropagation, checked, benchmarked and trained at scale.

The graph (one sample x (D,), A, B (H, D), C (O, H))::

    y = A x,  u = sigmoid(y),  v = B x,  z = u + v,  w = C z,  L = ||w - t||^2

The package, by responsibility:

- ``core``: the mathematics, pure JAX with no checks, devices or files:
  ``model`` (forward, loss), ``backward`` (the hand-derived VJP and its batch
  contraction), ``tangents`` (the hand-derived JVP), ``norms`` (per-sample
  gradient norms, clipping), ``curvature`` (Gauss-Newton- and Hessian-vector
  products, the Gauss-Newton blocks), ``oracles`` (jax.grad, finite
  differences), ``update`` (the hand-rolled rule as an Optax transformation).
- ``edge``: what a user passes, checked once; values only on request
  (``value_checks()``).
- ``api``: the public array functions, each the edge plus one ``jax.jit``.
- ``engine``: the one training engine: a training method is a ``Step``
  (``gradient_step``, ``minibatches``, ``private``, ``levenberg_marquardt``), which one
  compiled loop runs for M members (``train_many``; ``train`` is one member).
- ``parallel`` (devices and processes), ``checkpoint``, ``files``, ``data``
  (results, params and data on disk) and ``graph`` (the picture) beside them;
  ``preprocessing`` (standardised data and a constant column, stored with the params).
- ``sklearn``: ``ABCRegressor``, a scikit-learn estimator (``import abc_jax.sklearn``;
  scikit-learn is an optional extra, not imported by ``import abc_jax``).
"""

from abc_jax.api import (
    abc_loss,
    abc_loss_jvp,
    batch_grad,
    batch_jvp,
    batch_loss,
    batch_value_and_grad,
    clipped_batch_grad,
    fd_grad,
    forward,
    ggn_vp,
    grad_errors,
    hvp,
    init_params,
    jvp_grad,
    loss,
    manual_grad,
    manual_jvp,
    manual_vjp,
    oracle_grad,
    per_sample_grad_norms,
    per_sample_grads,
    predict,
)
from abc_jax.core.model import Batch, Params, Residuals, sigmoid
from abc_jax.core.update import gradient_descent
from abc_jax.data import DataError, load_data
from abc_jax.edge import value_checks
from abc_jax.engine.privacy import DPSGD, PrivacyAccountingError, private
from abc_jax.engine.second_order import levenberg_marquardt
from abc_jax.engine.steps import Step, gradient_step, minibatches
from abc_jax.engine.train import (
    DivergenceError,
    TrainManyResult,
    TrainResult,
    train,
    train_many,
    train_per_sample,
)
from abc_jax.engine.validation import cross_validate
from abc_jax.files import load_params, load_preprocessing, save_params, save_preprocessing
from abc_jax.graph import draw_graph
from abc_jax.parallel import data_mesh, initialize_distributed, shard_batch, shard_local_batch
from abc_jax.preprocessing import (
    Preprocessing,
    apply_preprocessing,
    fit_preprocessing,
    undo_preprocessing,
)

__all__ = [
    "DPSGD", "Batch", "DataError", "DivergenceError", "Params", "Preprocessing",
    "PrivacyAccountingError", "Residuals", "Step", "TrainManyResult", "TrainResult",
    "abc_loss", "abc_loss_jvp", "apply_preprocessing", "batch_grad", "batch_jvp", "batch_loss",
    "batch_value_and_grad", "clipped_batch_grad", "cross_validate", "data_mesh", "draw_graph",
    "fd_grad", "fit_preprocessing", "forward", "ggn_vp", "grad_errors", "gradient_descent",
    "gradient_step", "hvp", "init_params", "initialize_distributed", "jvp_grad",
    "levenberg_marquardt", "load_data", "load_params", "load_preprocessing", "loss",
    "manual_grad", "manual_jvp", "manual_vjp", "minibatches", "oracle_grad",
    "per_sample_grad_norms", "per_sample_grads", "predict", "private", "save_params",
    "save_preprocessing", "shard_batch", "shard_local_batch", "sigmoid", "train", "train_many",
    "train_per_sample", "undo_preprocessing", "value_checks",
]
