"""How a run trains: one frozen, checked configuration.

``TrainConfig`` holds every knob of the compiled loop and of the host pipeline
around it. It is checked when it is made (a wrong type or value is a named
error before anything compiles) and never changes after; ``train``,
``train_many``, ``train_per_sample`` and ``cross_validate`` all build one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from abc_jax import edge
from abc_jax.core.update import gd_update
from abc_jax.engine.privacy import DPSGD

GRADS = ("manual", "oracle")
EVERY = 100  # the default cadence of chunks, evaluations and checkpoints, in epochs


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The knobs of a run.

    optimizer: an ``optax.GradientTransformation``, or None for the hand-rolled
      rule p <- p - lr * g (``gradient_descent``; lr is then an argument of the run).
    grad: "manual" (the hand derivation) or "oracle" (``jax.grad``).
    batch_size: None for full-batch epochs, else ceil(n / b) shuffled mini-batches.
    chunk_size: rows per step of the gradient's contraction (memory), None: all.
    precision: matmul precision (None: abc_jax's ``"highest"``).
    epochs_per_chunk: epochs per compiled call between two returns to the host.
    eval_every: epochs between evaluations (held-out loss, callbacks, patience);
      there is one at epoch 0 and one at the last epoch too.
    checkpoint_every: epochs between checkpoints (and one at the last epoch).
    patience: stop a member once this many evaluations in a row did not lower
      its held-out loss, keeping its best params; None: never.
    privacy: a ``DPSGD`` for private training (``engine.privacy``), None: plain. It
      takes the manual per-row gradients, its own sampling (no batch_size); the
      optimizer gets the noisy gradient only (no value or value_fn: not L-BFGS).

    chunk_size, precision and epochs_per_chunk are speed knobs: a resumed run
    may change them. The others define the run.
    """

    optimizer: Any = None
    grad: str = "manual"
    batch_size: int | None = None
    chunk_size: int | None = None
    precision: str | None = None
    epochs_per_chunk: int = EVERY
    eval_every: int = EVERY
    checkpoint_every: int = EVERY
    patience: int | None = None
    privacy: DPSGD | None = None

    def __post_init__(self) -> None:
        opt = self.optimizer
        if opt is not None and not all(callable(getattr(opt, f, None)) for f in ("init", "update")):
            raise TypeError("optimizer must be an optax.GradientTransformation (init and update), "
                            f"got {type(opt).__name__}")
        if self.grad not in GRADS:
            raise ValueError(f"grad must be one of {GRADS}, got {self.grad!r}")
        checked = {
            "batch_size": edge.check_positive_int(self.batch_size, "batch_size", allow_none=True),
            "chunk_size": edge.check_positive_int(self.chunk_size, "chunk_size", allow_none=True),
            "precision": edge.check_precision(self.precision),
            "patience": edge.check_positive_int(self.patience, "patience", allow_none=True),
            **{f: edge.check_positive_int(getattr(self, f), f)
               for f in ("epochs_per_chunk", "eval_every", "checkpoint_every")}}
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        self.check_privacy()

    def check_privacy(self) -> None:
        """The private mode against the other knobs: a named error where they contradict."""
        p = self.privacy
        if p is None:
            return
        if not isinstance(p, DPSGD):
            raise TypeError(f"privacy must be an abc_jax.DPSGD or None, got {type(p).__name__}")
        if self.batch_size is not None:
            raise ValueError("privacy and batch_size contradict: DP-SGD samples its own batches "
                             f"(Poisson, sampling_rate={p.sampling_rate}); leave batch_size None")
        if self.grad != "manual":
            raise ValueError("privacy clips the manual per-row gradients: grad must be "
                             f"'manual', got {self.grad!r}")

    def static(self, n_rows: int) -> dict[str, Any]:
        """The compiled chunk's static arguments (``engine.loop.run_chunk``)."""
        opt = self.optimizer
        return dict(update=gd_update if opt is None else opt.update,
                    extra=isinstance(opt, optax.GradientTransformationExtraArgs),
                    grad=self.grad, length=self.epochs_per_chunk, batch_size=self.batch_size,
                    n_rows=n_rows if self.batch_size else 0, chunk_size=self.chunk_size,
                    precision=self.precision,
                    private_steps=0 if self.privacy is None else self.privacy.steps_per_epoch)

    def boundary(self, epoch: int, epochs: int) -> int:
        """The next epoch after ``epoch`` at which the host must act: an evaluation, a
        checkpoint or the end."""
        return min(epochs, *((epoch // k + 1) * k for k in (self.eval_every,
                                                            self.checkpoint_every)))
