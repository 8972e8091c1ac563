"""Training checkpoints: one .npz per run, written whole, refused when it does not match.

A checkpoint holds the state that lets ``train`` continue exactly where it
stopped::

    A, B, C          the parameters after ``epoch`` epochs
    opt_state_<i>    the optimizer state, flattened with ``jax.tree.leaves``
    epoch            () int, epochs completed
    losses           (epoch,) the loss of every epoch so far
    settings         the call's settings as a JSON string

The file is written through ``abc_jax.io.write_npz`` (temporary file, then
rename), so a run killed at any moment leaves either the previous checkpoint
or the new one, never half of one. Loading compares the stored settings with
the caller's and raises ``ValueError`` on any difference: a checkpoint is
never loaded into a run it was not written for.

``run_settings`` describes a ``train`` call; its data and initial-parameter
fingerprints are computed on the devices (``fingerprint``), so sharded data,
even spread over several processes, never travels to one host. With several
processes only process 0 reads and writes the file: ``restore`` sends what
it read to the others.
"""

from __future__ import annotations

import functools
import io as bytes_io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from abc_jax import files as io
from abc_jax import parallel
from abc_jax.model import Params

FORMAT = 2  # 2: device-computed fingerprints (data_checksum, init_checksum)
FILENAME = "checkpoint.npz"


class Checkpoint(NamedTuple):
    """A loaded checkpoint."""

    params: Params  # A (H, D), B (H, D), C (O, H) after `epoch` epochs
    opt_state: Any  # the optimizer state, same tree as optimizer.init(params)
    epoch: int  # epochs completed
    losses: np.ndarray  # (epoch,)
    settings: dict[str, Any]


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory) / FILENAME


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(settings, sort_keys=True))


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    params: Params,
    opt_state: Any,
    epoch: int,
    losses: Any,
    settings: dict[str, Any],
) -> Path:
    """Write the checkpoint of ``epoch`` completed epochs, atomically.

    Args:
      directory: created if missing; the file is ``directory/checkpoint.npz``.
      params: ``Params(A (H, D), B (H, D), C (O, H))``.
      opt_state: any pytree of arrays (``optimizer.init(params)``'s structure).
      epoch: epochs completed.
      losses: (epoch,) losses so far.
      settings: JSON-serialisable description of the run; ``load_checkpoint``
        refuses the file unless the caller's settings are equal.
    """
    arrays: dict[str, Any] = {name: np.asarray(p) for name, p in zip("ABC", params, strict=True)}
    leaves = jax.tree.leaves(opt_state)
    arrays |= {f"opt_state_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["n_opt_state"] = np.int64(len(leaves))
    arrays["epoch"] = np.int64(epoch)
    arrays["losses"] = np.asarray(losses)
    arrays["settings"] = np.array(json.dumps(_normalise(settings) | {"format": FORMAT}))
    return io.write_npz(checkpoint_path(directory), **arrays)


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    params_like: Params,
    opt_state_like: Any,
    settings: dict[str, Any],
) -> Checkpoint | None:
    """Read ``directory/checkpoint.npz`` if it exists and matches this run.

    Args:
      directory: where ``save_checkpoint`` wrote.
      params_like: parameters of the run (shapes and dtype are checked).
      opt_state_like: ``optimizer.init(params)`` of the run: gives the tree
        structure, leaf shapes and dtypes the stored leaves must have.
      settings: the run's settings; every key must equal the stored one.

    Returns:
      The ``Checkpoint``, or None if there is no file.

    Raises:
      ValueError: the file is unreadable, or was written for other settings,
        shapes or dtypes (the message names each difference).
    """
    path = checkpoint_path(directory)
    raw = _read(path)
    if raw is None:
        return None
    return _parse(raw, path, params_like, opt_state_like, settings)


def restore(
    directory: str | os.PathLike[str],
    *,
    params_like: Params,
    opt_state_like: Any,
    settings: dict[str, Any],
) -> Checkpoint | None:
    """``load_checkpoint`` for a job of one or several processes.

    Process 0 reads the file and sends its bytes to the others
    (``parallel.broadcast_bytes``), and every process checks and parses the
    same bytes: all resume from process 0's checkpoint, or all raise the same
    error. The other processes' filesystems are not read.
    """
    path = checkpoint_path(directory)
    raw = _read(path) if parallel.is_main_process() else None
    raw = parallel.broadcast_bytes(raw)
    if raw is None:
        return None
    return _parse(raw, path, params_like, opt_state_like, settings)


