"""DP-SGD as one training step: per-row clipping, Poisson sampling, Gaussian noise, accounting.

``private(DPSGD(clip_norm=c, noise_multiplier=sigma, sampling_rate=q))`` is the step
(``engine.steps.Step``); ``train(..., privacy=DPSGD(...))`` is its short form. Step s
of epoch e, for a member with key k, rows x_i of weight r_i (N rows, n of them with r_i > 0)::

    k_s  = fold_in(fold_in(k, e), s)
    m_i  = bernoulli(fold_in(k_s, 0), q, (N,))[i]          Poisson sampling, 0/1
    G    = sum_i m_i min(1, c / ||g_i||) g_i               g_i = r_i dL_i/dp (row i's
                                                           gradient, weight included)
    xi_P = normal(fold_in(fold_in(k_s, 1), j), P.shape)    j = 0, 1, 2 for A, B, C
    g~   = (G + sigma c xi) / (q n)                        divided by the expected batch
    u, s' = optimizer.update(g~, s, p);  p <- p + u         (hand-rolled rule or Optax)

Poisson sampling is a 0/1 mask on the row weights: every step is a pass over all N
rows with static shapes, so every q, c and sigma runs in one compilation (c and
sigma are data, one per member in ``train_many``). The clipped sum is
``norms.clipped_rows_sum``: the clip factors act as row weights before the three
contractions, no per-sample gradient is formed. An epoch is S = max(1, round(1 / q))
steps, one expected pass over the rows. The loss reported for epoch e is the
non-private full-batch ``batch_loss(p_e, X)`` before its first step (as ``train``'s),
read from that step's own pass. Padding rows (r_i = 0) are never counted in n.

Privacy: the noisy gradients are the Poisson-subsampled Gaussian mechanism of noise
multiplier sigma (sensitivity c: one row changes G by at most c) composed over the
steps run; epsilon at delta (default 1 / n) comes from ``dp-accounting``'s RDP
accountant (add-or-remove-one neighbours). It covers the params as released by the
noisy steps only: the reported losses, held-out evaluation, patience, callbacks and
the divergence check read the data outside the mechanism.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from abc_jax import edge
from abc_jax.core import backward, norms
from abc_jax.core.model import Batch, Params
from abc_jax.engine import arguments, steps

SAMPLINGS = ("poisson",)
INSTALL = 'pip install -e ".[privacy]"'


class PrivacyAccountingError(ImportError):
    """The private mode needs ``dp-accounting`` for its epsilon; it is not installed."""


def accounting() -> Any:
    """The ``dp_accounting`` module (with its ``rdp`` accountant), or a named ImportError."""
    try:
        import dp_accounting
        from dp_accounting import rdp  # noqa: F401  (the subpackage, loaded)
    except ImportError as err:
        raise PrivacyAccountingError(
            f"private training (privacy=DPSGD(...)) accounts its epsilon with Google's "
            f"dp-accounting, which is not installed: {INSTALL} (or pip install "
            f"dp-accounting)") from err
    return dp_accounting


class PrivacyArrays(NamedTuple):
    """A run's DP-SGD knobs as data, each (M,) (one member: scalars inside the loop)."""

    clip_norm: jax.Array  # c
    noise_multiplier: jax.Array  # sigma
    sampling_rate: jax.Array  # q


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGD:
    """Private training by DP-SGD (module docstring: the step, the sampling, the accounting).

    clip_norm: c > 0, the bound on each row's gradient norm (over A, B, C together).
    noise_multiplier: sigma >= 0; the noise on each parameter entry has std sigma c
      before the division by q n. Both may be arrays (M,) in ``train_many`` (one per
      member, as data: a privacy sweep is one compiled loop).
    sampling_rate: q in (0, 1], each row's probability to be in a step (Poisson).
    sampling: "poisson" (the only one).
    delta: the delta of the reported epsilon, in (0, 1); None: 1 / n.
    """

    clip_norm: Any
    noise_multiplier: Any
    sampling_rate: float
    sampling: str = "poisson"
    delta: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, str) or self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        q = edge.check_finite_float(self.sampling_rate, "sampling_rate", positive=True)
        if q > 1:
            raise ValueError(f"sampling_rate must be in (0, 1] (a probability), got {q}")
        if self.delta is not None:
            d = edge.check_finite_float(self.delta, "delta", positive=True)
            if d >= 1:
                raise ValueError(f"delta must be in (0, 1), got {d}")
            object.__setattr__(self, "delta", d)
        object.__setattr__(self, "sampling_rate", q)
        per_member = arguments.per_member
        object.__setattr__(self, "clip_norm", per_member(self.clip_norm, "clip_norm", 0, True))
        object.__setattr__(self, "noise_multiplier",
                           per_member(self.noise_multiplier, "noise_multiplier", 0, False))

    @property
    def steps_per_epoch(self) -> int:
        """S = max(1, round(1 / q)): one expected pass over the rows."""
        return max(1, round(1 / self.sampling_rate))

    def settings(self) -> dict[str, Any]:
        """What identifies the private run, for its checkpoint."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def for_epsilon(cls, epsilon: float, *, delta: float, sampling_rate: float, epochs: int,
                    clip_norm: Any) -> DPSGD:
        """The DP-SGD whose noise multiplier spends ``epsilon`` at ``delta`` over ``epochs``.

        sigma is the smallest noise multiplier (to 1e-6) whose epsilon, by the same RDP
        accountant as the reported one, is at most ``epsilon`` for epochs x
        ``steps_per_epoch`` Poisson-sampled steps at rate ``sampling_rate``
        (``dp_accounting.calibrate_dp_mechanism``, Brent's method); epsilon inf: sigma 0.
        ``delta`` is kept as the reported epsilon's. A run of fewer epochs (early stopping,
        divergence) spends less. dp-accounting's warnings of the RDP orders it leaves out
        are summarised in one warning, naming their count.

        Raises ValueError for epsilon <= 0 or NaN, delta outside (0, 1), epochs < 1, or
        the checks of ``DPSGD`` itself (sampling_rate, clip_norm).
        """
        if isinstance(epsilon, (bool, np.bool_)) or not isinstance(
                epsilon, (int, float, np.integer, np.floating)):
            raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__} "
                            f"{epsilon!r}")
        if not float(epsilon) > 0:
            raise ValueError(f"epsilon must be > 0 (inf: no noise), got {epsilon!r}")
        if delta is None:
            raise ValueError("delta is required: the epsilon targeted is at this delta (1 / n "
                             "is a common choice, n the rows)")
        epochs = edge.check_int(epochs, "epochs", minimum=1)
        plan = cls(clip_norm=clip_norm, noise_multiplier=0.0, sampling_rate=sampling_rate,
                   delta=delta)
        if isinstance(plan.clip_norm, tuple):
            raise ValueError(f"clip_norm: for_epsilon makes one DPSGD, give one number, got "
                             f"{list(plan.clip_norm)}")
        if math.isinf(epsilon):
            return plan
        steps = epochs * plan.steps_per_epoch
        sigma = noise_for_epsilon(float(epsilon), plan.sampling_rate, steps, plan.delta)
        return dataclasses.replace(plan, noise_multiplier=sigma)


def noise_for_epsilon(epsilon: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The smallest sigma (to 1e-6) with ``epsilon(sigma, q, steps, delta) <= epsilon``, by
    ``dp_accounting.calibrate_dp_mechanism`` with fresh ``RdpAccountant``s.

    dp-accounting logs a warning for each fractional RDP order it fails to compute (many,
    at the small sigmas the search tries) and leaves that order out; they are not shown.
    Leaving out orders only loosens the bound, and only matters when the best order kept at
    the sigma found is the next one above those left out (a left-out order might have given
    a smaller epsilon): then one warning says so, with their count.
    """
    dp = accounting()

    def mechanism(sigma: float) -> Any:
        return dp.SelfComposedDpEvent(
            dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(sigma)), int(steps))

    left_out: list[logging.LogRecord] = []

    def hide(record: logging.LogRecord) -> bool:
        left_out.append(record)
        return False

    log = logging.getLogger("absl")  # dp-accounting's logger
    log.addFilter(hide)
    try:
        sigma = float(dp.calibrate_dp_mechanism(dp.rdp.RdpAccountant, mechanism, epsilon,
                                                delta))
        left_out.clear()  # the search's; now those of the sigma found
        _, order = dp.rdp.RdpAccountant().compose(mechanism(sigma)).get_epsilon_and_optimal_order(
            delta)
    finally:
        log.removeFilter(hide)
    alphas = [float(r.args[-1]) for r in left_out if isinstance(r.args, tuple) and r.args]
    kept = [o for o in dp.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
            if o > max(alphas, default=-np.inf)]
    if left_out and (not alphas or not kept or order <= min(kept)):
        warnings.warn(f"dp-accounting left out {len(left_out)} RDP order(s) it could not compute "
                      f"at noise multiplier {sigma:.6g}, next to the best order kept ({order:g}):"
                      " a left-out one might give a smaller epsilon, so this sigma may be "
                      "noisier than the target needs (it is private at least as asked)",
                      RuntimeWarning, stacklevel=3)
    return sigma


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (RDP accountant).

    ``RdpAccountant()`` composed with ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``
    ``steps`` times; 0 steps: 0; sigma = 0: inf.
    """
    if steps == 0:
        return 0.0
    dp = accounting()
    log = logging.getLogger("absl")  # it warns of each fractional order it leaves out,
    level = log.level  # in compose as in get_epsilon
    log.setLevel(logging.ERROR)
    try:
        acc = dp.rdp.RdpAccountant()
        acc.compose(dp.PoissonSampledDpEvent(sampling_rate,
                                             dp.GaussianDpEvent(noise_multiplier)), int(steps))
        return float(acc.get_epsilon(delta))
    finally:
        log.setLevel(level)


def spent(privacy: DPSGD, epochs: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epsilon (M,), delta (M,)) of members that ran ``epochs`` (M,) epochs of S steps on
    ``rows`` (M,) rows of non-zero weight (delta: the given one, else 1 / n)."""
    M = len(epochs)
    sigma = np.broadcast_to(np.asarray(privacy.noise_multiplier, np.float64), (M,))
    delta = np.broadcast_to(np.asarray(privacy.delta if privacy.delta is not None
                                       else 1.0 / np.asarray(rows, np.float64)), (M,))
    steps = np.asarray(epochs, np.int64) * privacy.steps_per_epoch
    seen: dict[tuple[float, int, float], float] = {}  # a sweep repeats its settings
    for k in zip(sigma.tolist(), steps.tolist(), delta.tolist(), strict=True):
        if k not in seen:
            seen[k] = epsilon(k[0], privacy.sampling_rate, k[1], k[2])
    eps = [seen[k] for k in zip(sigma.tolist(), steps.tolist(), delta.tolist(), strict=True)]
    return np.asarray(eps, np.float64), np.array(delta, np.float64)


