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

from abc_jax import ShardedBatch, batch_grad, batch_loss, init_params, oracle_grad  # noqa: E402
from abc_jax.training import train  # noqa: E402

ROWS = (600, 401)
D, H, O = 5, 7, 3
X = np.random.default_rng(0).standard_normal((sum(ROWS), D))
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


assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
Xg = parallel.shard_local_batch(mine)

# the global batch: rows in process order, padding only at the end, none on the host
assert isinstance(Xg, ShardedBatch) and Xg.shape == (1001, D) and Xg.X.shape == (1004, D)
assert not Xg.X.is_fully_addressable
for shard in Xg.X.addressable_shards:
    start = shard.index[0].start
    expected = np.zeros((251, D))
    rows = X[start : start + 251]
    expected[: len(rows)] = rows
    np.testing.assert_array_equal(np.asarray(shard.data), expected)

whole = parallel.shard_batch(X)  # the whole batch given to every process also works
differences = {
    "batch_grad": rel(batch_grad(params, Xg), batch_grad(params, X)),
    "batch_grad, whole X on every process": rel(batch_grad(params, whole),
                                                batch_grad(params, X)),
    "batch_grad chunked": rel(batch_grad(params, Xg, chunk_size=64), batch_grad(params, X)),
    "oracle_grad": rel(oracle_grad(params, Xg), oracle_grad(params, X)),
    "batch_loss": rel(batch_loss(params, Xg), batch_loss(params, X)),
}
full = dict(lr=0.05, epochs=300, progress=False)
many, one = train(params, Xg, **full), train(params, X, **full)
assert float(many.losses[-1]) < 0.01 * float(many.losses[0])  # it really trained
differences["train 300 epochs: params"] = rel(many.params, one.params)
differences["train 300 epochs: losses"] = rel(many.losses, one.losses)

mini = dict(lr=0.01, epochs=12, batch_size=128, key=jax.random.key(3),
            optimizer=optax.adam(0.01), progress=False)
many_mini, one_mini = train(params, Xg, **mini), train(params, X, **mini)
differences["mini-batches, adam: params"] = rel(many_mini.params, one_mini.params)
differences["mini-batches, adam: losses"] = rel(many_mini.losses, one_mini.losses)

# a resume: process 0 writes and reads the checkpoint; process 1's folder stays empty
ckpt = OUT / f"checkpoint-{PROCESS_ID}"
train(params, Xg, **full | dict(epochs=120), checkpoint_dir=ckpt, epochs_per_chunk=50)
assert (ckpt / "checkpoint.npz").exists() == (PROCESS_ID == 0)
resumed = train(params, Xg, **full, checkpoint_dir=ckpt, epochs_per_chunk=50)
differences["train resumed at epoch 120: params"] = rel(resumed.params, many.params)

# processes that disagree are told so, on every process, instead of hanging
try:
    train(params, Xg, **full | dict(lr=0.05 + 0.01 * PROCESS_ID))
    raise AssertionError("different lr on the two processes was not refused")
except ValueError as e:
    assert "lr (process 1)" in str(e), e
try:
    parallel.shard_local_batch(mine[:, : D - PROCESS_ID])
    raise AssertionError("different D on the two processes was not refused")
except ValueError as e:
    assert "D (columns)" in str(e), e
try:  # bad rows on one process: an error on both, not a wait
    parallel.shard_local_batch(mine if PROCESS_ID == 0 else mine[0])
    raise AssertionError("a 1-D X on process 1 was not refused")
except ValueError as e:
    assert ("rows of process 1" if PROCESS_ID == 0 else "shape (n, D)") in str(e), e

if PROCESS_ID == 0:
    (OUT / "differences.json").write_text(json.dumps(differences, indent=1))
print("ok", json.dumps(differences), flush=True)
