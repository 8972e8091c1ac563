"""A training run with checkpoints, run as a subprocess that the resume test kills midway.

``python tests/train_worker.py DIR [many|private]`` trains the fixed problem below with
its checkpoint in DIR (``many``: three members of ``train_many`` with held-out data and
patience each; ``private``: DP-SGD at q = 0.3 with held-out data and patience). The test
imports this file for the same problem and settings, so the killed-and-resumed run and the
uninterrupted one agree on everything but the interruption.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

jax.config.update("jax_enable_x64", True)

from abc_jax import DPSGD, Batch, init_params, train, train_many  # noqa: E402

EPOCHS = 1000  # 100 chunks: the kill lands a few chunks in, long before the end
EPOCHS_PER_CHUNK = 10


def run(checkpoint_dir: str | None, many: bool = False, private: bool = False) -> Any:
    """Mini-batches with a partial last batch and a stateful optimizer: all of it must resume.
    ``many``: members, each with its own lr, held-out loss, best params and patience;
    ``private``: DP-SGD's sampling and noise from the key, with held-out data and patience."""
    params = init_params(jax.random.key(0), 4, 6, 3, dtype=jnp.float64)
    X = jax.random.normal(jax.random.key(1), (10, 4), jnp.float64)
    if private:
        T = jnp.sin(X[:, :3])
        held = jax.random.normal(jax.random.key(2), (30, 4), jnp.float64)
        return train(
            params, Batch(X, T=T), epochs=EPOCHS, optimizer=optax.adam(0.01),
            key=jax.random.key(7), progress=False, checkpoint_dir=checkpoint_dir,
            epochs_per_chunk=EPOCHS_PER_CHUNK, checkpoint_every=10, patience=200,
            eval_data=Batch(held, T=jnp.sin(held[:, :3])),
            privacy=DPSGD(clip_norm=0.5, noise_multiplier=0.3, sampling_rate=0.3))
    if many:
        T = jnp.sin(X[:, :3])
        held = Batch(jax.random.normal(jax.random.key(2), (30, 4), jnp.float64), None, None)
        return train_many(
            params, Batch(X, T=T), lr=jnp.array([0.002, 0.01, 0.05]), epochs=EPOCHS,
            batch_size=4, key=jax.random.key(7), progress=False, checkpoint_dir=checkpoint_dir,
            epochs_per_chunk=EPOCHS_PER_CHUNK, eval_every=10, checkpoint_every=10, patience=40,
            eval_data=held._replace(T=jnp.sin(held.X[:, :3])))
    return train(
        params, X, epochs=EPOCHS, optimizer=optax.sgd(0.02, momentum=0.9),
        batch_size=4, key=jax.random.key(7), progress=False, checkpoint_dir=checkpoint_dir,
        epochs_per_chunk=EPOCHS_PER_CHUNK,
    )


if __name__ == "__main__":
    run(sys.argv[1], many=sys.argv[2:] == ["many"], private=sys.argv[2:] == ["private"])
