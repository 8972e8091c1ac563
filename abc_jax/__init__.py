"""abc_jax: one hand-derived backpropagation, checked, benchmarked and trained at scale.

The graph (one sample x (D,), A, B (H, D), C (O, H))::

    y = A x,  u = sigmoid(y),  v = B x,  z = u + v,  w = C z,  L = ||w - t||^2

Layers, each a module: ``model`` (params, batch, forward, loss) -> ``backward``
(the hand-derived VJP and its batch contraction; ``tangents``, the hand-derived
JVP beside it) -> ``oracles`` (jax.grad and finite differences) -> ``loop``
(the compiled epochs and the update rule) -> ``training`` (the host pipeline:
checks, checkpoints, hooks; ``population``: many models in one loop, ``members``
its arguments' member axis) -> ``parallel`` (devices and processes);
``validation``, ``checkpoint``, ``files``, ``data`` and ``graph`` serve them.
"""

from abc_jax.backward import (
    abc_loss,
    batch_grad,
    batch_value_and_grad,
    manual_grad,
    manual_vjp,
    per_sample_grads,
)
from abc_jax.data import DataError, load_data
from abc_jax.files import load_params, save_params
from abc_jax.graph import draw_graph
from abc_jax.loop import gradient_descent
from abc_jax.model import (
    Batch,
    Params,
    Residuals,
    batch_loss,
    forward,
    init_params,
    loss,
    predict,
    sigmoid,
)
from abc_jax.oracles import fd_grad, grad_errors, oracle_grad
from abc_jax.parallel import data_mesh, initialize_distributed, shard_batch, shard_local_batch
from abc_jax.population import TrainManyResult, train_many, train_per_sample
from abc_jax.tangents import abc_loss_jvp, batch_jvp, jvp_grad, manual_jvp
from abc_jax.training import DivergenceError, TrainResult, train

__all__ = [
    "Batch", "DataError", "DivergenceError", "Params", "Residuals", "TrainManyResult",
    "TrainResult", "abc_loss", "abc_loss_jvp", "batch_grad", "batch_jvp", "batch_loss",
    "batch_value_and_grad", "data_mesh", "draw_graph", "fd_grad", "forward", "grad_errors",
    "gradient_descent", "init_params", "initialize_distributed", "jvp_grad", "load_data",
    "load_params", "loss", "manual_grad", "manual_jvp", "manual_vjp", "oracle_grad",
    "per_sample_grads", "predict", "save_params", "shard_batch", "shard_local_batch", "sigmoid",
    "train", "train_many", "train_per_sample",
]
