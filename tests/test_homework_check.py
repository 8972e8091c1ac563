"""homework_check (reproduce_seed's part (e)): the homework's printed gradient check re-read,
and one update simulated. The printed numbers are fixed data, so their figures are pinned
here, computed again with plain NumPy; the simulation is checked on fixed seeds; each
of the findings' sentences is checked on the printed numbers and on altered ones."""


import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

import abc_jax
from experiments.common import homework_check as repro

MANUAL = {n: np.array(m) for n, m in repro.HOMEWORK_MANUAL_GRADS.items()}
TORCH = {n: np.array(m) for n, m in repro.HOMEWORK_TORCH_GRADS.items()}


def _run_end(seed, epochs=500, lr=0.001, k=3):
    """The end of reproduce_seed's loss-listing run for ``seed`` (float64, the homework's rule)."""
    kp, kx = jax.random.split(jax.random.key(seed))
    params = abc_jax.init_params(kp, k, dtype=jnp.float64)
    x = jax.random.normal(kx, (k,), jnp.float64)
    drawn = repro.draw(k, seed)  # the same draw as the module's
    assert np.array_equal(drawn[1], x) and np.array_equal(drawn[0].C, params.C)
    return abc_jax.train(params, x[None, :], lr=lr, epochs=epochs, progress=False).params, x


# -- the printed numbers -------------------------------------------------------------------


@pytest.mark.smoke
def test_printed_figures():
    # a few entries against the write-up, digit for digit
    assert repro.HOMEWORK_MANUAL_GRADS["C"][1][2] == 0.0650453328786807
    assert repro.HOMEWORK_MANUAL_GRADS["A"][0][0] == -0.0006713625025565516
    assert repro.HOMEWORK_TORCH_GRADS["B"][2] == (-0.0015, 0.0030, 0.0041)
    assert repro.HOMEWORK_LOSSES[-1] == 0.2716954467766908 and len(repro.HOMEWORK_LOSSES) == 33

    ratio_C = TORCH["C"] / MANUAL["C"]
    assert ratio_C.min() == pytest.approx(0.987236, abs=1e-6)
    assert ratio_C.max() == pytest.approx(0.990499, abs=1e-6)
    assert 0.0047 / 0.0048365386124306535 == pytest.approx(0.971769, abs=1e-6)
    L = np.array(repro.HOMEWORK_LOSSES)
    assert np.median(L[1:] / L[:-1]) == pytest.approx(0.973642, abs=1e-6)
    # beyond 4-decimal rounding: the printed value is not the manual one rounded
    beyond = {n: int(np.sum(np.abs(TORCH[n] - np.round(MANUAL[n], 4)) > 0.5e-4 + 1e-12))
              for n in "ABC"}
    assert beyond == {"A": 2, "B": 4, "C": 9}
    # rank one: a one-sample gradient is an outer product
    for n in "ABC":
        s = np.linalg.svd(MANUAL[n], compute_uv=False)
        assert s[1] < 1e-8 * s[0]
    assert np.linalg.svd(MANUAL["C"], compute_uv=False)[0] == pytest.approx(0.105856, abs=1e-6)
    # dA = diag(u(1 - u)) dB: each row of dA / dB is one number, at most 1/4
    q = MANUAL["A"] / MANUAL["B"]
    assert np.ptp(q, axis=1).max() < 1e-9 and q.max() <= 0.25

    hc = repro.reread_homework_check()
    C = hc["matrices"]["C"]
    assert (C["ratio_min"], C["ratio_max"]) == (ratio_C.min(), ratio_C.max())
    assert C["common_factor"] == pytest.approx([0.987809, 0.988683], abs=1e-6)
    assert hc["matrices"]["B"]["common_factor"] is None  # dB's rows shrink by different factors
    assert all(repro.factor_interval(m, t) is not None for m, t in zip(MANUAL["B"], TORCH["B"],
                                                                      strict=True))
    assert {n: m["n_beyond_rounding"] for n, m in hc["matrices"].items()} == beyond
    assert hc["rank_one"] and hc["cos_right_AB"] == pytest.approx(1.0, abs=1e-12)
    assert hc["loss_ratio"] == pytest.approx(0.971769, abs=1e-6)
    assert hc["loss_ratio_interval"] == pytest.approx([0.961431, 0.982107], abs=1e-6)
    assert hc["listing_step_ratio_median"] == pytest.approx(0.973642, abs=1e-6)
    assert hc["n_beyond_rounding"] == 15 and hc["n_entries"] == 27
    # a rescaled loss would give L and dC one factor; the printed ones are disjoint
    assert C["common_factor"][0] > hc["loss_ratio_interval"][1]


def test_factor_interval():
    m = np.array([0.0123456, -0.0456789, 0.0789])
    t = np.round(0.99 * m, 4)
    lo, hi = repro.factor_interval(m, t)
    assert lo <= 0.99 <= hi and hi - lo < 0.01
    assert np.all(np.round(lo * m, 4) == t) or np.all(np.round(hi * m, 4) == t)
    assert repro.factor_interval(m, np.round(m * np.array([0.9, 1.0, 1.1]), 4)) is None


SIM = {"lr": 0.01, "loss_ratio": 0.9736, "sqrt_loss_ratio": 0.9867, "homework_like": True,
       "all_entries_shrink": True, "dC_ratio_min": 0.9866, "dC_ratio_max": 0.9868}
