"""A training run with checkpoints, run as a subprocess that the resume test kills midway.

``python tests/train_worker.py DIR`` trains the fixed problem below with its
checkpoint in DIR. The test imports this file for the same problem and
settings, so the killed-and-resumed run and the uninterrupted one agree on
everything but the interruption.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

jax.config.update("jax_enable_x64", True)

from abc_jax import TrainResult, init_params, train  # noqa: E402

EPOCHS = 3000
EPOCHS_PER_CHUNK = 10


def run(checkpoint_dir: str | None) -> TrainResult:
    """Mini-batches with a partial last batch and a stateful optimizer: all of it must resume."""
    params = init_params(jax.random.key(0), 4, 6, 3, dtype=jnp.float64)
    X = jax.random.normal(jax.random.key(1), (10, 4), jnp.float64)
    return train(
        params, X, epochs=EPOCHS, optimizer=optax.sgd(0.02, momentum=0.9),
        batch_size=4, key=jax.random.key(7), progress=False, checkpoint_dir=checkpoint_dir,
        epochs_per_chunk=EPOCHS_PER_CHUNK,
    )


if __name__ == "__main__":
    run(sys.argv[1])
