"""The homework's printed gradient check (manual gradients and loss to 16 digits, PyTorch's to 4
decimals: "approximately same") re-read from its numbers, and one update simulated. Every sentence
is a pure function of those numbers and the simulation; ``reproduce_seed.py`` runs it as (e)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from experiments import common

# The homework's first listing (its own random x, A, B, C and learning rate), as printed.
HOMEWORK_LOSSES = tuple(float(v) for v in """
0.6405446478366267 0.6227243743152856 0.6054711582958173 0.5887633523891213 0.5725803169288799
0.556902363816204 0.5417107039990863 0.5269873983199291 0.5127153114862452 0.4988780689394727
0.485460016414952 0.47244618200257604 0.45982224053267584 0.4475744801254248 0.43568977075459725
0.42415553468797806 0.4129597186772421 0.40209076777970915 0.3915376007032291 0.38128958657351764
0.3713365230306946 0.3616686155686011 0.3522764580367418 0.3431510142304625 0.3342836005002956
0.32566586931628994 0.3172897937276602 0.30914765266224875 0.3012320170141361 0.2935357364712854
0.2860519270383867 0.2787739592130982 0.2716954467766908""".split())

# Its gradient check as printed, one line per matrix row: the manual gradient in full precision,
# then PyTorch's ("Gradient calculated using autograd") to the four decimals printed.
_PRINTED = [line.split() for line in """
A -0.0006713625025565516 0.0013139067848766854 0.0018388094918960131   -0.0007 0.0013 0.0018
A 0.0004449456167331362 -0.0008707919529324088 -0.0012186713143954573  0.0004 -0.0009 -0.0012
A -0.0003845423355149779 0.0007525781999760953 0.0010532314418636164   -0.0004 0.0007 0.0010
B -0.002701376393878583 0.005286796267153462 0.007398859089288121      -0.0027 0.0052 0.0073
B 0.0017815141111817124 -0.003486556769437744 -0.004879428096018339    0.0018 -0.0035 -0.0048
B -0.0015383229336941792 0.0030106133902554895 0.004213346442952265    -0.0015 0.0030 0.0041
C -0.014336205554305061 -0.02904568811238444 -0.034179410889230925     -0.0142 -0.0287 -0.0338
C 0.027282602131008832 0.055275571307192434 0.0650453328786807         0.0270 0.0546 0.0643
C 0.009420241315296222 0.019085760883592165 0.0224591017038348         0.0093 0.0189 0.0222
""".strip().splitlines()]
HOMEWORK_MANUAL_GRADS, HOMEWORK_TORCH_GRADS = (
    {n: tuple(tuple(float(v) for v in row[cols]) for row in _PRINTED if row[0] == n) for n in "ABC"}
    for cols in (slice(1, 4), slice(4, 7)))
HOMEWORK_MANUAL_LOSS = 0.0048365386124306535
HOMEWORK_TORCH_LOSS = 0.0047  # "Autograd L = tensor(0.0047, grad_fn=<PowBackward0>)"
TORCH_DECIMALS = 4
HALF_UNIT = 0.5 * 10.0**-TORCH_DECIMALS  # a 4-decimal print is within this of the value
RANK_TOL = 1e-6  # sigma_2 / sigma_1 below this counts as rank one (4 decimals resolve ~1e-3)
SIGNATURE_BAND = 0.005  # dC ratios within this of sqrt(loss ratio): the homework's pattern


def _span(iv: Sequence[float] | None, fmt: str = ".4f") -> str:
    return "none" if iv is None else f"{iv[0]:{fmt}}-{iv[1]:{fmt}}"


def _bounds(m: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(2, *shape): per entry the factors r with |r m - t| <= HALF_UNIT, lower then upper."""
    return np.sort([(t - HALF_UNIT) / m, (t + HALF_UNIT) / m], axis=0)


def factor_interval(manual: Any, torch: Any) -> list[float] | None:
    """[lo, hi]: the factors r making r * manual print as ``torch`` at 4 decimals, or None."""
    lo, hi = _bounds(np.asarray(manual, np.float64), np.asarray(torch, np.float64))
    return [float(lo.max()), float(hi.min())] if lo.max() <= hi.min() else None


