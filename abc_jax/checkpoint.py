"""Training checkpoints: one .npz per run, written whole, refused when it does not match.

A checkpoint holds what lets ``train`` continue exactly where it stopped::

    state_<i>    the leaves of the training loop's state after ``epoch`` epochs
    epoch        () int, epochs completed
    losses       (M, epoch) the loss of every epoch so far, for M members
    settings     the run's settings as a JSON string
    extra_<k>    further arrays of the run's history (held-out losses), if any
    model_<F>    F = A, B, C (M, ...): the params the run offers a user (``model_params``)
    diverged_at  (M,) int: each member's first non-finite epoch, -1 if none

It is written whole (``atomic.write_npz``): a killed run leaves the previous
checkpoint or the new one. Loading compares the stored settings with the
caller's and raises ``ValueError`` naming each difference. The data and the
initial parameters enter the settings through ``fingerprint``, moments computed
on the devices: no data travels to one host, and the same rows laid out
differently still match.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abc_jax import parallel
from abc_jax.atomic import write_npz

FORMAT = 4  # 4: the loop's state with evaluation, the model's params by name
FILENAME = "checkpoint.npz"
_RTOL = 1e-5  # fingerprints are sums: another device layout changes their rounding


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or written for another run.

    ``.path``: the file; ``.settings``: the names of the settings that differ (empty for
    an unreadable file).
    """

    def __init__(self, message: str, path: Path, settings: list[str]):
        super().__init__(message)
        self.path, self.settings = path, settings

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.path, self.settings)


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory) / FILENAME


@jax.jit
def _moments(a: jax.Array, weights: jax.Array | None) -> jax.Array:
    a = a.astype(jnp.float32).reshape(a.shape[0], -1)
    r = jnp.ones(a.shape[0], a.dtype) if weights is None else weights.astype(a.dtype)
    cols = jnp.arange(1, a.shape[1] + 1, dtype=a.dtype)
    return jnp.stack([jnp.sum(r), r @ a.sum(1), r @ (a * a).sum(1), r @ (a @ cols)])


def fingerprint(a: jax.Array, weights: jax.Array | None = None) -> list[float]:
    """Four device-computed moments of the rows of ``a`` weighted by ``weights``.

    sum r_i, sum r_i sum_j a_ij, sum r_i sum_j a_ij^2 and sum r_i sum_j j a_ij:
    enough to tell other data or other initial params from these, blind to
    the order of rows and to padding (weight 0).
    """
    return [float(v) for v in _moments(a, weights)]


def save_checkpoint(directory: str | os.PathLike[str], *, state: Any, epoch: int,
                    losses: Any, settings: dict[str, Any],
                    extra: dict[str, Any] | None = None, model: Any = None,
                    diverged_at: Any = None) -> Path:
    """Write the checkpoint of ``epoch`` completed epochs, atomically; ``model``: the params
    (M, ...) that ``model_params`` gives back (the run's result so far)."""
    arrays = {f"state_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(state))}
    if model is not None:
        arrays |= {f"model_{f}": np.asarray(a) for f, a in zip("ABC", model, strict=True)}
    if diverged_at is not None:
        arrays["diverged_at"] = np.asarray(diverged_at, np.int64)
    arrays |= {f"extra_{k}": np.asarray(v) for k, v in (extra or {}).items()}
    arrays |= {"epoch": np.int64(epoch), "losses": np.asarray(losses),
               "settings": np.array(json.dumps(settings | {"format": FORMAT}))}
    return write_npz(checkpoint_path(directory), **arrays)


def restore(directory: str | os.PathLike[str], *, like: Any, settings: dict[str, Any],
            epochs: int) -> tuple[Any, int, np.ndarray, dict[str, Any]] | None:
    """``(state, epoch, losses, extra)`` from the checkpoint in ``directory``, or None.

    losses: (epoch,), or (M, epoch) for the M members of ``train_many``.

    ``like`` is this run's state (structure, leaf shapes and dtypes to match).
    Process 0 reads the file and sends it to the others: all resume or raise alike.

    Raises:
      CheckpointError (a ValueError): the file is unreadable, or was written for another
        run (the message and ``.settings`` name each difference).
      ValueError: it ran more than this run's ``epochs``.
    """
    path = checkpoint_path(directory)
    raw = None
    if parallel.is_main_process() and path.exists():
        try:
            raw = path.read_bytes()
        except OSError:
            raw = b""
    raw = parallel.broadcast_bytes(raw)
    if raw is None:
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            stored = json.loads(str(f["settings"]))
            epoch, losses = int(f["epoch"]), np.asarray(f["losses"])
            count = sum(k.startswith("state_") for k in f.files)
            leaves = [np.asarray(f[f"state_{i}"]) for i in range(count)]
            extra = {k[6:]: np.asarray(f[k]) for k in f.files if k.startswith("extra_")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"unreadable checkpoint {path} ({e or 'empty'}): delete it to "
                              "start over, or write this run's checkpoints elsewhere", path,
                              []) from None
    diffs = _differences(stored, json.loads(json.dumps(settings | {"format": FORMAT})))
    like_leaves = jax.tree.leaves(like)
    if [(a.shape, a.dtype) for a in leaves] != [(a.shape, a.dtype) for a in like_leaves]:
        diffs.append("state: the stored arrays differ in number, shape or dtype")
    if losses.ndim not in (1, 2) or losses.shape[-1] != epoch:
        diffs.append(f"losses: shape {losses.shape} does not match epoch = {epoch}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written for a different run and is not "
                              f"loaded ({'; '.join(diffs)}): write this run's checkpoints "
                              "elsewhere, or delete it to start over", path,
                              [d.split(":")[0] for d in diffs])
    if epoch > epochs:
        raise ValueError(f"epochs = {epochs} is fewer than the {epoch} epochs the "
                         f"checkpoint in {directory} already ran")
    state = jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(a) for a in leaves])
    return state, epoch, losses, extra


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One entry per setting that differs, ``name: saved -> now`` (fingerprints, beyond
    rounding: ``name: other values``)."""
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if k.endswith("fingerprint") and a is not None and b is not None and np.shape(a) == \
                np.shape(b) and np.allclose(a, b, rtol=_RTOL, atol=1e-6):
            continue
        if a != b:
            what = "other values" if k.endswith("fingerprint") else f"{a} -> {b}"
            out.append(f"{k}: {what}")
    return out


def model_params(arrays: dict[str, np.ndarray], path: Any) -> dict[str, np.ndarray]:
    """A, B, C of one model from a checkpoint's ``arrays`` (as ``np.load`` gives them): the
    params its run returns (the best held-out ones with patience, else the last finite).

    Raises ValueError for a checkpoint of several members or of an older format.
    """
    settings = json.loads(str(arrays["settings"]))
    if settings.get("format") != FORMAT or "model_A" not in arrays:
        raise ValueError(f"{path} is a checkpoint of an older abc_jax (format "
                         f"{settings.get('format')}, this one reads {FORMAT}): train again, or "
                         "load its params.npz")
    if settings.get("M", 1) != 1:
        raise ValueError(f"{path} is a checkpoint of {settings['M']} members (train_many): "
                         "load_params reads one model's params")
    return {f: arrays[f"model_{f}"][0] for f in "ABC"}


def checkpoint_epoch(directory: str | os.PathLike[str]) -> int:
    """Epochs completed by the checkpoint in ``directory`` (0 if none or unreadable)."""
    try:
        with np.load(checkpoint_path(directory), allow_pickle=False) as f:
            return int(f["epoch"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0
