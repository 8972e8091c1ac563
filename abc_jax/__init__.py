"""abc_jax: one hand-derived backpropagation, checked, benchmarked and trained at scale.

The graph (one sample x (D,), A, B (H, D), C (O, H))::

    y = A x,  u = sigmoid(y),  v = B x,  z = u + v,  w = C z,  L = ||w||^2
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
from abc_jax.graph import draw_graph
from abc_jax.model import Params, Residuals, batch_loss, forward, init_params, loss, sigmoid
from abc_jax.oracles import fd_grad, grad_errors, oracle_grad
from abc_jax.parallel import (
    ShardedBatch,
    data_mesh,
    initialize_distributed,
    shard_batch,
    shard_local_batch,
)
from abc_jax.training import DivergenceError, TrainResult, train, train_per_sample

__all__ = [
    "DataError",
    "DivergenceError",
    "Params",
    "Residuals",
    "ShardedBatch",
    "TrainResult",
    "abc_loss",
    "batch_grad",
    "batch_loss",
    "batch_value_and_grad",
    "data_mesh",
    "draw_graph",
    "fd_grad",
    "forward",
    "grad_errors",
    "init_params",
    "initialize_distributed",
    "load_data",
    "loss",
    "manual_grad",
    "manual_vjp",
    "oracle_grad",
    "per_sample_grads",
    "shard_batch",
    "shard_local_batch",
    "sigmoid",
    "train",
    "train_per_sample",
]
