"""One process of a real two-process job, run by test_distributed.py.

    python tests/distributed_worker.py PORT PROCESS_ID OUT_DIR

Each process makes the same 1001 rows, keeps only its own (600 for process
0, 401 for process 1), builds the global batch with ``shard_local_batch`` and
checks it against one process on all the rows, which it can compute too on
its own devices. Process 0 writes the measured differences to
OUT_DIR/differences.json; every failed check raises, so the exit code says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from abc_jax import parallel

PORT, PROCESS_ID, OUT = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
parallel.initialize_distributed(f"127.0.0.1:{PORT}", 2, PROCESS_ID, heartbeat_timeout=10,
                                initialization_timeout=60)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from abc_jax import (  # noqa: E402
    Batch,
    batch_grad,
    batch_loss,
    batch_value_and_grad,
    init_params,
    oracle_grad,
    train,
)

ROWS = (600, 401)
D, H, O = 5, 7, 3
PER_DEVICE = 300  # max(ceil(600 / 2), ceil(401 / 2)) rows on each of the 4 devices
X = np.random.default_rng(0).standard_normal((sum(ROWS), D))
W = np.random.default_rng(1).uniform(0.5, 2.0, sum(ROWS))  # importance weights, all > 0
T = np.random.default_rng(2).standard_normal((sum(ROWS), O))  # targets
first = sum(ROWS[:PROCESS_ID])
mine = X[first : first + ROWS[PROCESS_ID]]
params = init_params(jax.random.key(0), D, H, O, dtype=jnp.float64)


def rel(a, b) -> float:
    """max |a - b| / max |b| over the leaves of two pytrees."""
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / np.max(np.abs(y))))
    return out


def expect_error(call, kind, text, what):
    try:
        call()
    except kind as e:
        assert text in str(e), e
    else:
        raise AssertionError(f"{what} was not refused")


assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
Xg = parallel.shard_local_batch(mine)

# The global batch: each process's rows on its own devices, padded locally with zero
# rows of weight 0 to 300 rows a device; no row travels between the processes.
assert isinstance(Xg, Batch) and Xg.X.shape == (4 * PER_DEVICE, D), Xg.X.shape
assert Xg.weights.shape == (4 * PER_DEVICE,) and not Xg.X.is_fully_addressable
local = np.zeros((2 * PER_DEVICE, D))
local[: len(mine)] = mine
for xs, ws in zip(Xg.X.addressable_shards, Xg.weights.addressable_shards, strict=True):
    at = xs.index[0].start - 2 * PER_DEVICE * PROCESS_ID  # where in this process's rows
    assert ws.index[0].start == xs.index[0].start and 0 <= at < 2 * PER_DEVICE, at
    np.testing.assert_array_equal(np.asarray(xs.data), local[at : at + PER_DEVICE])
    np.testing.assert_array_equal(np.asarray(ws.data),
                                  np.arange(at, at + PER_DEVICE) < len(mine))

whole = parallel.shard_batch(X)  # the whole batch given to every process also works
weighted = parallel.shard_local_batch(Batch(mine, W[first : first + len(mine)]))
only_first = parallel.shard_local_batch(mine if PROCESS_ID == 0 else mine[:0])
targeted = parallel.shard_local_batch(Batch(mine, T=T[first : first + len(mine)]))
differences = {
    "batch_grad": rel(batch_grad(params, Xg), batch_grad(params, X)),
    "batch_grad, whole X on every process": rel(batch_grad(params, whole),
                                                batch_grad(params, X)),
    "batch_grad chunked": rel(batch_grad(params, Xg, chunk_size=64), batch_grad(params, X)),
    "batch_grad, importance weights": rel(batch_grad(params, weighted),
                                          batch_grad(params, Batch(X, W))),
    "batch_grad, targets": rel(batch_grad(params, targeted), batch_grad(params, Batch(X, T=T))),
    "batch_grad, process 1 without rows": rel(batch_grad(params, only_first),
                                              batch_grad(params, X[: ROWS[0]])),
    "batch_value_and_grad": rel(batch_value_and_grad(params, Xg), batch_value_and_grad(params, X)),
    "oracle_grad": rel(oracle_grad(params, Xg), oracle_grad(params, X)),
    "batch_loss": rel(batch_loss(params, Xg), batch_loss(params, X)),
    "jit(batch_loss)": rel(jax.jit(batch_loss)(params, Xg), batch_loss(params, X)),
}
full = dict(lr=0.05, epochs=40, progress=False, epochs_per_chunk=20)
many, one = train(params, Xg, **full), train(params, X, **full)
assert float(many.losses[-1]) < 0.5 * float(many.losses[0])  # it really trained
differences["train 40 epochs: params"] = rel(many.params, one.params)
differences["train 40 epochs: losses"] = rel(many.losses, one.losses)

# Mini-batches: a permutation of the 1001 real rows (7 batches of 128 and one of 105),
# the very batches one process draws, so a stateful optimizer follows the same path.
mini = dict(epochs=3, batch_size=128, key=jax.random.key(3),
            optimizer=optax.adam(0.01), progress=False)
many_mini, one_mini = train(params, Xg, **mini), train(params, X, **mini)
differences["mini-batches, adam: params"] = rel(many_mini.params, one_mini.params)
differences["mini-batches, adam: losses"] = rel(many_mini.losses, one_mini.losses)

# A resume: process 0 writes and reads the checkpoint; process 1's folder stays empty.
ckpt = OUT / f"checkpoint-{PROCESS_ID}"
train(params, Xg, **full | dict(epochs=20), checkpoint_dir=ckpt)
assert (ckpt / "checkpoint.npz").exists() == (PROCESS_ID == 0)
resumed = train(params, Xg, **full, checkpoint_dir=ckpt)
differences["train resumed at epoch 20: params"] = rel(resumed.params, many.params)

# Processes that disagree are told so, on every process, instead of hanging.
expect_error(lambda: train(params, Xg, **full | dict(lr=0.05 + 0.01 * PROCESS_ID)),
             ValueError, "lr (process 1)", "different lr on the two processes")
expect_error(lambda: parallel.shard_local_batch(mine[:, : D - PROCESS_ID]),
             ValueError, "must share D, dtype and targets", "different D on the two processes")
expect_error(lambda: parallel.shard_local_batch(
                 Batch(mine, T=T[first : first + len(mine)] if PROCESS_ID == 0 else None)),
             ValueError, "process 1: D=5, float64, no T", "targets on process 0 only")
expect_error(lambda: parallel.shard_local_batch(mine if PROCESS_ID == 0 else mine[0]),
             ValueError, "rows of process 1" if PROCESS_ID == 0 else "shape (N, D)",
             "a 1-D X on process 1")

if PROCESS_ID == 0:
    (OUT / "differences.json").write_text(json.dumps(differences, indent=1))
print("ok", json.dumps(differences), flush=True)