# --- the compiled step -----------------------------------------------------------------


class MaskedRows(NamedTuple):
    """A batch with its step's 0/1 sampling mask, so ``chunked_sum`` slices all four."""

    X: jax.Array  # (N, D)
    weights: jax.Array | None  # (N,) r_i, or None (all 1)
    T: jax.Array | None  # (N, O)
    mask: jax.Array  # (N,) m_i in {0, 1}


def masked_sums(params: Params, rows: MaskedRows, clip_norm: Any) -> tuple[jax.Array, Params]:
    """(sum_i r_i L_i over every row, sum_i m_i f_i g_i): one pass over rows (N,).

    The loss is of all rows (the mask only weights the gradient); g_i = r_i dL_i/dp,
    f_i = min(1, c / ||g_i||), grads of shapes (H, D), (H, D), (O, H).
    """
    X, r, T, m = rows
    rw = backward.rows(params, Batch(X, m if r is None else r * m, T))
    sq = rw.E * rw.E  # (O, N)  the loss doesn't depend on the weights: E = W - T
    loss = jnp.sum(sq) if r is None else jnp.sum(sq * r[None, :])
    return loss, norms.clipped_rows_sum(rw, clip_norm)




def noise(key: jax.Array, params: Params) -> Params:
    """Standard normal entries shaped like params: leaf j from ``fold_in(key, j)``."""
    return Params(*(jax.random.normal(jax.random.fold_in(key, j), p.shape, p.dtype)
                    for j, p in enumerate(params)))