OFF = {**SIM, "dC_ratio_min": 0.96, "all_entries_shrink": False, "homework_like": False}


def test_findings_state_the_printed_numbers():
    hc = repro.reread_homework_check()
    assert hc["one_update_later"]
    derivation, rounding, loss, simulation, sentence = repro.findings(hc, SIM, [OFF, OFF])
    assert "more than rounding (15 of 27" in sentence and "0.987-0.990" in sentence
    assert "0.972" in sentence and "rank one as derived" in sentence
    assert "consistent with PyTorch seeing the parameters one update later" in sentence
    assert derivation.startswith("The manual numbers obey")
    assert "15 of 27" in rounding and "dL/dC 9" in rounding and "0.9878-0.9887" in rounding
    assert "not a rescaled loss" in loss and "one update later" in loss
    assert ": the printed pattern" in simulation and "over 3 runs 1 show it and in 1" in simulation


def test_findings_turn_with_the_numbers():
    # PyTorch's print exactly the manual numbers rounded, at the same loss
    same = {n: np.round(MANUAL[n], 4) for n in "ABC"}
    hc = repro.reread_homework_check(torch=same, loss_torch=round(repro.HOMEWORK_MANUAL_LOSS, 4))
    assert hc["n_beyond_rounding"] == 0 and not hc["one_update_later"]
    _, rounding, loss, simulation, sentence = repro.findings(hc, OFF, [])
    assert "agrees with PyTorch to rounding" in sentence and "not explained by" in sentence
    assert rounding.startswith("PyTorch's numbers are the manual ones rounded")
    assert "one update later" not in loss and "not a rescaled loss" not in loss
    assert "not the printed pattern" in simulation and "over 1 runs 0 show it" in simulation
    # no one factor reproduces dL/dC when its entries shrink by different factors
    spread = {**TORCH, "C": np.round(MANUAL["C"] * np.array([0.9, 1.0, 1.1]), 4)}
    hs = repro.reread_homework_check(torch=spread)
    assert hs["matrices"]["C"]["common_factor"] is None and not hs["one_update_later"]
    assert "no one factor reproduces" in repro.findings(hs, SIM, [])[1]
    # manual numbers that are not rank one break the derivation
    broken = {**repro.HOMEWORK_MANUAL_GRADS, "C": MANUAL["C"] + np.diag([0.0, 0.0, 0.01])}
    hb = repro.reread_homework_check(manual=broken)
    derivation, *_, sentence = repro.findings(hb, SIM, [])
    assert not hb["rank_one"] and derivation.startswith("The manual numbers break")
    assert "not rank one" in sentence


# -- one update simulated ----------------------------------------------------------------


@pytest.mark.integration  # an experiment's simulation
def test_simulated_signature_on_a_fixed_seed():
    params, x = _run_end(seed=2)
    target = repro.reread_homework_check()["listing_step_ratio_median"]
    sim, ratios = repro.simulate_one_update_later(params, x, target)
    assert sim["loss_ratio"] == pytest.approx(target, abs=1e-9)
    r = sim["sqrt_loss_ratio"]
    # the homework's pattern: every entry of dC shrinks by the factor of ||w|| = sqrt(L)
    assert np.all(np.abs(ratios["C"] - r) < 1e-3) and sim["homework_like"]
    assert sim["z_norm_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert sim["all_entries_shrink"]
    # dB = gz x^T with x fixed: each row of dB shrinks by one factor
    assert np.ptp(ratios["B"], axis=1).max() < 1e-9
    # the update is the homework's rule, as train applies it
    res = abc_jax.train(params, x[None, :], lr=sim["lr"], epochs=2, progress=False)
    assert float(res.losses[1]) / float(res.losses[0]) == pytest.approx(sim["loss_ratio"],
                                                                        rel=1e-12)


def test_lr_search_is_deterministic_and_checked():
    params, x = _run_end(seed=0, epochs=20)
    lr = repro.lr_for_loss_ratio(params, x, 0.97)
    assert lr == repro.lr_for_loss_ratio(params, x, 0.97) and lr > 0
    L0, L1 = (float(L) for L in abc_jax.train(params, x[None, :], lr=lr, epochs=2,
                                              progress=False).losses)
    assert L1 / L0 == pytest.approx(0.97, abs=1e-9)
    with pytest.raises(ValueError, match="target"):
        repro.lr_for_loss_ratio(params, x, 1.5)


def test_seed_scan_repeats_the_simulation():
    (row,) = repro.seed_scan(3, 500, 0.001, [2], 0.97)
    params, x = _run_end(seed=2)
    sim, _ = repro.simulate_one_update_later(params, x, 0.97)
    assert row["seed"] == 2 and row["lr"] == sim["lr"]
    assert row["dC_ratio_min"] == sim["dC_ratio_min"] and row["homework_like"] is True


def test_plot_shows_every_error_bar_whole():
    hc = repro.reread_homework_check()
    params, x = _run_end(seed=2)
    sim, _ = repro.simulate_one_update_later(params, x, hc["listing_step_ratio_median"])
    lo, hi = repro.plot(hc, sim).axes[0].get_ylim()
    for name, m in hc["matrices"].items():
        assert lo < m["bounds"].min() and m["bounds"].max() < hi, name
    plt.close("all")
