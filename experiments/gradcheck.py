"""Is the hand-derived gradient right? Manual vs jax.grad vs finite differences.

For one shape (default the homework's K = 3) and a random batch, prints the max
absolute and relative error per parameter in float32 and float64, and writes
config.json, metrics.json, gradcheck.csv and gradcheck.png (the relative errors on a log
axis, with the tolerances the tests hold them to) under --out.

    python -m experiments.gradcheck --in-dim 7 --hidden-dim 5 --out-dim 3
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import abc_jax  # noqa: E402
from experiments import common  # noqa: E402

NAME = "gradcheck"
FIELDS = ["dtype", "param", "comparison", "max_abs", "rel"]
COMPARISONS = ("manual vs jax.grad", "finite diff vs jax.grad")
# (dtype, comparison) -> the relative error the tests allow (tests/test_reproduce.py); float32
# finite differences have none (eps^(1/3) steps leave ~1e-3, rounding of L / eps).
TOLERANCES = {("float64", COMPARISONS[0]): 1e-12, ("float32", COMPARISONS[0]): 1e-5,
              ("float64", COMPARISONS[1]): 1e-7}
FLOOR = 1e-18  # where an exact 0 is drawn on the log axis


@dataclasses.dataclass(frozen=True)
class Config:
    """The shape and the batch of the check."""

    in_dim: int = common.flag(3, "D (default 3)")
    hidden_dim: int | None = common.flag(None, "H (default D)")
    out_dim: int | None = common.flag(None, "O (default D)")
    n: int = common.flag(8, "samples N (default 8)")
    seed: int = common.flag(0, "random seed")
    quick: bool = False

    def __post_init__(self) -> None:
        dims = (self.in_dim, self.hidden_dim or 1, self.out_dim or 1, self.n)
        common.check(min(dims) >= 1, f"in_dim, hidden_dim, out_dim and n must be >= 1, "
                     f"got {dims}")

    @property
    def dims(self) -> tuple[int, int, int]:
        """(D, H, O), H and O defaulting to D."""
        return self.in_dim, self.hidden_dim or self.in_dim, self.out_dim or self.in_dim


QUICK = Config(n=4, quick=True)


def gradient_rows(in_dim: int, hidden_dim: int, out_dim: int, n: int, seed: int) -> list[dict]:
    """Rows of (dtype, param, comparison, max_abs, rel) for float32 and float64.

    params: ``init_params(key, in_dim, hidden_dim, out_dim)``; X (n, in_dim)
    standard normal; errors are ``grad_errors`` against ``oracle_grad``.
    """
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        params, X = common.problem(jax.random.key(seed), n, in_dim, hidden_dim, out_dim,
                                    dtype=dtype)
        oracle = abc_jax.oracle_grad(params, X)
        for cmp, grad in zip(COMPARISONS, (abc_jax.batch_grad, abc_jax.fd_grad), strict=True):
            rows += [dict(dtype=jnp.dtype(dtype).name, param=name, comparison=cmp, **e)
                     for name, e in abc_jax.grad_errors(grad(params, X), oracle).items()]
    return rows


def run(cfg: Config) -> dict[str, Any]:
    """The error rows, the worst relative error per (dtype, comparison), the environment."""
    rows = gradient_rows(*cfg.dims, cfg.n, cfg.seed)
    D, H, O = cfg.dims
    return {"config": dataclasses.asdict(cfg) | {"hidden_dim": H, "out_dim": O},
            "shape": f"D={D} H={H} O={O} N={cfg.n} seed={cfg.seed}",
            "environment": common.environment(), "worst_rel": worst(rows), "rows": rows}


def worst(rows: list[dict]) -> dict[str, float]:
    """'<dtype>/<comparison>' -> the largest relative error over the three parameters."""
    return {f"{dt}/{cmp}": max(r["rel"] for r in rows
                               if r["dtype"] == dt and r["comparison"] == cmp)
            for dt in ("float32", "float64") for cmp in COMPARISONS}


def plot(rows: list[dict], shape: str) -> Any:
    """Per comparison, a panel: the relative error of dL/dA, dL/dB, dL/dC per dtype (log axis;
    an exact 0 as a triangle at the floor), each dtype's tolerance as a dashed line."""
    fig, axes = common.figure(ncols=2, width=4.2, height=3.8)
    for ax, cmp in zip(axes, COMPARISONS, strict=True):
        for i, dt in enumerate(("float32", "float64")):
            rel = np.array([r["rel"] for r in rows if (r["dtype"], r["comparison"]) == (dt, cmp)])
            x = np.arange(len(rel)) + (i - 0.5) * 0.2
            ax.plot(x[rel > 0], rel[rel > 0], "o", color=f"C{i}", ms=7, label=dt)
            if np.any(rel == 0):
                ax.plot(x[rel == 0], [FLOOR] * int(np.sum(rel == 0)), "v", color=f"C{i}", ms=9,
                        label=f"{dt}: exactly 0")
            if tol := TOLERANCES.get((dt, cmp)):
                ax.axhline(tol, color=f"C{i}", ls="--", lw=1.2, label=f"{dt} tolerance {tol:g}")
            else:  # a legend line with no mark
                ax.plot([], [], ls="none", label=f"({dt}: no tolerance set)")
        ax.set_xticks(range(3), [f"dL/d{n}" for n in abc_jax.Params._fields])
        ax.set(yscale="log", xlim=(-0.6, 2.6), title=cmp, ylabel="max |error| / max |jax.grad|")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Relative gradient error per parameter, {shape}", fontsize=10)
    return fig


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the error table; write config.json, metrics.json, gradcheck.csv, gradcheck.png."""
    rows = res["rows"]
    print(f"{res['shape']}  (device {res['environment']['device']})")
    table = (FIELDS, [[r[k] for k in FIELDS] for r in rows])
    common.print_table(*table, floatfmt=".2e")
    return common.write_and_report(
        NAME, out, docs, [NAME], config=res["config"],
        metrics={k: res[k] for k in ("environment", "worst_rel", "rows")},
        tables={NAME: table}, figures={NAME: plot(rows, res["shape"])})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
