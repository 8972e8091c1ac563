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
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import io
from abc_jax.model import Params

FORMAT = 1
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
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["settings"]))
            epoch = int(f["epoch"])
            losses = np.asarray(f["losses"])
            param_arrays = [np.asarray(f[name]) for name in "ABC"]
            leaves = [np.asarray(f[f"opt_state_{i}"]) for i in range(int(f["n_opt_state"]))]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"checkpoint_dir holds an unreadable checkpoint {path} ({e}); "
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