class PrivateState(NamedTuple):
    """The state of the private step: the update rule's and the member's knobs (data)."""

    inner: Any
    knobs: PrivacyArrays  # each ()


def private_update(update: Any, chunk_size: int | None, params: Params, state: PrivateState,
                   batch: Batch, key: jax.Array) -> tuple[jax.Array, Params, PrivateState]:
    """One DP-SGD step with key k_s (module docstring): (full-batch loss at p, p', s').

    batch: X (N, D), weights (N,) or None, T (N, O) or None; the knobs c, sigma, q scalars.
    """
    X, r = batch.X, batch.weights
    N, dtype, priv = X.shape[0], X.dtype, state.knobs
    n = jnp.asarray(N, dtype) if r is None else jnp.sum(r > 0).astype(dtype)
    weight = jnp.asarray(N, dtype) if r is None else jnp.sum(r)
    m = jax.random.bernoulli(jax.random.fold_in(key, 0), priv.sampling_rate, (N,)).astype(dtype)
    loss, G = backward.chunked_sum(lambda b: masked_sums(params, b, priv.clip_norm),
                                   MaskedRows(X, r, batch.T, m),
                                   backward.rows_per_chunk(chunk_size, params, batch))
    scale, denom = priv.noise_multiplier * priv.clip_norm, priv.sampling_rate * n
    grads = jax.tree.map(lambda g, xi: (g + scale * xi) / denom, G,
                         noise(jax.random.fold_in(key, 1), params))
    updates, inner = update(grads, state.inner, params)
    return loss / weight, optax.apply_updates(params, updates), state._replace(inner=inner)


