"""Reproduce the homework, K = 3: the loss listing, the gradient check, and its three answers.

  (a) plain gradient descent on one random x: the loss falling iteration by
      iteration, as the homework printed it (and the same loop on Python lists);
  (b) dL/dA, dL/dB, dL/dC by the manual backward pass, jax.grad and finite
      differences, side by side in float64 with their errors (the homework
      compared four decimals against PyTorch);
  (c) how much faster backprop is than finite differences and than the
      homework's plain-Python loops (a short run of bench_gradients.py);
  (d) why averaging per-sample solutions did not generalise (a short run of
      generalization.py).

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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax import io, train  # noqa: E402

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
    (``losses[e]`` is the loss before update e, as the homework printed it)
    and their largest difference.
    """
    kp, kx = jax.random.split(jax.random.key(seed))
    params0 = abc_jax.init_params(kp, k, dtype=jnp.float64)
    x = jax.random.normal(kx, (k,), jnp.float64)
    res = train(params0, x[None, :], lr=lr, epochs=epochs, progress=False)
    A, B, C, X = bench_gradients.to_lists(params0, x[None, :])
    py = bench_gradients.py_gradient_descent(A, B, C, X, lr, epochs)
    losses = np.asarray(res.losses, np.float64)
    record = {
        "losses": losses.tolist(),
        "python_losses": py,
        "max_abs_diff_python": float(np.max(np.abs(losses - np.asarray(py)))) if py else 0.0,
        "initial_loss": float(losses[0]) if epochs else None,
        "final_loss": float(abc_jax.loss(res.params, x)),
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
    A, B, C, Xl = bench_gradients.to_lists(params, X)
    py_loss, py_grads = bench_gradients.py_loss_and_grad(A, B, C, Xl)
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
    args = ap.parse_args(list(argv) if argv is not None else None)
    gen_kw: dict[str, Any] = dict(n_train=256, n_test=1024, epochs=500)
    bench_kw: dict[str, Any] = dict(budget_s=3.0, min_time=0.1)
    if args.quick:
        args.epochs, args.bench_k, args.n = 20, 4, 16
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

    text = answers(check, bench_rows, gen)
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
        "answers": text,
    })
    if args.docs is not None:
        _common.docs_copy(out / "reproduce_loss.png", args.docs)
    print(f"\nwrote {out}/config.json, metrics.json, loss.csv, gradcheck.csv, "
          "gradcheck_errors.csv, timing.csv, generalization.csv, reproduce_loss.png, "
          "reproduce_timing.png, reproduce_generalization.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