def _read(path: Path) -> bytes | None:
    """The file's bytes; None if there is none; b"" (unreadable) if it cannot be read."""
    if not path.exists():
        return None
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _parse(
    raw: bytes, path: Path, params_like: Params, opt_state_like: Any, settings: dict[str, Any]
) -> Checkpoint:
    try:
        with np.load(bytes_io.BytesIO(raw), allow_pickle=False) as f:
            stored = json.loads(str(f["settings"]))
            epoch = int(f["epoch"])
            losses = np.asarray(f["losses"])
            param_arrays = [np.asarray(f[name]) for name in "ABC"]
            leaves = [np.asarray(f[f"opt_state_{i}"]) for i in range(int(f["n_opt_state"]))]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"checkpoint_dir holds an unreadable checkpoint {path} ({e or 'empty'}); "
            "delete it or use another checkpoint_dir"
        ) from None

    wanted = _normalise(settings) | {"format": FORMAT}
    diffs = [
        f"{k}: checkpoint has {_describe(stored.get(k))}, this call has {_describe(wanted.get(k))}"
        for k in sorted(set(stored) | set(wanted))
        if stored.get(k) != wanted.get(k)
    ]
    like_leaves = jax.tree.leaves(opt_state_like)
    for name, a, like in zip("ABC", param_arrays, params_like, strict=True):
        if a.shape != like.shape or a.dtype != like.dtype:
            diffs.append(
                f"params.{name}: checkpoint has {a.dtype}{a.shape}, this call has "
                f"{like.dtype}{tuple(like.shape)}"
            )
    if [(a.shape, a.dtype) for a in leaves] != [(x.shape, x.dtype) for x in like_leaves]:
        diffs.append("optimizer state: the stored leaves differ in number, shape or dtype")
    if losses.shape != (epoch,):
        diffs.append(f"losses: shape {losses.shape} does not match epoch = {epoch}")
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written for a different run and is not loaded:\n  "
            + "\n  ".join(diffs)
            + "\nuse another checkpoint_dir, or delete the checkpoint to start over"
        )
    opt_state = jax.tree.unflatten(
        jax.tree.structure(opt_state_like), [jnp.asarray(a) for a in leaves]
    )
    params = Params(*(jnp.asarray(a) for a in param_arrays))
    return Checkpoint(params, opt_state, epoch, losses, stored)


def checkpoint_epoch(directory: str | os.PathLike[str]) -> int:
    """Epochs completed by the checkpoint in ``directory`` (0 if none or unreadable)."""
    path = checkpoint_path(directory)
    try:
        with np.load(path, allow_pickle=False) as f:
            return int(f["epoch"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0


# --- what identifies a run ---------------------------------------------------


def run_settings(
    params: Params,
    X: jax.Array,
    n_valid: int | None,
    opt_state: Any,
    *,
    lr: float,
    grad: str,
    batch_size: int | None,
    key: jax.Array | None,
    custom_optimizer: bool,
) -> dict[str, Any]:
    """The settings a checkpoint of ``train`` is written for and refused without.

    Speed and memory knobs (chunk_size, precision, epochs_per_chunk, the
    device or process count) are not in it: they may change across a resume.
    The data enter through their shape and ``fingerprint``, so the same rows
    split over other processes or devices match.
    """
    n = X.shape[0] if n_valid is None else n_valid
    if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {
        "N": n, "D": X.shape[1], "H": params.A.shape[0], "O": params.C.shape[0],
        "dtype": str(params.A.dtype), "lr": lr, "grad": grad, "batch_size": batch_size,
        "key": None if key is None else np.asarray(key).tolist(),
        "optimizer": "optax" if custom_optimizer else "gradient_descent",
        "opt_state": str(jax.tree.structure(opt_state)),
        "opt_state_leaves": [[list(a.shape), str(a.dtype)] for a in jax.tree.leaves(opt_state)],
        "data_checksum": fingerprint(X, n_rows=n),
        "init_checksum": "".join(fingerprint(p) for p in params),
    }


_LANES = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)  # four seeds: a 128-bit checksum


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that mixes every bit into every bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(a: jax.Array) -> jax.Array:
    """The bits of a 2-D array as uint32 words, one row of words per row of ``a``."""
    if a.dtype.itemsize == 2:
        return lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    if a.dtype.itemsize == 1:
        return lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.uint32)
    w = lax.bitcast_convert_type(a, jnp.uint32)  # (N, D) or, for 8-byte types, (N, D, 2)
    return w.reshape(a.shape[0], -1)


@functools.partial(jax.jit, static_argnames="n_rows")
def _checksum(a: jax.Array, n_rows: int | None = None) -> jax.Array:
    """(4,) uint32: for each seed, sum_e fmix(word_e ^ fmix(position_e ^ seed)) mod 2^32.

    A sum, so it runs where the data are and XLA adds the devices' parts
    (exact integers: the same for any sharding or process count); keyed by
    each word's position, so moved rows change it. Rows >= n_rows are left out.
    """
    words = _words(a)  # (N, K)
    N, K = words.shape
    row = jnp.arange(N, dtype=jnp.uint32)[:, None]
    position = row * np.uint32(K) + jnp.arange(K, dtype=jnp.uint32)[None, :]
    lanes = []
    for seed in _LANES:
        mixed = _fmix32(words ^ _fmix32(position ^ np.uint32(seed)))
        if n_rows is not None:
            mixed = jnp.where(row < n_rows, mixed, np.uint32(0))
        lanes.append(jnp.sum(mixed, dtype=jnp.uint32))
    return jnp.stack(lanes)


def fingerprint(a: jax.Array, n_rows: int | None = None) -> str:
    """A 128-bit checksum of a 2-D array's dtype, shape and bits, computed on its devices.

    Not cryptographic: it tells whether a checkpoint was written for these
    very numbers. Only four integers come back to the host, so X sharded over
    devices or processes is never gathered. ``n_rows`` counts only the first
    n_rows rows (the rest is padding) and stands for the shape's N.
    """
    a = jnp.asarray(a)
    n = a.shape[0] if n_rows is None else n_rows
    lanes = np.asarray(_checksum(a, n_rows=n_rows))
    return f"{a.dtype}({n},{a.shape[1]}):" + "".join(f"{int(x):08x}" for x in lanes)