def _overlap(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    return a is not None and a[0] <= b[1] and b[0] <= a[1]


def reread_homework_check(manual: dict[str, Any] = HOMEWORK_MANUAL_GRADS,
                          torch: dict[str, Any] = HOMEWORK_TORCH_GRADS,
                          loss_torch: float = HOMEWORK_TORCH_LOSS) -> dict[str, Any]:
    """Per matrix: PyTorch / manual, entries beyond rounding, one factor fitting all, singular
    values (rank one: dA = gy x^T, dB = gz x^T, dA = diag(u (1 - u)) dB). ``one_update_later``:
    is PyTorch / manual for L one listed update L[t+1] / L[t], and dL/dC's its square root?"""
    mats = {}
    for n in abc_jax.Params._fields:
        m, t = np.asarray(manual[n], np.float64), np.asarray(torch[n], np.float64)
        r, beyond = t / m, np.abs(t - np.round(m, TORCH_DECIMALS)) > HALF_UNIT + 1e-12
        _, s, vt = np.linalg.svd(m)
        mats[n] = {"manual": m, "torch": t, "ratio": r, "ratio_min": float(r.min()),
                   "ratio_max": float(r.max()), "bounds": _bounds(m, t), "beyond_rounding": beyond,
                   "n_beyond_rounding": int(beyond.sum()), "common_factor": factor_interval(m, t),
                   "fit_factor": float(np.sum(t * m) / np.sum(m * m)), "singular_values": s,
                   "rank_one": bool(s[1] <= RANK_TOL * s[0]), "right_vector": vt[0]}
    slope, L0 = mats["A"]["manual"] / mats["B"]["manual"], HOMEWORK_MANUAL_LOSS
    steps = np.asarray(HOMEWORK_LOSSES[1:]) / np.asarray(HOMEWORK_LOSSES[:-1])
    iv = [(loss_torch - HALF_UNIT) / L0, (loss_torch + HALF_UNIT) / L0]
    step_range = [float(steps.min()), float(steps.max())]
    return {"matrices": mats, "sigmoid_slope_rows": slope.mean(axis=1),
            "sigmoid_slope_row_spread": float(np.max(np.ptp(slope, axis=1) / slope.mean(axis=1))),
            "rank_one": all(mm["rank_one"] for mm in mats.values()),
            "cos_right_AB": float(abs(mats["A"]["right_vector"] @ mats["B"]["right_vector"])),
            "loss_ratio": loss_torch / L0, "listing_step_ratio_median": float(np.median(steps)),
            "loss_ratio_interval": iv, "listing_step_ratio_range": step_range,
            "one_update_later": (_overlap(iv, step_range)
                                 and _overlap(mats["C"]["common_factor"], np.sqrt(iv).tolist())),
            "n_entries": sum(mm["ratio"].size for mm in mats.values()),
            "n_beyond_rounding": sum(mm["n_beyond_rounding"] for mm in mats.values())}


def draw(k: int, seed: int) -> tuple[abc_jax.Params, jax.Array]:
    """The starting parameters (float64, K = k) and the one x (k,) of a seed's run."""
    kp, kx = jax.random.split(jax.random.key(seed))
    return abc_jax.init_params(kp, k, dtype=jnp.float64), jax.random.normal(kx, (k,), jnp.float64)


@jax.jit
def _one_update(params: abc_jax.Params, x: jax.Array, lr: Any) -> tuple[Any, ...]:
    """p1 = p - lr g(p): returns L(p), L(p1), g(p), g(p1) (manual gradients), z(p), z(p1)."""
    new = jax.tree.map(lambda p, gp: p - lr * gp, params, g := abc_jax.manual_grad(params, x))
    (L0, r0), (L1, r1) = abc_jax.forward(params, x), abc_jax.forward(new, x)
    return L0, L1, g, abc_jax.manual_grad(new, x), r0.z, r1.z


def lr_for_loss_ratio(params: abc_jax.Params, x: jax.Array, target: float) -> float:
    """The lr at which one update p <- p - lr g multiplies L by ``target`` in (0, 1): from
    (1 - target) L / ||g||^2 doubled (<= 60 times) until it does, 60 bisections of [0, upper]."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    def ratio(lr: float) -> float:  # L(p - lr g) / L(p)
        L0, L1, *_ = _one_update(params, x, lr)
        return float(L1 / L0)
    g = abc_jax.manual_grad(params, x)
    hi = (1.0 - target) * float(abc_jax.loss(params, x)) / float(sum(jnp.vdot(a, a) for a in g))
    for _ in range(60):
        if ratio(hi) <= target:
            break
        hi *= 2.0
    else:
        raise ValueError(f"no lr lowers the loss by the factor {target} in one update")
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratio(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def simulate_one_update_later(params: abc_jax.Params, x: jax.Array,
                              target: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One update with L falling by ``target``: (summary, g_{t+1} / g_t per matrix). In summary,
    ``homework_like``: all dC ratios within SIGNATURE_BAND of sqrt(L ratio), dC = 2 w z^T's."""
    L0, L1, g0, g1, z0, z1 = _one_update(params, x, lr := lr_for_loss_ratio(params, x, target))
    ratios = {n: np.asarray(b) / np.asarray(a)
              for n, a, b in zip(abc_jax.Params._fields, g0, g1, strict=True)}
    sqrt = np.sqrt(L1 / L0)
    return {"lr": lr, "loss": float(L0), "loss_next": float(L1), "loss_ratio": float(L1 / L0),
            "sqrt_loss_ratio": float(sqrt),
            "homework_like": bool(np.abs(ratios["C"] - sqrt).max() <= SIGNATURE_BAND),
            "z_norm_ratio": float(jnp.linalg.norm(z1) / jnp.linalg.norm(z0)),
            "all_entries_shrink": bool(all(np.all((r > 0) & (r < 1)) for r in ratios.values())),
            **{f"d{n}_ratio_{f.__name__}": float(f(r)) for n, r in ratios.items()
               for f in (np.min, np.max, np.median)}}, ratios


def seed_scan(k: int, epochs: int, lr: float, seeds: Sequence[int], target: float) -> list[dict]:
    """The simulation's summary at the end of each seed's run (``draw``, then ``train``)."""
    ends = ((seed, x, abc_jax.train(p0, x[None, :], lr=lr, epochs=epochs, progress=False).params)
            for seed, (p0, x) in ((seed, draw(k, seed)) for seed in seeds))
    return [{"seed": seed, **simulate_one_update_later(end, x, target)[0]} for seed, x, end in ends]


def findings(hc: dict[str, Any], sim: dict[str, Any], scan: Sequence[dict[str, Any]]) -> list[str]:
    """``hc`` in sentences: the manual numbers' structure; PyTorch's as them rounded; L against one
    listed update; the simulated updates (``sim``, ``scan``); the verdict in one sentence."""
    mats, C, n = hc["matrices"], hc["matrices"]["C"], hc["n_beyond_rounding"]
    iv, slopes, rank_one = hc["loss_ratio_interval"], hc["sigmoid_slope_rows"], hc["rank_one"]
    sv = max(m["singular_values"][1] / m["singular_values"][0] for m in mats.values())
    obey = (rank_one and hc["cos_right_AB"] > 1 - 1e-9 and np.all(slopes <= 0.25)
            and hc["sigmoid_slope_row_spread"] < 1e-6)
    head = "PyTorch's numbers are the manual ones rounded" if n == 0 else (
        f"PyTorch's numbers are not the manual ones rounded: {n} of {hc['n_entries']} differ ("
        + ", ".join(f"dL/d{k} {m['n_beyond_rounding']}" for k, m in mats.items()) + ")")
    fit = f"one factor, {_span(C['common_factor'])}," if C["common_factor"] else "no one factor"
    runs = [sim, *scan]
    like, shrink = (sum(r[key] for r in runs) for key in ("homework_like", "all_entries_shrink"))
    diff = (f"differs from PyTorch by more than rounding ({n} of {hc['n_entries']} entries; "
            f"dL/dC {C['ratio_min']:.3f}-{C['ratio_max']:.3f}x, L {hc['loss_ratio']:.3f}x)"
            if n else "agrees with PyTorch to rounding")
    return [
        f"The manual numbers {'obey' if obey else 'break'} the derivation: sigma_2 / sigma_1 "
        f"<= {sv:.2g} (rank one: {'yes' if rank_one else 'no'}), dA and dB share x to "
        f"|cos| = {hc['cos_right_AB']:.12f}, dA / dB per row "
        + ", ".join(f"{q:.4f}" for q in slopes) + " (u(1 - u) <= 1/4).",
        f"{head}; dL/dC's ratios are {_span([C['ratio_min'], C['ratio_max']])}: {fit} "
        "reproduces every printed dL/dC entry.",
        f"PyTorch's L is {hc['loss_ratio']:.3f} times the manual one ({_span(iv, '.3f')} given "
        f"its digits); one listed update: {_span(hc['listing_step_ratio_range'])}."
        + (" dL/dC's factor is not L's: not a rescaled loss."
           if C["common_factor"] is not None and not _overlap(C["common_factor"], iv) else "")
        + (f" dL/dC's factor is within sqrt of L's ({_span(np.sqrt(iv), '.3f')}): as one update "
           "later (||w|| = sqrt(L) shrinks, z stays)." if hc["one_update_later"] else ""),
        f"One simulated update (lr = {sim['lr']:.3g}, L x {sim['loss_ratio']:.4f}) scales dL/dC "
        f"by {sim['dC_ratio_min']:.4f}-{sim['dC_ratio_max']:.4f} against sqrt "
        f"{sim['sqrt_loss_ratio']:.4f}: {'' if sim['homework_like'] else 'not '}the printed "
        f"pattern; over {len(runs)} runs {like} show it and in {shrink} every entry shrinks.",
        f"The homework's own check {diff}; its manual numbers are "
        + ("rank one as derived" if rank_one else "not rank one, against the derivation") + "; "
        + ("consistent with PyTorch seeing the parameters one update later (not provable)"
           if hc["one_update_later"] else "not explained by one update later") + "."]


def plot(hc: dict[str, Any], sim: dict[str, Any]) -> Any:
    """PyTorch / manual per entry (bars: 4-decimal rounding) against |manual|; lines at 1, dL/dC's
    one factor and sqrt of the listing's median update; band: the simulated dL/dC ratios. The
    y-limits hold every bar whole, the lines and the band."""
    fig, ax = common.figure(width=7.0, height=4.8)
    C, r_w = hc["matrices"]["C"], float(np.sqrt(hc["listing_step_ratio_median"]))
    r_obs = float(np.mean(C["common_factor"] or [C["fit_factor"]]))
    for (name, m), mk in zip(hc["matrices"].items(), "os^", strict=True):
        r, lo, hi = np.ravel(m["ratio"]), *(np.ravel(b) for b in m["bounds"])
        ax.errorbar(np.abs(np.ravel(m["manual"])), r, yerr=[r - lo, hi - r], fmt=mk, ms=6,
                    mfc="none", capsize=2, lw=0.8, label=f"dL/d{name}")
    for y, c, ls, label in ((1.0, "0.3", "-", "1 (same parameters)"),
                            (r_obs, "C3", "--", f"{r_obs:.4f} (fits dL/dC)"),
                            (r_w, "C4", ":", f"{r_w:.4f} (sqrt of one listed update)")):
        ax.axhline(y, color=c, ls=ls, lw=1.2, label=label)
    ax.axhspan(sim["dC_ratio_min"], sim["dC_ratio_max"], color="C4", alpha=0.15,
               label="dL/dC after one simulated update")
    ends = [v for m in hc["matrices"].values() for v in (m["bounds"].min(), m["bounds"].max())]
    lo, hi = min(*ends, sim["dC_ratio_min"], r_w, r_obs), max(*ends, sim["dC_ratio_max"], 1.0)
    pad = 0.04 * (hi - lo)
    ax.set(xscale="log", ylim=(lo - pad, hi + pad), xlabel="|manual gradient entry| [log]",
           ylabel="PyTorch / manual (bars: 4-decimal rounding)")
    ax.set_title(f"The homework's check re-read: dL/dC x {C['ratio_min']:.4f}-"
                 f"{C['ratio_max']:.4f}, L x {hc['loss_ratio']:.3f}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def run(params: abc_jax.Params, x: jax.Array, *, k: int, epochs: int, lr: float,
        seeds: Sequence[int]) -> dict[str, Any]:
    """Re-read, simulate one update at (params, x) and after ``seeds``' runs; return
    ``metrics``, ``sentence``, ``text`` (the tables and findings, to print), ``tables``
    (name -> (header, rows)) and ``figures``."""
    hc = reread_homework_check()
    sim, _ = simulate_one_update_later(params, x, hc["listing_step_ratio_median"])
    scan = seed_scan(k, epochs, lr, seeds, hc["listing_step_ratio_median"])
    *found, sentence = findings(hc, sim, scan)
    yes, mats, C = {True: "yes", False: "no"}, hc["matrices"], hc["matrices"]["C"]
    entries = [[f"dL/d{n}[{i},{j}]", repr(m["manual"][i, j].item()),
                *(c[i, j].item() for c in (m["torch"], np.round(m["manual"], TORCH_DECIMALS),
                                           m["ratio"], m["beyond_rounding"], *m["bounds"]))]
               for n, m in mats.items() for i, j in np.ndindex(m["manual"].shape)]
    reread = [[f"{m['ratio_min']:.4f}", f"{m['ratio_max']:.4f}", _span(m["common_factor"]),
               f"{m['fit_factor']:.4f}", f"{m['n_beyond_rounding']} of {m['ratio'].size}",
               " ".join(f"{v:.2g}" for v in m["singular_values"])] for m in mats.values()]
    labels = ["ratio, min", "ratio, max", "one factor fitting all", "least-squares factor",
              "beyond rounding", "manual singular values"]
    simulated = (["seed", "L_t", "lr", "L ratio", "sqrt", "||z|| ratio", "dA ratios", "dB ratios",
                  "dC ratios", "all shrink", "like the homework"],
                 [[r["seed"], f"{r['loss']:.3g}", f"{r['lr']:.3g}", f"{r['loss_ratio']:.4f}",
                   f"{r['sqrt_loss_ratio']:.4f}", f"{r['z_norm_ratio']:.4f}",
                   *(_span([r[f"d{n}_ratio_min"], r[f"d{n}_ratio_max"]]) for n in "ABC"),
                   yes[r["all_entries_shrink"]], yes[r["homework_like"]]]
                  for r in [{"seed": "this run", **sim}, *scan]])
    text = "\n\n".join([common.format_table(["PyTorch vs manual", *(f"dL/d{n}" for n in mats)],
                                            [list(row) for row in zip(labels, *reread,
                                                                      strict=True)]),
                         common.format_table(*simulated), "\n".join(found)])
    metrics = {"autograd_over_manual_dC": [C["ratio_min"], C["ratio_max"]],
               "dC_common_factor": C["common_factor"], "loss_ratio_printed": hc["loss_ratio"],
               **{key: hc[key] for key in ("loss_ratio_interval", "listing_step_ratio_range",
                                           "n_beyond_rounding")},
               "manual_rank_one": hc["rank_one"], "one_update_later": hc["one_update_later"],
               "simulated": sim, "seeds_homework_like": sum(r["homework_like"] for r in scan),
               "n_seeds": len(scan), "findings": found}
    header = ["entry", "manual", "pytorch", "manual_rounded", "ratio", "beyond_rounding",
              "ratio_lo", "ratio_hi"]
    return {"metrics": metrics, "sentence": sentence, "text": text,
            "figures": {"homework_check": plot(hc, sim)},
            "tables": {"homework_check": (header, entries), "homework_check_simulated": simulated}}
