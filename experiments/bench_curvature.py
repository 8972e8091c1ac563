"""What do the curvature products by hand cost against autodiff's?

One process, float32, D = H = O = K, with targets and non-uniform row weights, all on JAX's
device. Per (K, N) and matmul precision, interleaved median times of:
- the Gauss-Newton-vector product G V: ``ggn_vp`` by hand (as users call it), against
  ``jax.jvp`` then ``jax.vjp`` of the outputs and ``jax.linearize`` then
  ``jax.linear_transpose`` (both jitted, on a plain-jnp network);
- the Hessian-vector product H V: ``hvp`` by hand against ``jax.jvp(jax.grad(loss))``;
- ``batch_grad``, one gradient, the unit.
Ratios below 1: the hand product is faster. Each pair's results are compared (max relative
difference, float32 rounding expected)."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import abc_jax
from abc_jax.edge import PRECISIONS
from experiments import common

NAME = "bench_curvature"

# method -> (label, what it computes, marker); the first of each kind is the hand product
METHODS = {"ggn_vp": ("ggn_vp (by hand)", "G V", "o"),
           "jvp_vjp": ("jax.jvp + jax.vjp", "G V", "s"),
           "linearize": ("jax.linearize + linear_transpose", "G V", "D"),
           "hvp": ("hvp (by hand)", "H V", "o"),
           "jvp_grad": ("jax.jvp(jax.grad)", "H V", "s"),
           "batch_grad": ("batch_grad (one gradient)", "grad", "^")}
RATIOS = {"ggn_vp/jvp_vjp": ("ggn_vp", "jvp_vjp"), "ggn_vp/linearize": ("ggn_vp", "linearize"),
          "hvp/jvp_grad": ("hvp", "jvp_grad"), "ggn_vp/batch_grad": ("ggn_vp", "batch_grad"),
          "hvp/batch_grad": ("hvp", "batch_grad")}


def outputs(params: abc_jax.Params, X: jax.Array) -> jax.Array:
    """W (N, O) of the network in plain jnp, rows as given: what autodiff differentiates."""
    Z = jax.nn.sigmoid(X @ params.A.T) + X @ params.B.T
    return Z @ params.C.T


def plain_loss(params: abc_jax.Params, batch: abc_jax.Batch) -> jax.Array:
    """sum_i r_i ||w_i - t_i||^2 / sum_i r_i in plain jnp."""
    E = outputs(params, batch.X) - batch.T
    return jnp.sum(batch.weights * jnp.sum(E * E, axis=1)) / jnp.sum(batch.weights)


def gn_cotangent(batch: abc_jax.Batch, dW: jax.Array) -> jax.Array:
    """2 r_i dw_i / sum r (N, O): the Gauss-Newton cotangent of the outputs."""
    return 2 * batch.weights[:, None] * dW / jnp.sum(batch.weights)


def jvp_vjp(params: abc_jax.Params, batch: abc_jax.Batch, V: abc_jax.Params) -> Any:
    """G V = J^T (2 R J V) / sum r: ``jax.jvp`` of the outputs, then ``jax.vjp``."""
    f = functools.partial(outputs, X=batch.X)
    dW = jax.jvp(f, (params,), (V,))[1]
    return jax.vjp(f, params)[1](gn_cotangent(batch, dW))[0]


def linearize(params: abc_jax.Params, batch: abc_jax.Batch, V: abc_jax.Params) -> Any:
    """G V by ``jax.linearize`` of the outputs (one forward pass) and its
    ``jax.linear_transpose``."""
    _, lin = jax.linearize(functools.partial(outputs, X=batch.X), params)
    return jax.linear_transpose(lin, params)(gn_cotangent(batch, lin(V)))[0]


def jvp_grad(params: abc_jax.Params, batch: abc_jax.Batch, V: abc_jax.Params) -> Any:
    """H V by forward over reverse: ``jax.jvp`` of ``jax.grad`` of the plain loss."""
    return jax.jvp(lambda p: jax.grad(plain_loss)(p, batch), (params,), (V,))[1]


def at_precision(fn: Any, precision: str) -> Any:
    """``jax.jit(fn)`` traced at ``precision`` (it reaches the products autodiff creates)."""
    def body(*args: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return fn(*args)

    return jax.jit(body)


def bench_problem(K: int, N: int, seed: int) -> tuple[abc_jax.Params, abc_jax.Batch, Any]:
    """Params, a Batch with targets ~ N(0, 1) and weights ~ U(0.5, 1.5), a tangent ~ N(0, 1)."""
    params, X = common.problem(jax.random.key(seed), N, K)
    kt, kr, kv = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), 3)
    batch = abc_jax.Batch(X, jax.random.uniform(kr, (N,), X.dtype, minval=0.5, maxval=1.5),
                          jax.random.normal(kt, (N, K), X.dtype))
    V = abc_jax.Params(*(jax.random.normal(k, p.shape, p.dtype) for k, p in
                         zip(jax.random.split(kv, 3), params, strict=True)))
    return params, batch, V


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest over A, B, C of max |a - b| / max |b|."""
    return max(e["rel"] for e in abc_jax.grad_errors(a, b).values())


