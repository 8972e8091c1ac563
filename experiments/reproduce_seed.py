"""Reproduce the homework, K = 3, and answer its three questions from the numbers measured.

  (a) plain gradient descent on one random x, as the homework printed it (and on Python lists);
  (b) dL/dA, dL/dB, dL/dC by the manual backward pass, jax.grad and finite differences, float64;
  (c) time per gradient: backprop against finite differences and plain-Python loops;
  (d) why averaging per-sample solutions did not generalise (common/averaging.py);
  (e) the homework's own check, re-read from its printed numbers (common/homework_check.py).

    python -m experiments.reproduce_seed
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)  # the gradient check is in float64

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402
from experiments.common import averaging, homework, homework_check  # noqa: E402

NAME = "reproduce_seed"
METHODS = ("batch_grad", "jax_grad", "fd_grad", "python_backprop", "python_fd")
EXACT = 1e-12  # float64: a relative error at or below this is the same gradient


def loss_listing(args: Config) -> tuple[abc_jax.Params, jax.Array, dict[str, Any]]:
    """(a) Gradient descent on one random x (homework_check.draw) by ``train`` and on Python
    lists; ``losses[e]``: the loss before update e, as printed. Returns params, x, the part."""
    params0, x = homework_check.draw(args.k, args.seed)
    res = abc_jax.train(params0, x[None, :], lr=args.lr, epochs=args.epochs, progress=False)
    py = homework.py_gradient_descent(*homework.to_lists(params0, x[None, :]), args.lr, args.epochs)
    losses = np.asarray(res.losses, np.float64).tolist()
    met = {"initial_loss": losses[0], "final_loss": float(abc_jax.loss(res.params, x)),
           "max_abs_diff_python": float(np.max(np.abs(np.asarray(losses) - py)))}
    text = "\n".join([f"\n(a) plain gradient descent on one random x (lr = {args.lr:g}):",
                      *(f"L = {L!r}" for L in losses[:8]),
                      f"... {args.epochs} steps: L = {losses[0]:.6g} -> {met['final_loss']:.6g}; "
                      f"the loop on Python lists differs by at most "
                      f"{met['max_abs_diff_python']:.1e}"])
    fig, ax = common.figure(width=6.0, height=4.0)
    step = max(1, len(py) // 25)
    ax.plot(losses, "-", color="C0", label=f"abc_jax.train (lr = {args.lr:g})")
    ax.plot(np.arange(0, len(py), step), py[::step], "o", ms=4, mfc="none", color="C1",
            label="the homework's loop on Python lists")
    ax.plot(homework_check.HOMEWORK_LOSSES, "x", ms=4, color="gray",
            label="the homework's printed listing (its own x, A, B, C, lr)")
    ax.set(yscale="log", xlabel="iteration (gradient-descent step)",
           ylabel="loss L = ||w||² for one x [log]", title="Plain gradient descent on one x")
    ax.legend(fontsize=8)
    table = (["iteration", "loss", "loss_python_lists"],
             list(zip(range(args.epochs), losses, py, strict=True)))
    graph = plt.figure()  # the graph for x with values and gradients, before and after
    for sub, p, when in zip(graph.subfigures(2, 1), (params0, res.params), ("Before training",
                            f"After {args.epochs} steps of lr = {args.lr:g}"), strict=True):
        abc_jax.draw_graph(p, x, fig=sub, title=f"{when}: L = {float(abc_jax.loss(p, x)):.4g}")
    return res.params, x, {"metrics": met, "tables": {"loss": table}, "text": text,
                           "figures": {"reproduce_loss": fig, "graph": graph}}


def gradient_check(params: abc_jax.Params, x: jax.Array) -> dict[str, Any]:
    """(b) dL/d(A, B, C) at one x (D,), float64: ``manual_grad``, ``fd_grad`` and the lists'
    backprop against ``oracle_grad``; ``worst_rel``: max over A, B, C of ``grad_errors``' rel."""
    X = x[None, :]
    _, py = homework.py_loss_and_grad(*homework.to_lists(params, X))
    grads = {"manual": abc_jax.manual_grad(params, x), "jax_grad": abc_jax.oracle_grad(params, X),
             "finite_diff": abc_jax.fd_grad(params, X),
             "python": abc_jax.Params(*map(jnp.asarray, py))}
    errors = {m: abc_jax.grad_errors(g, grads["jax_grad"]) for m, g in grads.items()
              if m != "jax_grad"}
    worst = {m: max(e["rel"] for e in errs.values()) for m, errs in errors.items()}
    g = [np.asarray(grads[m]) for m in ("manual", "jax_grad", "finite_diff")]
    table = (["entry", "manual", "jax.grad", "finite diff.", "|manual-jax|", "|fd-jax|"], [
        [f"dL/d{'ABC'[p]}[{i},{j}]", *(repr(float(a[p, i, j])) for a in g),
         float(abs(g[0][p, i, j] - g[1][p, i, j])), float(abs(g[2][p, i, j] - g[1][p, i, j]))]
        for p, i, j in np.ndindex(g[0].shape)])
    loss = float(abc_jax.loss(params, x))
    text = (f"\n(b) gradients at the trained parameters, same x: L = {loss!r}\n"
            + common.format_table(*table, floatfmt=".1e"))
    return {"metrics": {"loss": loss, "worst_rel": worst, "errors": errors}, "text": text,
            "tables": {"gradcheck": table}, "figures": {}}