@functools.cache
def private_epoch(update: Any, chunk_size: int | None, S: int) -> Any:
    """The epoch of ``private``: S DP-SGD steps (``lax.scan``), step s with
    ``fold_in(key, s)`` (key: the epoch's, ``fold_in(k, e)``); the loss is the full
    batch's before the first step."""
    def epoch(params: Params, state: PrivateState, batch: Batch, key: jax.Array,
              rows: int) -> tuple[jax.Array, Params, PrivateState]:
        del rows

        def one(carry: Any, s: jax.Array) -> tuple[Any, jax.Array]:
            loss, p, o = private_update(update, chunk_size, *carry, batch,
                                        jax.random.fold_in(key, s))
            return (p, o), loss

        (params, state), losses = lax.scan(one, (params, state), jnp.arange(S))
        return losses[0], params, state

    return epoch


@functools.cache
def private_init(init_rule: Any) -> Any:
    """The private step's init: the update rule's state and the member's knobs (data)."""
    def init(params: Params, hyper: dict[str, jax.Array]) -> PrivateState:
        dtype = params.A.dtype
        return PrivateState(init_rule(params, hyper), PrivacyArrays(*(
            jnp.asarray(hyper[f"privacy.{f}"], dtype) for f in PrivacyArrays._fields)))

    return init


def private(privacy: DPSGD, optimizer: Any = None, *, lr: Any = None,
            chunk_size: int | str | None = "auto") -> steps.Step:
    """DP-SGD (module docstring) as a training step: each epoch S = max(1, round(1 / q))
    private updates ``(u, s') = optimizer.update(g~, s, p)`` (None: p <- p - lr g~, lr a
    number or (M,)). The optimizer gets the noisy gradient alone: one that needs value or
    value_fn (``optax.lbfgs()``) is refused. The result reports epsilon at delta, and q.
    Needs ``dp-accounting`` (``pip install -e ".[privacy]"``) and a key.
    """
    if not isinstance(privacy, DPSGD):
        raise TypeError(f"privacy must be an abc_jax.DPSGD, got {type(privacy).__name__}")
    if steps.needs_value(steps.check_optimizer(optimizer)):
        raise ValueError("privacy: DP-SGD passes the optimizer the noisy gradient only, but "
                         f"optimizer {type(optimizer).__name__} (e.g. optax.lbfgs()) needs the "
                         "loss's value and value_fn too: use a first-order optimizer "
                         "(optax.sgd, optax.adam) or drop privacy")
    accounting()  # no run without its epsilon
    chunk_size = edge.check_chunk_size(chunk_size)
    init_rule, update, hyper, settings = steps.rule(optimizer, lr)
    knobs = {f"privacy.{f}": getattr(privacy, f)
             for f in ("clip_norm", "noise_multiplier", "sampling_rate")}

    def report(epochs: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        eps, delta = spent(privacy, epochs, rows)
        return {"epsilon": eps, "delta": delta, "sampling_rate": privacy.sampling_rate}

    return steps.Step(private_init(init_rule),
                      private_epoch(update, chunk_size, privacy.steps_per_epoch),
                      hyper=hyper | knobs, draws="Poisson samples and noise",
                      settings={**settings, "privacy": privacy.settings()}, report=report)