def bench_size(K: int, N: int, precision: str, *, rounds: int, min_time: float,
               seed: int) -> dict[str, Any]:
    """One row: median seconds per method at (K, N) and ``precision``, ratios, differences."""
    params, batch, V = bench_problem(K, N, seed)
    auto = {"jvp_vjp": jvp_vjp, "linearize": linearize, "jvp_grad": jvp_grad}
    fns = {"ggn_vp": lambda: abc_jax.ggn_vp(params, batch, V, precision=precision),
           "hvp": lambda: abc_jax.hvp(params, batch, V, precision=precision),
           "batch_grad": lambda: abc_jax.batch_grad(params, batch, precision=precision)}
    fns |= {m: functools.partial(at_precision(f, precision), params, batch, V)
            for m, f in auto.items()}
    times = common.time_interleaved({m: fns[m] for m in METHODS}, rounds=rounds,
                                    min_time=min_time)
    row = dict(device=common.device_label(), precision=precision, dtype="float32", K=K, N=N,
               **{f"{m}_s": t.median_s for m, t in times.items()})
    row |= {r: row[f"{a}_s"] / row[f"{b}_s"] for r, (a, b) in RATIOS.items()}
    out = {m: t.output for m, t in times.items()}
    return row | {"diff_ggn_vp_jvp_vjp": max_rel_diff(out["ggn_vp"], out["jvp_vjp"]),
                  "diff_ggn_vp_linearize": max_rel_diff(out["ggn_vp"], out["linearize"]),
                  "diff_hvp_jvp_grad": max_rel_diff(out["hvp"], out["jvp_grad"]),
                  "rounds": rounds}


def _sizes(text: str) -> str:
    """A KxN list such as 256x4096,64x4096, checked and kept as written."""
    parse_sizes(text)
    return text


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """[(K, N), ...] from "256x4096,64x4096"; a ValueError naming the flag otherwise."""
    sizes = [s.lower().split("x") for s in text.split(",") if s]
    ok = sizes and all(len(s) == 2 and all(v.isdigit() and int(v) for v in s) for s in sizes)
    common.check(bool(ok), f"--sizes must look like 256x4096,64x4096; got {text!r}")
    return [(int(k), int(n)) for k, n in sizes]


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes and the timing settings; ``QUICK``: the --quick values."""

    sizes: str = common.flag("256x4096,64x4096", "KxN list (D = H = O = K)", type=_sizes)
    repeats: int = common.flag(15, "interleaved timing rounds")
    min_time: float = common.flag(2.0, "timed s per method and size")
    precisions: tuple[str, ...] | None = common.flag(
        None, "matmul precisions (default: highest, and default on a GPU)", choices=PRECISIONS)
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        common.check(self.repeats >= 1 and self.min_time >= 0,
                     "--repeats must be >= 1 and --min-time >= 0")
        parse_sizes(self.sizes)


QUICK = Config(sizes="16x256", repeats=3, min_time=0.01, quick=True)

TABLE = [("K", "K"), ("N", "N"), *((f"{m} ms", f"{m}_s") for m in METHODS), *(
    (r, r) for r in RATIOS)]


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of the timing table: milliseconds, then the ratios."""
    header = ["device", "precision", *(h for h, _ in TABLE)]
    cells = [[r["device"], r["precision"],
              *(r[k] * 1e3 if k.endswith("_s") else r[k] for _, k in TABLE)] for r in rows]
    return header, cells