def timing_part(args: Config, bench_kw: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """(c) Median seconds per gradient at K and the larger K over N samples, float64, timed
    against each other (``common.time_gradients``: a method is skipped where its predicted or
    measured time passes the budget): its table, figure and per-K ratios to batch_grad."""
    rows = common.time_gradients(list(dict.fromkeys([args.k, args.bench_k])), args.n, METHODS,
                                  dtype=jnp.float64, seed=args.seed, rounds=5, **bench_kw)
    cols = ["K", "P", "N", "method", "median_s", "ratio_to_batch_grad", "status"]
    table = (cols, [[r[c] for c in cols] for r in rows])
    text = f"\n(c) time per gradient, N = {args.n}, float64:\n" + common.format_table(*table)
    fig, ax = common.figure(width=6.0, height=4.0)
    for m in METHODS:
        pts = [r for r in rows if r["method"] == m and r["median_s"] is not None]
        ax.plot([r["P"] for r in pts], [r["median_s"] for r in pts], "o-", label=m)
    ax.set(xscale="log", yscale="log", xlabel="parameters P = 3K² [log]",
           ylabel="seconds per gradient [log]", title=f"One gradient over N = {args.n}, float64")
    ax.legend(fontsize=8)
    ratios = {m: {str(r["K"]): r["ratio_to_batch_grad"] for r in rows if r["method"] == m}
              for m in METHODS[1:]}
    return rows, {"metrics": {"rows": rows, "ratio_to_batch_grad": ratios},
                  "tables": {"timing": table}, "figures": {"reproduce_timing": fig},
                  "text": text}


def derivation_answer(worst_rel: dict[str, float]) -> str:
    """1. Is the hand-derived gradient right? Yes iff manual matches jax.grad to EXACT."""
    ok = worst_rel["manual"] <= EXACT
    return (f"1. Is the hand-derived gradient right? {'Yes' if ok else 'No'}: in float64 it "
            f"matches jax.grad to a relative error of {worst_rel['manual']:.1e} (the homework's "
            f"loop on lists: {worst_rel['python']:.1e}; central finite differences: "
            f"{worst_rel['finite_diff']:.1e}).")


def speed_answer(rows: Sequence[dict[str, Any]]) -> str:
    """2. How much faster is backprop? The ratios to batch_grad at each K, as measured."""
    parts = []
    for K in dict.fromkeys(r["K"] for r in rows):
        at = {r["method"]: r for r in rows if r["K"] == K}
        parts.append(f"at K = {K} batch_grad takes {at['batch_grad']['median_s'] * 1e6:.3g} us, "
                     + ", ".join(f"{m} {at[m]['ratio_to_batch_grad']:.3g}x" for m in METHODS[1:]
                                 if at[m]["ratio_to_batch_grad"] is not None) + " as long")
    return (f"2. How much faster is backprop? Per gradient over N = {rows[0]['N']}: "
            + "; ".join(parts) + ".")


def averaging_answer(gen: dict[str, Any]) -> str:
    """3. Why did averaging not generalise? averaging's sentences on the numbers measured."""
    held = {m: r["heldout_loss"] for m, r in gen["final"].items()}
    if not {"average", "batch_gd"} <= set(held):
        return f"3. A run diverged, no comparison: {sorted(gen['diverged'])}"
    return " ".join(["3. Why did averaging not generalise?", averaging.average_sentence(
        held["average"], held["batch_gd"], gen["initial"]["heldout_loss"]),
        averaging.carry_over_sentence(gen["own_sample_loss"], gen["single_copy_heldout"])])


@dataclasses.dataclass(frozen=True)
class Config:
    """The homework's setting and the sizes of (c) and (d); ``QUICK``: the --quick values."""

    k: int = common.flag(3, "K = D = H = O (default 3, the homework)")
    epochs: int = common.flag(500, "steps on the one x")
    lr: float = common.flag(0.001, "learning rate")
    bench_k: int = common.flag(32, "the larger K timed")
    n: int = common.flag(256, "samples N for the timing")
    check_seeds: int = common.flag(15, "other seeds on which (e) simulates one update later")
    seed: int = common.flag(0, "random seed")
    generalization: tuple[tuple[str, int], ...] = (  # (d): averaging.run_generalization's
        ("n_train", 256), ("n_test", 1024), ("epochs", 500), ("n_checkpoints", 8))
    bench: tuple[tuple[str, float], ...] = (("budget_s", 2.0), ("min_time", 0.1))  # (c)
    quick: bool = False


QUICK = Config(epochs=20, bench_k=3, n=16, check_seeds=1, quick=True,
               generalization=(("n_train", 8), ("n_test", 16), ("epochs", 10),
                               ("n_checkpoints", 4)),
               bench=(("budget_s", 0.2), ("min_time", 0.005)))


def run(cfg: Config) -> dict[str, Any]:
    """Parts (a) to (e) and the three answers; each part's metrics, tables, figures, text."""
    gen_kw, bench_kw = dict(cfg.generalization), dict(cfg.bench)
    env = common.environment(jnp.float64)
    parts: dict[str, dict[str, Any]] = {}  # each: "metrics", "tables", "figures", "text"
    params, x, parts["loss_listing"] = loss_listing(cfg)
    parts["gradient_check"] = gradient_check(params, x)
    bench, parts["timing"] = timing_part(cfg, bench_kw)
    gen = averaging.run_generalization(cfg.k, seed=cfg.seed, **gen_kw)
    parts["generalization"] = {
        "metrics": averaging.metrics(gen), "tables": {"generalization": averaging.curve_rows(gen)},
        "figures": {"reproduce_generalization": averaging.plot(gen)},
        "text": f"\n(d) averaging per-sample solutions vs training on the mean, K = {cfg.k}:\n"
                + common.format_table(*averaging.summary_rows(gen), floatfmt=".4g")}
    hc = homework_check.run(params, x, k=cfg.k, epochs=cfg.epochs, lr=cfg.lr,
                            seeds=range(cfg.seed + 1, cfg.seed + 1 + cfg.check_seeds))
    parts["homework_check"] = hc | {
        "text": "\n(e) the homework's own check, re-read from its printed numbers:\n" + hc["text"]}
    answers = [derivation_answer(parts["gradient_check"]["metrics"]["worst_rel"]) + " "
               + hc["sentence"], speed_answer(bench), averaging_answer(gen)]
    return {"config": dataclasses.asdict(cfg) | {"generalization": gen_kw, "bench": bench_kw},
            "environment": env, "parts": parts, "answers": answers}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print each part and the answers; write config.json, metrics.json, every part's tables
    and figures (a quick run copies only the key figure to ``docs``)."""
    cfg, env, parts, answers = (res[k] for k in ("config", "environment", "parts", "answers"))
    print(f"{NAME}: K = {cfg['k']}, seed {cfg['seed']}, float64, {env['device']}, "
          f"jax {env['jax_version']}")
    for p in parts.values():
        print(p["text"])
    print("\nAnswers:\n" + "\n".join(answers))
    print()
    return common.write_and_report(
        NAME, out, docs, ["reproduce_loss", "graph", "homework_check"][:1 if cfg["quick"] else 3],
        config=cfg,
        metrics={"environment": env, **{n: p["metrics"] for n, p in parts.items()},
                 "answers": answers},
        tables={n: t for p in parts.values() for n, t in p["tables"].items()},
        figures={n: f for p in parts.values() for n, f in p["figures"].items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
