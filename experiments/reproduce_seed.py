"""Reproduce the homework, K = 3: the loss listing, the gradient check, and its three answers.

  (a) plain gradient descent on one random x: the loss falling iteration by
      iteration, as the homework printed it (and the same loop on Python lists);
  (b) dL/dA, dL/dB, dL/dC by the manual backward pass, jax.grad and finite
      differences, side by side in float64 with their errors (the homework
      compared four decimals against PyTorch);
  (c) how much faster backprop is than finite differences and than the
      homework's plain-Python loops (a short run of bench_gradients.py);
  (d) why averaging per-sample solutions did not generalise (a short run of
      generalization.py);
  (e) the homework's own check, re-read from its printed numbers: PyTorch's
      gradients are the manual ones shrunk by ~1.1% and its loss by 2.8%, and
      one gradient-descent update is simulated to see whether it does that.

It ends with the three answers, stated from the numbers measured.

    python experiments/reproduce_seed.py
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # the gradient check is in float64

import _common  # noqa: E402
import bench_gradients  # noqa: E402
import generalization  # noqa: E402
import homework  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax import files as io  # noqa: E402
from abc_jax import train  # noqa: E402

NAME = "reproduce_seed"

# The homework's first listing (its own random x, A, B, C and learning rate).
HOMEWORK_LOSSES = (
    0.6405446478366267, 0.6227243743152856, 0.6054711582958173, 0.5887633523891213,
    0.5725803169288799, 0.556902363816204, 0.5417107039990863, 0.5269873983199291,
    0.5127153114862452, 0.4988780689394727, 0.485460016414952, 0.47244618200257604,
    0.45982224053267584, 0.4475744801254248, 0.43568977075459725, 0.42415553468797806,
    0.4129597186772421, 0.40209076777970915, 0.3915376007032291, 0.38128958657351764,
    0.3713365230306946, 0.3616686155686011, 0.3522764580367418, 0.3431510142304625,
    0.3342836005002956, 0.32566586931628994, 0.3172897937276602, 0.30914765266224875,
    0.3012320170141361, 0.2935357364712854, 0.2860519270383867, 0.2787739592130982,
    0.2716954467766908,
)


# -- (a) the loss listing ------------------------------------------------------------------


def loss_listing(
    k: int, epochs: int, lr: float, seed: int
) -> tuple[abc_jax.Params, jax.Array, dict[str, Any]]:
    """Gradient descent on one random x, by ``train`` and by the homework's Python loop.

    Returns (final params, x, record) where record holds both loss lists
    (``losses[e]`` is the loss before update e, as the homework printed it),
    their largest difference and the starting parameters (``params_start``).
    """
    kp, kx = jax.random.split(jax.random.key(seed))
    params0 = abc_jax.init_params(kp, k, dtype=jnp.float64)
    x = jax.random.normal(kx, (k,), jnp.float64)
    res = train(params0, x[None, :], lr=lr, epochs=epochs, progress=False)
    A, B, C, X = homework.to_lists(params0, x[None, :])
    py = homework.py_gradient_descent(A, B, C, X, lr, epochs)
    losses = np.asarray(res.losses, np.float64)
    record = {
        "losses": losses.tolist(),
        "python_losses": py,
        "max_abs_diff_python": float(np.max(np.abs(losses - np.asarray(py)))) if py else 0.0,
        "initial_loss": float(losses[0]) if epochs else None,
        "final_loss": float(abc_jax.loss(res.params, x)),
        "params_start": params0,
    }
    return res.params, x, record


def plot_listing(record: dict[str, Any], path: Any, lr: float) -> None:
    fig, ax = _common.figure(width=6.0, height=4.0)
    L = record["losses"]
    ax.plot(np.arange(len(L)), L, "-", color="C0", label=f"abc_jax.train (lr = {lr:g})")
    py = record["python_losses"]
    step = max(1, len(py) // 25)
    ax.plot(np.arange(0, len(py), step), py[::step], "o", ms=4, mfc="none", color="C1",
            label="the homework's loop on Python lists")
    ax.plot(np.arange(len(HOMEWORK_LOSSES)), HOMEWORK_LOSSES, "x", ms=4, color="gray",
            label="the homework's printed listing (its own x, A, B, C, lr)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (gradient-descent step)")
    ax.set_ylabel("loss L = ||w||² for one x [log]")
    ax.set_title("Plain gradient descent on one random x, K = 3", fontsize=10)
    ax.legend(fontsize=8)
    io.save_figure(path, fig, dpi=_common.DPI)


def plot_graph(
    params_start: abc_jax.Params, params_end: abc_jax.Params, x: jax.Array, path: Any,
    epochs: int, lr: float,
) -> None:
    """graph.png: the graph for x with its values and gradients, before (top) and after training."""
    import matplotlib.pyplot as plt

    fig = plt.figure()
    top, bottom = fig.subfigures(2, 1)
    for sub, p, when in ((top, params_start, "Before training"),
                         (bottom, params_end, f"After {epochs} steps of lr = {lr:g}")):
        abc_jax.draw_graph(p, x, fig=sub,
                           title=f"{when}: L = {float(abc_jax.loss(p, x)):.4g}")
    io.save_figure(path, fig, dpi=_common.DPI)


# -- (b) the gradient check ----------------------------------------------------------------


def gradient_check(params: abc_jax.Params, x: jax.Array) -> dict[str, Any]:
    """dL/d(A, B, C) at one x by four routes, float64, and their errors against jax.grad.

    Routes: ``manual_grad`` (the derivation), ``oracle_grad`` (jax.grad),
    ``fd_grad`` (central finite differences) and the homework-style Python
    backprop on lists. Errors are ``grad_errors``: per matrix, max |g - ref|
    and that over max |ref|.
    """
    X = x[None, :]
    grads = {
        "manual": abc_jax.manual_grad(params, x),
        "jax_grad": abc_jax.oracle_grad(params, X),
        "finite_diff": abc_jax.fd_grad(params, X),
    }
    A, B, C, Xl = homework.to_lists(params, X)
    py_loss, py_grads = homework.py_loss_and_grad(A, B, C, Xl)
    grads["python"] = abc_jax.Params(*(jnp.asarray(g) for g in py_grads))
    ref = grads["jax_grad"]
    errors = {m: abc_jax.grad_errors(g, ref) for m, g in grads.items() if m != "jax_grad"}
    worst = {m: max(e["rel"] for e in errs.values()) for m, errs in errors.items()}
    return {
        "loss": float(abc_jax.loss(params, x)), "python_loss": py_loss,
        "grads": grads, "errors": errors, "worst_rel": worst,
    }


def gradient_rows(check: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Every entry side by side, full precision: manual, jax.grad, finite differences, errors."""
    g = check["grads"]
    header = ["entry", "manual", "jax.grad", "finite diff.", "|manual-jax|", "|fd-jax|"]
    rows = []
    for name in abc_jax.Params._fields:
        man, ref, fd = (np.asarray(getattr(g[m], name)) for m in ("manual", "jax_grad",
                                                                   "finite_diff"))
        for (i, j), r in np.ndenumerate(ref):
            rows.append([f"dL/d{name}[{i},{j}]", repr(float(man[i, j])), repr(float(r)),
                         repr(float(fd[i, j])), float(abs(man[i, j] - r)),
                         float(abs(fd[i, j] - r))])
    return header, rows