def plot(rows: Sequence[dict[str, Any]]) -> Any:
    """Each method's time over batch_grad's, per size: the hand products and autodiff's."""
    fig, ax = common.figure(width=7.5, height=4.2)
    x = np.arange(len(rows))
    shown = [m for m in METHODS if m != "batch_grad"]
    for i, m in enumerate(shown):
        label, kind, marker = METHODS[m]
        xs = x + (i - (len(shown) - 1) / 2) * 0.15
        ys = [r[f"{m}_s"] / r["batch_grad_s"] for r in rows]
        ax.plot(xs, ys, marker, color=f"C{i}", ms=7, ls="none", label=f"{kind}: {label}")
        for xi, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.2f}", (xi, y), xytext=(0, 6), textcoords="offset points",
                        fontsize=7, ha="center")
    ax.axhline(1.0, color="0.2", lw=1.0, label="batch_grad (one gradient)")
    ax.set_xticks(x, [f"K={r['K']}\nN={r['N']}\n{r['precision']}" for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])  # room for the labels above the dots
    ax.set(ylabel="time / batch_grad's time",
           title=f"Curvature products, float32, on {rows[0]['device']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def run(cfg: Config) -> dict[str, Any]:
    """Every size at every precision, timed; the environment they ran in."""
    precisions = tuple(cfg.precisions or common.precisions_to_time())
    rows = [bench_size(K, N, p, rounds=cfg.repeats, min_time=cfg.min_time, seed=cfg.seed)
            for K, N in common.progress(parse_sizes(cfg.sizes), desc="sizes")
            for p in precisions]
    return {"config": dataclasses.asdict(cfg) | {"precisions": precisions},
            "environment": common.environment(jnp.float32), "rows": rows}


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table and the ratios; write config.json, metrics.json, bench_curvature.csv
    and bench_curvature.png."""
    cfg, env, rows = res["config"], res["environment"], res["rows"]
    print(f"{NAME}: device {env['device_label']} x{env['device_count']}, jax "
          f"{env['jax_version']}, float32, load average {env['load_average_1min']:.2f} on "
          f"{env['cpu_count']} CPUs")
    if cfg["quick"]:
        print("--quick: a smoke run of few rounds at tiny sizes, not a measurement: the "
              "table shows that the code runs, not how fast")
    common.print_table(*table_rows(rows), floatfmt=".3g")
    for r in rows:
        print(f"K={r['K']} N={r['N']} {r['precision']}: ggn_vp takes "
              f"{r['ggn_vp/jvp_vjp']:.2f}x the time of jax.jvp + jax.vjp and "
              f"{r['ggn_vp/linearize']:.2f}x that of linearize + linear_transpose; hvp "
              f"{r['hvp/jvp_grad']:.2f}x that of jax.jvp(jax.grad); max rel differences "
              f"{max(r['diff_ggn_vp_jvp_vjp'], r['diff_ggn_vp_linearize']):.1e} (G V), "
              f"{r['diff_hvp_jvp_grad']:.1e} (H V)")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return common.write_and_report(
        NAME, out, docs, [NAME], config=cfg,
        metrics={k: v for k, v in res.items() if k != "config"}, figures={NAME: plot(rows)},
        tables={NAME: (columns, [[r.get(k) for k in columns] for r in rows])})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