def error_rows(check: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["vs jax.grad", "param", "max abs error", "relative error"]
    label = {"manual": "manual", "finite_diff": "finite diff.", "python": "Python lists"}
    rows = [[label[m], p, e["max_abs"], e["rel"]]
            for m, errs in check["errors"].items() for p, e in errs.items()]
    return header, rows


def print_matrices(check: dict[str, Any]) -> None:
    """The matrices as the homework printed them (nested lists), at full precision."""
    for name in abc_jax.Params._fields:
        for m, label in (("manual", "manual"), ("jax_grad", "jax.grad"),
                         ("finite_diff", "finite diff.")):
            mat = np.asarray(getattr(check["grads"][m], name)).tolist()
            print(f"dL_d{name} ({label:12}) = {mat}")
        print()


# -- (c), (d) and the answers --------------------------------------------------------------


def timing(ks: Sequence[int], n: int, seed: int, budget_s: float, min_time: float) -> list[dict]:
    """bench_gradients.run_bench for the methods the homework could compare, float64."""
    return bench_gradients.run_bench(
        ks, n, ("batch_grad", "jax_grad", "fd_grad", "python_backprop", "python_fd"),
        dtype=jnp.float64, seed=seed, budget_s=budget_s, min_time=min_time,
    )


def answers(
    check: dict[str, Any], bench_rows: Sequence[dict[str, Any]], gen: dict[str, Any]
) -> list[str]:
    """The homework's three questions, answered from the measured numbers."""
    w = check["worst_rel"]
    ok = w["manual"] <= 1e-12
    manual = "0 (identical bits)" if w["manual"] == 0 else f"{w['manual']:.1e}"
    out = [
        "1. Is the hand-derived gradient right? "
        + ("Yes" if ok else "NO")
        + f": in float64 it matches jax.grad to a relative error of {manual} "
        f"(the homework's plain-Python loop: {w['python']:.1e}), and central finite "
        f"differences to {w['finite_diff']:.1e}, the error finite differences themselves make."
    ]
    by = {(r["K"], r["method"]): r for r in bench_rows}
    parts = []
    for K in dict.fromkeys(r["K"] for r in bench_rows):
        base = by.get((K, "batch_grad"), {}).get("median_s")
        if not base:
            continue
        ratios = [f"{m} {by[(K, m)]['ratio_to_batch_grad']:.3g}x"
                  for m in ("jax_grad", "fd_grad", "python_backprop", "python_fd")
                  if by.get((K, m), {}).get("ratio_to_batch_grad")]
        parts.append(f"at K = {K} (P = {bench_gradients.param_count(K)}) batch_grad takes "
                     f"{bench_gradients._fmt_time(base)} and the others take " + ", ".join(ratios))
    n = bench_rows[0]["N"] if bench_rows else 0
    out.append(f"2. How much faster is backprop? Per gradient over N = {n} samples, "
               + "; ".join(parts) + " as long.")
    fin, L0 = gen["final"], gen["initial"]["heldout_loss"]
    if "average" in fin and "batch_gd" in fin:
        a, g = fin["average"]["heldout_loss"], fin["batch_gd"]["heldout_loss"]
        cmp = (f"{a / g:.3g}x the held-out loss of batch GD" if a > g
               else "no worse than batch GD")
        out.append(
            f"3. Why did averaging not generalise? On held-out x the average of per-sample "
            f"solutions scores {a:.3g} (start {L0:.3g}: "
            f"{'better' if a < L0 else 'worse'} than not training), batch GD on the mean loss "
            f"{g:.3g}; the average has {cmp}."
        )
        own, single = gen.get("own_sample_loss"), gen.get("single_copy_heldout")
        if own is not None and single is not None:
            out[-1] += (
                f" A copy trained on one x reaches {own:.2g} on that x but {single:.3g} on "
                "held-out x: " + ("it fits its own sample, not the distribution, and the "
                                  "average of such fits is not a fit of the mean loss."
                                  if single > 10 * own else "it does carry over.")
            )
        if a > g:
            out[-1] += " Minimise the mean loss over all samples instead."
    else:
        out.append(f"3. A run diverged, no comparison: {gen['diverged']}")
    return out


# -- (e) the homework's own check, re-read -------------------------------------------------
#
# The homework's gradient check as its write-up printed it ("Observation and Discussion",
# part 1, right after the loss listing HOMEWORK_LOSSES), copied exactly: its manual gradients
# and loss in full precision, PyTorch's ("Gradient calculated using autograd") to the four
# decimals PyTorch printed. The write-up called the two "approximately same".

HOMEWORK_MANUAL_LOSS = 0.0048365386124306535
HOMEWORK_MANUAL_GRADS = {
    "A": ((-0.0006713625025565516, 0.0013139067848766854, 0.0018388094918960131),
          (0.0004449456167331362, -0.0008707919529324088, -0.0012186713143954573),
          (-0.0003845423355149779, 0.0007525781999760953, 0.0010532314418636164)),
    "B": ((-0.002701376393878583, 0.005286796267153462, 0.007398859089288121),
          (0.0017815141111817124, -0.003486556769437744, -0.004879428096018339),
          (-0.0015383229336941792, 0.0030106133902554895, 0.004213346442952265)),
    "C": ((-0.014336205554305061, -0.02904568811238444, -0.034179410889230925),
          (0.027282602131008832, 0.055275571307192434, 0.0650453328786807),
          (0.009420241315296222, 0.019085760883592165, 0.0224591017038348)),
}
HOMEWORK_TORCH_LOSS = 0.0047  # "Autograd L = tensor(0.0047, grad_fn=<PowBackward0>)"
HOMEWORK_TORCH_GRADS = {
    "A": ((-0.0007, 0.0013, 0.0018), (0.0004, -0.0009, -0.0012), (-0.0004, 0.0007, 0.0010)),
    "B": ((-0.0027, 0.0052, 0.0073), (0.0018, -0.0035, -0.0048), (-0.0015, 0.0030, 0.0041)),
    "C": ((-0.0142, -0.0287, -0.0338), (0.0270, 0.0546, 0.0643), (0.0093, 0.0189, 0.0222)),
}
TORCH_DECIMALS = 4
HALF_UNIT = 0.5 * 10.0**-TORCH_DECIMALS  # a 4-decimal print is within this of the value
RANK_TOL = 1e-6  # sigma_2 / sigma_1 below this counts as rank one (4 decimals resolve ~1e-3)


def factor_interval(manual: Any, torch: Any) -> list[float] | None:
    """The factors r with |r * manual - torch| <= HALF_UNIT for every entry: [lo, hi], or None.

    Each r in it makes r * manual print as ``torch`` at four decimals (up to
    ties): the uniform rescalings of the manual numbers that PyTorch's printed
    numbers cannot tell apart.
    """
    m, t = np.ravel(np.asarray(manual, np.float64)), np.ravel(np.asarray(torch, np.float64))
    a, b = (t - HALF_UNIT) / m, (t + HALF_UNIT) / m
    lo, hi = float(np.max(np.minimum(a, b))), float(np.min(np.maximum(a, b)))
    return [lo, hi] if lo <= hi else None


def reread_homework_check(
    manual: dict[str, Any] = HOMEWORK_MANUAL_GRADS,
    torch: dict[str, Any] = HOMEWORK_TORCH_GRADS,
    loss_manual: float = HOMEWORK_MANUAL_LOSS,
    loss_torch: float = HOMEWORK_TORCH_LOSS,
    listing: Sequence[float] = HOMEWORK_LOSSES,
) -> dict[str, Any]:
    """The printed check read side by side: ratios, rounding, rank, loss ratios.

    Per matrix: PyTorch / manual per entry (min, max), the entries that differ
    beyond 4-decimal rounding (|torch - round(manual, 4)| > HALF_UNIT), the
    least-squares factor sum(t m) / sum(m m), the factors consistent with every
    entry (``factor_interval``) and with each row, and the manual matrix's
    singular values and first right singular vector. A one-sample gradient is
    rank one, dA = gy x^T and dB = gz x^T sharing the direction of x, so the
    manual numbers obey the derivation when sigma_2 << sigma_1 and the two
    right vectors agree. The loss: PyTorch / manual (with the interval its
    two printed digits allow) and the listing's per-update ratio L[t+1] / L[t].
    """
    mats: dict[str, Any] = {}
    for name in abc_jax.Params._fields:
        m, t = np.asarray(manual[name], np.float64), np.asarray(torch[name], np.float64)
        ratio = t / m
        beyond = np.abs(t - np.round(m, TORCH_DECIMALS)) > HALF_UNIT + 1e-12
        _, s, vt = np.linalg.svd(m)
        v = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
        mats[name] = {
            "ratio": ratio, "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "beyond_rounding": beyond, "n_beyond_rounding": int(beyond.sum()),
            "fit_factor": float(np.sum(t * m) / np.sum(m * m)),
            "common_factor": factor_interval(m, t),
            "row_factors": [factor_interval(m[i], t[i]) for i in range(m.shape[0])],
            "singular_values": s, "rank_one": bool(s[1] <= RANK_TOL * s[0]),
            "right_vector": v,
        }
    # dA = diag(sigmoid'(y)) dB: each row of dA / dB is one number u (1 - u) <= 1/4
    slope = np.asarray(manual["A"], np.float64) / np.asarray(manual["B"], np.float64)
    L = np.asarray(listing, np.float64)
    steps = L[1:] / L[:-1]
    return {
        "matrices": mats,
        "sigmoid_slope_rows": slope.mean(axis=1),
        "sigmoid_slope_row_spread": float(np.max(np.ptp(slope, axis=1) / slope.mean(axis=1))),
        "rank_one": all(mm["rank_one"] for mm in mats.values()),
        "cos_right_AB": float(abs(mats["A"]["right_vector"] @ mats["B"]["right_vector"])),
        "loss_ratio": loss_torch / loss_manual,
        "loss_ratio_interval": [(loss_torch - HALF_UNIT) / loss_manual,
                                (loss_torch + HALF_UNIT) / loss_manual],
        "listing_step_ratio_median": float(np.median(steps)),
        "listing_step_ratio_range": [float(steps.min()), float(steps.max())],
        "n_entries": sum(mm["ratio"].size for mm in mats.values()),
        "n_beyond_rounding": sum(mm["n_beyond_rounding"] for mm in mats.values()),
    }


@jax.jit
def _one_update(params: abc_jax.Params, x: jax.Array, lr: Any) -> tuple[Any, ...]:
    """p1 = p - lr g(p): returns L(p), L(p1), g(p), g(p1) (manual gradients), z(p), z(p1)."""
    g = abc_jax.manual_grad(params, x)
    new = jax.tree.map(lambda p, gp: p - lr * gp, params, g)
    (L0, r0), (L1, r1) = abc_jax.forward(params, x), abc_jax.forward(new, x)
    return L0, L1, g, abc_jax.manual_grad(new, x), r0.z, r1.z


def one_update_loss_ratio(params: abc_jax.Params, x: jax.Array, lr: float) -> float:
    """L(p - lr g) / L(p) for one update of the homework's rule."""
    L0, L1, *_ = _one_update(params, x, lr)
    return float(L1 / L0)


def lr_for_loss_ratio(
    params: abc_jax.Params, x: jax.Array, target: float, iters: int = 60
) -> float:
    """The lr at which one update p <- p - lr g multiplies L by ``target`` (0 < target < 1).

    Deterministic: from the first-order guess (1 - target) L / ||g||^2, the
    upper end doubles until one update lowers L at least that much, then
    ``iters`` bisections of [0, upper] on the one-update loss ratio.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    g = abc_jax.manual_grad(params, x)
    sq = float(sum(jnp.vdot(a, a) for a in g))
    hi = (1.0 - target) * float(abc_jax.loss(params, x)) / sq
    for _ in range(60):
        if one_update_loss_ratio(params, x, hi) <= target:
            break
        hi *= 2.0
    else:
        raise ValueError(f"no lr lowers the loss by the factor {target} in one update")
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if one_update_loss_ratio(params, x, mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def simulate_one_update_later(
    params: abc_jax.Params, x: jax.Array, target: float
) -> dict[str, Any]:
    """The gradient at update t + 1 over the one at t, with lr set so that L falls by ``target``.

    What PyTorch would have printed, had it been given the parameters after
    one more update than the manual gradient saw. Per matrix: the entry ratios
    g_{t+1} / g_t (all of them, min, max, median); and the loss ratio and its
    square root (the factor of ||w||, hence of dC = 2 w z^T if z stood still),
    and the factor of ||z||.
    """
    lr = lr_for_loss_ratio(params, x, target)
    L0, L1, g0, g1, z0, z1 = _one_update(params, x, lr)
    ratios = {n: np.asarray(b) / np.asarray(a) for n, a, b in zip(
        abc_jax.Params._fields, g0, g1, strict=True)}
    return {
        "lr": lr, "loss": float(L0), "loss_next": float(L1), "loss_ratio": float(L1 / L0),
        "sqrt_loss_ratio": float(np.sqrt(L1 / L0)), "ratios": ratios,
        "z_norm_ratio": float(jnp.linalg.norm(z1) / jnp.linalg.norm(z0)),
        "grad_next": g1,
        "all_entries_shrink": bool(all(np.all((r > 0) & (r < 1)) for r in ratios.values())),
        **{f"d{n}_ratio_{f.__name__}": float(f(r)) for n, r in ratios.items()
           for f in (np.min, np.max, np.median)},
    }


def seed_scan(
    k: int, epochs: int, lr: float, seeds: Sequence[int], target: float
) -> list[dict[str, Any]]:
    """``simulate_one_update_later`` at the end of the loss-listing run of each seed.

    Each seed's x and parameters are drawn as ``loss_listing`` draws them and
    trained with ``train`` (float64, the homework's rule) for ``epochs``.
    """
    rows = []
    for seed in seeds:
        kp, kx = jax.random.split(jax.random.key(seed))
        params0 = abc_jax.init_params(kp, k, dtype=jnp.float64)
        x = jax.random.normal(kx, (k,), jnp.float64)
        params = train(params0, x[None, :], lr=lr, epochs=epochs, progress=False).params
        sim = simulate_one_update_later(params, x, target)
        rows.append({"seed": seed, **{key: v for key, v in sim.items()
                                      if key not in ("ratios", "grad_next")},
                     "homework_like": homework_like(sim)})
    return rows



SIGNATURE_BAND = 0.005  # dC ratios within this of sqrt(loss ratio): the homework's pattern


def homework_like(sim: dict[str, Any]) -> bool:
    """Every entry of dC shrank by sqrt(loss ratio) to within SIGNATURE_BAND, as in the homework.

    (The homework's nine dC entries fit one factor 0.9878-0.9887; the square
    root of its loss ratio, 0.961-0.982 from the printed 0.0047, is 0.980-0.991.)
    """
    r = sim["sqrt_loss_ratio"]
    return bool(sim["dC_ratio_min"] >= r - SIGNATURE_BAND
                and sim["dC_ratio_max"] <= r + SIGNATURE_BAND)


def reread_rows(hc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The re-read as a table: one column per gradient."""
    mats = hc["matrices"]

    def fmt(iv: list[float] | None) -> str:
        return "none" if iv is None else f"{iv[0]:.4f}-{iv[1]:.4f}"

    header = ["PyTorch vs manual"] + [f"dL/d{n}" for n in mats]
    rows = [
        ["PyTorch / manual, min"] + [f"{m['ratio_min']:.4f}" for m in mats.values()],
        ["PyTorch / manual, max"] + [f"{m['ratio_max']:.4f}" for m in mats.values()],
        ["one factor fitting all entries"] + [fmt(m["common_factor"]) for m in mats.values()],
        ["least-squares factor"] + [f"{m['fit_factor']:.4f}" for m in mats.values()],
        ["entries beyond 4-decimal rounding"]
        + [f"{m['n_beyond_rounding']} of {m['ratio'].size}" for m in mats.values()],
        ["manual: singular values"]
        + [" ".join(f"{v:.2g}" for v in m["singular_values"]) for m in mats.values()],
    ]
    return header, rows


def entry_rows(hc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Every printed entry: manual, PyTorch, the manual rounded to 4 decimals, the ratio."""
    header = ["entry", "manual", "pytorch", "manual_rounded", "ratio", "beyond_rounding",
              "ratio_lo", "ratio_hi"]
    rows = []
    for name in abc_jax.Params._fields:
        m = np.asarray(HOMEWORK_MANUAL_GRADS[name], np.float64)
        t = np.asarray(HOMEWORK_TORCH_GRADS[name], np.float64)
        beyond = hc["matrices"][name]["beyond_rounding"]
        for (i, j), mij in np.ndenumerate(m):
            lo, hi = sorted(((t[i, j] - HALF_UNIT) / mij, (t[i, j] + HALF_UNIT) / mij))
            rows.append([f"dL/d{name}[{i},{j}]", repr(float(mij)), float(t[i, j]),
                         float(np.round(mij, TORCH_DECIMALS)), float(t[i, j] / mij),
                         bool(beyond[i, j]), float(lo), float(hi)])
    return header, rows


def scan_rows(scan: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = ["seed", "L_t", "lr", "L ratio", "sqrt", "||z|| ratio", "dA ratios", "dB ratios",
              "dC ratios", "all shrink", "like the homework"]
    rows = [[r["seed"], f"{r['loss']:.3g}", f"{r['lr']:.3g}", f"{r['loss_ratio']:.4f}",
             f"{r['sqrt_loss_ratio']:.4f}", f"{r['z_norm_ratio']:.4f}",
             *(f"{r[f'd{n}_ratio_min']:.4f}-{r[f'd{n}_ratio_max']:.4f}" for n in "ABC"),
             "yes" if r["all_entries_shrink"] else "no",
             "yes" if r["homework_like"] else "no"] for r in scan]
    return header, rows


def plot_homework_check(hc: dict[str, Any], sim: dict[str, Any], path: Any) -> None:
    """PyTorch's printed gradients against the manual ones: the difference, and the ratio.

    Left: PyTorch - manual per entry against the manual value, with the band
    4-decimal rounding allows; y = x (same parameters) is the zero line, the
    one-update-later lines y = r x have slope r - 1 there (r: the one factor
    that fits dL/dC, and sqrt of the listing's per-update loss ratio, the factor
    of ||w||). Right: PyTorch / manual with its rounding interval, against
    |manual|, and the dL/dC ratios of one simulated update on this run.
    """
    fig, (ax, bx) = _common.figure(ncols=2, width=5.6, height=4.8)
    r_obs = float(np.mean(hc["matrices"]["C"]["common_factor"]
                          or [hc["matrices"]["C"]["fit_factor"]]))
    r_w = float(np.sqrt(hc["listing_step_ratio_median"]))  # ||w|| after one listed update
    style = {"A": ("o", "C0"), "B": ("s", "C1"), "C": ("^", "C2")}
    span = max(np.max(np.abs(HOMEWORK_MANUAL_GRADS["C"])), 1e-12) * 1.08
    line = np.linspace(-span, span, 2)
    ax.axhspan(-HALF_UNIT, HALF_UNIT, color="0.88", label="4-decimal rounding (±0.00005)")
    ax.plot(line, 0 * line, "-", color="0.3", lw=1, label="y = x (same parameters)")
    ax.plot(line, (r_obs - 1) * line, "--", color="C3", lw=1.2,
            label=f"y = {r_obs:.4f} x (one factor fits dL/dC)")
    ax.plot(line, (r_w - 1) * line, ":", color="C4", lw=1.5,
            label=f"y = {r_w:.4f} x (one listed update, w shrinks, z stays)")
    for name, (mk, col) in style.items():
        m = np.ravel(HOMEWORK_MANUAL_GRADS[name])
        t = np.ravel(HOMEWORK_TORCH_GRADS[name])
        ax.plot(m, t - m, mk, color=col, ms=6, mfc="none", mew=1.4, label=f"dL/d{name}")
        lo, hi = np.sort(np.stack([(t - HALF_UNIT) / m, (t + HALF_UNIT) / m]), axis=0)
        bx.errorbar(np.abs(m), t / m, yerr=[t / m - lo, hi - t / m], fmt=mk, color=col,
                    ms=6, mfc="none", mew=1.4, capsize=2, lw=0.8, label=f"dL/d{name}")
    ax.set_xlabel("manual gradient entry (16 digits)")
    ax.set_ylabel("PyTorch (printed to 4 decimals) - manual")
    ax.set_title("The difference is proportional to the entry", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    bx.set_xscale("log")
    bx.axhline(1.0, color="0.3", lw=1, label="1 (same parameters)")
    bx.axhline(r_obs, color="C3", ls="--", lw=1.2, label=f"{r_obs:.4f} (fits all of dL/dC)")
    bx.axhline(r_w, color="C4", ls=":", lw=1.5, label=f"{r_w:.4f} (one listed update, z stays)")
    bx.axhspan(sim["dC_ratio_min"], sim["dC_ratio_max"], color="C4", alpha=0.15,
               label=f"one update simulated on the project's run, dL/dC: "
                     f"{sim['dC_ratio_min']:.3f} to {sim['dC_ratio_max']:.3f}")
    bx.set_ylim(0.78, 1.07)
    bx.set_xlabel("|manual gradient entry| [log]")
    bx.set_ylabel("PyTorch / manual (bars: 4-decimal rounding)")
    bx.set_title(f"L: PyTorch / manual = {hc['loss_ratio']:.3f}; one listed update: "
                 f"{hc['listing_step_ratio_median']:.3f}", fontsize=10)
    bx.legend(fontsize=7, loc="lower right")
    fig.suptitle("The homework's gradient check re-read: PyTorch's numbers are the manual ones "
                 "shrunk by ~1.1%", fontsize=11)
    io.save_figure(path, fig, dpi=_common.DPI)


def homework_check_findings(
    hc: dict[str, Any], sim: dict[str, Any], scan: Sequence[dict[str, Any]]
) -> dict[str, str]:
    """What the numbers support, what the simulation shows, what they cannot decide."""
    C = hc["matrices"]["C"]
    rc, (llo, lhi) = C["common_factor"], hc["loss_ratio_interval"]
    sv = max(m["singular_values"][1] / m["singular_values"][0] for m in hc["matrices"].values())
    out = {"obeys": (
        f"The manual numbers obey the derivation: each gradient is rank one (sigma_2 / sigma_1 "
        f"<= {sv:.2g}), dL/dA and dL/dB share their right singular vector, the direction of x "
        f"(|cos| = {hc['cos_right_AB']:.15f}), and each row of dL/dA is that of dL/dB times "
        f"one number u(1 - u) <= 1/4 ("
        + ", ".join(f"{q:.4f}" for q in hc["sigmoid_slope_rows"]) + ")."
    )}
    fit = (f"one factor, {rc[0]:.4f}-{rc[1]:.4f}, reproduces all nine printed entries"
           if rc else "no single factor reproduces all nine")
    out["not_rounding"] = (
        f"PyTorch's numbers are not the manual ones rounded: {hc['n_beyond_rounding']} of "
        f"{hc['n_entries']} entries differ beyond 4-decimal rounding, all nine of dL/dC, whose "
        f"ratios PyTorch / manual are {C['ratio_min']:.4f}-{C['ratio_max']:.4f}: {fit}."
    )
    out["loss"] = (
        f"PyTorch's L is {hc['loss_ratio']:.3f} times the manual L ({llo:.3f}-{lhi:.3f} for the "
        f"printed 0.0047); one update of the homework's listing multiplies L by "
        f"{hc['listing_step_ratio_range'][0]:.4f}-{hc['listing_step_ratio_range'][1]:.4f} "
        f"(median {hc['listing_step_ratio_median']:.4f})."
    )
    if rc and rc[0] > lhi:
        out["loss"] += (
            f" A rescaled loss (a sum for a mean, say) would scale L and the gradients by one "
            f"factor; here dL/dC's factor is above L's, near its square root "
            f"({np.sqrt(llo):.3f}-{np.sqrt(lhi):.3f}), as when ||w|| = sqrt(L) shrinks and "
            f"z = u + v barely moves (dC = 2 w z^T)."
        )
    runs = [{**sim, "homework_like": homework_like(sim)}, *scan]
    like = sum(r["homework_like"] for r in runs)
    shrink = sum(r["all_entries_shrink"] for r in runs)
    out["simulated"] = (
        f"Simulated on the project's run (K = 3, float64, one update with lr = {sim['lr']:.3g} "
        f"found by bisection so that L falls by the listing's median factor, "
        f"{sim['loss_ratio']:.4f}): the dL/dC entries become {sim['dC_ratio_min']:.4f}-"
        f"{sim['dC_ratio_max']:.4f} times what they were (sqrt of the loss ratio: "
        f"{sim['sqrt_loss_ratio']:.4f}), dL/dA {sim['dA_ratio_min']:.4f}-"
        f"{sim['dA_ratio_max']:.4f}, dL/dB {sim['dB_ratio_min']:.4f}-{sim['dB_ratio_max']:.4f}"
        + f"; ||z|| changes by {sim['z_norm_ratio']:.4f}"
        + (" (the homework's pattern)." if homework_like(sim) else
           ": not the homework's pattern.")
        + (f" Over {len(runs)} runs (this seed and {len(scan)} more), {like} show the homework's "
           f"pattern (all nine dL/dC ratios within {SIGNATURE_BAND} of sqrt of the loss ratio) "
           f"and in {shrink} every entry of the three gradients shrinks: "
           + ("one update of this size can produce the printed pattern, and does not always."
              if like else "none of these updates produced the printed pattern.")
           if scan else "")
    )
    out["undecided"] = (
        "The printed numbers support the right derivation, with PyTorch given parameters about "
        "one update of the listing's size later than the manual gradient; they cannot prove "
        "it: the homework's x, A, B, C and lr are not printed, so which parameters PyTorch saw "
        "(one update later, or several smaller ones) cannot be recomputed, and the simulation "
        "shows only that such an update can give this pattern."
    )
    return out


def homework_check_sentence(hc: dict[str, Any]) -> str:
    """One sentence for the answer 'Is the derivation right?'."""
    C = hc["matrices"]["C"]
    return (
        f"The homework's own check was off by more than rounding, not by a wrong derivation: "
        f"PyTorch's dL/dC is {C['ratio_min']:.3f}-{C['ratio_max']:.3f} times the manual one "
        f"entry by entry and its L {hc['loss_ratio']:.3f} times, while the manual numbers are "
        f"exactly rank one as the derivation requires: consistent with PyTorch having been "
        f"given the parameters about one update later (one update multiplies L by "
        f"{hc['listing_step_ratio_median']:.3f} in the homework's listing), which the printed "
        f"numbers cannot prove."
    )


def homework_check_metrics(
    hc: dict[str, Any], sim: dict[str, Any], scan: Sequence[dict[str, Any]],
    findings: dict[str, str],
) -> dict[str, Any]:
    mats = hc["matrices"]
    return {
        "autograd_over_manual_min": mats["C"]["ratio_min"],
        "autograd_over_manual_max": mats["C"]["ratio_max"],
        "dC_common_factor": mats["C"]["common_factor"],
        "loss_ratio_printed": hc["loss_ratio"],
        "loss_ratio_interval": hc["loss_ratio_interval"],
        "listing_step_ratio_median": hc["listing_step_ratio_median"],
        "listing_step_ratio_range": hc["listing_step_ratio_range"],
        "manual_rank_one": hc["rank_one"],
        "cos_right_vectors_dA_dB": hc["cos_right_AB"],
        "sigmoid_slope_rows": hc["sigmoid_slope_rows"],
        "sigmoid_slope_row_spread": hc["sigmoid_slope_row_spread"],
        "n_beyond_rounding": {n: m["n_beyond_rounding"] for n, m in mats.items()},
        "per_matrix": {n: {k: m[k] for k in ("ratio_min", "ratio_max", "fit_factor",
                                              "common_factor", "row_factors",
                                              "singular_values")}
                       for n, m in mats.items()},
        "simulated_lr": sim["lr"],
        "simulated_loss_ratio": sim["loss_ratio"],
        "simulated_grad_ratio_min": sim["dC_ratio_min"],
        "simulated_grad_ratio_max": sim["dC_ratio_max"],
        "simulated": {k: v for k, v in sim.items() if k not in ("ratios", "grad_next")},
        "simulated_homework_like": homework_like(sim),
        "seed_scan": list(scan),
        "seeds_homework_like": sum(r["homework_like"] for r in scan),
        "findings": findings,
    }


def run_homework_check(
    params: abc_jax.Params, x: jax.Array, out: Any, *, k: int, epochs: int, lr: float,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """(e): re-read the printed check, simulate one update later, print, write CSV and figure.

    ``params``, ``x`` are the end of the loss-listing run (``k``, ``epochs``,
    ``lr``); ``seeds`` repeat the simulation at the end of other seeds' runs.
    Returns the metrics for metrics.json, with the answer's ``sentence``.
    """
    hc = reread_homework_check()
    target = hc["listing_step_ratio_median"]
    sim = simulate_one_update_later(params, x, target)
    scan = seed_scan(k, epochs, lr, seeds, target)
    findings = homework_check_findings(hc, sim, scan)
    print("\n(e) the homework's own check, re-read (its printed numbers: manual to 16 digits, "
          "PyTorch to 4 decimals):")
    header, rows = reread_rows(hc)
    _common.print_table(header, rows)
    print(f"L: PyTorch / manual = {hc['loss_ratio']:.4f} "
          f"({hc['loss_ratio_interval'][0]:.4f}-{hc['loss_ratio_interval'][1]:.4f} for the "
          f"printed 0.0047); the listing's L[t+1] / L[t]: median "
          f"{hc['listing_step_ratio_median']:.4f}, "
          f"{hc['listing_step_ratio_range'][0]:.4f}-{hc['listing_step_ratio_range'][1]:.4f}")
    others = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\none update later, simulated (K = {k}, float64, at the end of the run above"
          + (f" and of the runs of {others}" if len(seeds) else "")
          + f"; lr by bisection so that L falls by {target:.4f}):")
    sh, sr = scan_rows([{"seed": "this run", **sim, "homework_like": homework_like(sim)},
                        *scan])
    _common.print_table(sh, sr)
    print()
    for text in findings.values():
        print(text)
    eh, er = entry_rows(hc)
    io.write_csv(out / "homework_check.csv", eh, er)
    io.write_csv(out / "homework_check_simulated.csv", sh, sr)
    plot_homework_check(hc, sim, out / "homework_check.png")
    print(f"wrote {out}/homework_check.csv, homework_check_simulated.csv, homework_check.png")
    return {**homework_check_metrics(hc, sim, scan, findings),
            "sentence": homework_check_sentence(hc)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--k", type=int, default=3, help="K = D = H = O (default 3, the homework)")
    ap.add_argument("--epochs", type=int, default=500,
                    help="gradient-descent steps on the one x (default 500)")
    ap.add_argument("--lr", type=float, default=0.001,
                    help="learning rate (default 0.001: a slow, steady decrease like the "
                         "homework's listing)")
    ap.add_argument("--bench-k", type=int, default=32,
                    help="the moderate K of the timing answer (default 32)")
    ap.add_argument("--n", type=int, default=256, help="samples N for the timing (default 256)")
    ap.add_argument("--check-seeds", type=int, default=15,
                    help="other seeds on which (e) simulates one update later (default 15)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    gen_kw: dict[str, Any] = dict(n_train=256, n_test=1024, epochs=500)
    bench_kw: dict[str, Any] = dict(budget_s=3.0, min_time=0.1)
    if args.quick:
        args.epochs, args.bench_k, args.n, args.check_seeds = 20, 4, 16, 1
        gen_kw = dict(n_train=8, n_test=16, epochs=10, n_checkpoints=4)
        bench_kw = dict(budget_s=0.2, min_time=0.005)
    out = _common.out_dir(args.out)
    env = _common.environment(jnp.float64)
    print(f"{NAME}: K = {args.k}, seed {args.seed}, float64, {env['device']} "
          f"({env['cpu_count']} CPUs), jax {env['jax_version']}")

    # (a)
    params, x, rec = loss_listing(args.k, args.epochs, args.lr, args.seed)
    print(f"\n(a) plain gradient descent on one random x (lr = {args.lr:g}):")
    for L in rec["losses"][:8]:
        print(f"L = {L!r}")
    print(f"... {args.epochs} steps: L = {rec['losses'][0]:.6g} -> {rec['final_loss']:.6g}; "
          f"the same loop on Python lists differs by at most {rec['max_abs_diff_python']:.1e}")
    plot_listing(rec, out / "reproduce_loss.png", args.lr)
    plot_graph(rec["params_start"], params, x, out / "graph.png", args.epochs, args.lr)
    if args.docs is not None and not args.quick:  # a quick run copies only the key figure
        _common.docs_copy(out / "graph.png", args.docs)
    io.write_csv(out / "loss.csv", ["iteration", "loss", "loss_python_lists"],
                 zip(range(args.epochs), rec["losses"], rec["python_losses"], strict=True))

    # (b)
    check = gradient_check(params, x)
    print(f"\n(b) gradients at the trained parameters, same x: L = {check['loss']!r} "
          f"(Python lists: {check['python_loss']!r})\n")
    print_matrices(check)
    header, rows = gradient_rows(check)
    _common.print_table(header, rows, floatfmt=".1e")
    print()
    eh, er = error_rows(check)
    _common.print_table(eh, er, floatfmt=".2e")
    io.write_csv(out / "gradcheck.csv", header, rows)
    io.write_csv(out / "gradcheck_errors.csv", eh, er)

    # (c)
    print(f"\n(c) time per gradient, N = {args.n}, float64 (a short bench_gradients.py):")
    bench_rows = timing([args.k, args.bench_k], args.n, args.seed, **bench_kw)
    th, tr = bench_gradients.ratio_table(bench_rows)
    _common.print_table(th, tr, floatfmt=".3g")
    io.write_csv(out / "timing.csv", bench_gradients.CSV_FIELDS,
                 ([r.get(f) for f in bench_gradients.CSV_FIELDS] for r in bench_rows))
    bench_gradients.plot(bench_rows, out / "reproduce_timing.png",
                         title=f"N = {args.n}, float64, {env['device_kind']}")

    # (d)
    print(f"\n(d) averaging per-sample solutions vs training on the mean "
          f"(a short generalization.py, K = {args.k}):")
    gen = generalization.run_generalization(args.k, seed=args.seed, **gen_kw)
    gh, gr = generalization.summary_rows(gen)
    _common.print_table(gh, gr, floatfmt=".4g")
    generalization.plot(gen, out / "reproduce_generalization.png")
    io.write_csv(out / "generalization.csv", generalization.CURVE_FIELDS,
                 ([r[f] for f in generalization.CURVE_FIELDS] for r in gen["curves"]))

    # (e)
    hc = run_homework_check(params, x, out, k=args.k, epochs=args.epochs, lr=args.lr,
                            seeds=range(args.seed + 1, args.seed + 1 + args.check_seeds))

    text = answers(check, bench_rows, gen)
    text[0] += " " + hc["sentence"]
    print("\nAnswers:")
    for line in text:
        print(line)

    bench = bench_gradients.summarize(bench_rows)
    io.write_json(out / "config.json", {**vars(args), "out": str(args.out),
                                        "generalization": gen_kw, "bench": bench_kw})
    io.write_json(out / "metrics.json", {
        "environment": env,
        "loss_listing": {k: rec[k] for k in ("initial_loss", "final_loss",
                                             "max_abs_diff_python")},
        "gradient_check": {"loss": check["loss"], "worst_rel": check["worst_rel"],
                           "errors": check["errors"]},
        "timing": {"ratio_to_batch_grad": bench["ratio_to_batch_grad"],
                   "median_s": bench["median_s"]},
        "generalization": generalization.metrics(gen),
        "homework_check": {k: v for k, v in hc.items() if k != "sentence"},
        "answers": text,
    })
    if args.docs is not None:
        _common.docs_copy(out / "reproduce_loss.png", args.docs)
    if args.docs is not None and not args.quick:  # a quick run copies only the key figure
        _common.docs_copy(out / "homework_check.png", args.docs)
    print(f"\nwrote {out}/config.json, metrics.json, loss.csv, gradcheck.csv, "
          "gradcheck_errors.csv, timing.csv, generalization.csv, reproduce_loss.png, "
          "reproduce_timing.png, reproduce_generalization.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
