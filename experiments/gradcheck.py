"""Is the hand-derived gradient right? Manual vs jax.grad vs finite differences.

For one shape (default the homework's K = 3) and a random batch, prints the max
absolute and relative error per parameter in float32 and float64, and writes
config.json, metrics.json and gradcheck.csv under --out.

    python experiments/gradcheck.py --in-dim 7 --hidden-dim 5 --out-dim 3
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax

jax.config.update("jax_enable_x64", True)

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import abc_jax  # noqa: E402

NAME = "gradcheck"
FIELDS = ["dtype", "param", "comparison", "max_abs", "rel"]
COMPARISONS = ("manual vs jax.grad", "finite diff vs jax.grad")


def run(in_dim: int, hidden_dim: int, out_dim: int, n: int, seed: int) -> list[dict]:
    """Rows of (dtype, param, comparison, max_abs, rel) for float32 and float64.

    params: ``init_params(key, in_dim, hidden_dim, out_dim)``; X (n, in_dim)
    standard normal; errors are ``grad_errors`` against ``oracle_grad``.
    """
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        params, X = _common.problem(jax.random.key(seed), n, in_dim, hidden_dim, out_dim,
                                    dtype=dtype)
        oracle = abc_jax.oracle_grad(params, X)
        for cmp, grad in zip(COMPARISONS, (abc_jax.batch_grad, abc_jax.fd_grad), strict=True):
            rows += [dict(dtype=jnp.dtype(dtype).name, param=name, comparison=cmp, **e)
                     for name, e in abc_jax.grad_errors(grad(params, X), oracle).items()]
    return rows


def worst(rows: list[dict]) -> dict[str, float]:
    """'<dtype>/<comparison>' -> the largest relative error over the three parameters."""
    return {f"{dt}/{cmp}": max(r["rel"] for r in rows
                               if r["dtype"] == dt and r["comparison"] == cmp)
            for dt in ("float32", "float64") for cmp in COMPARISONS}


def main(argv: Sequence[str] | None = None) -> int:
    ap = _common.parser(NAME, __doc__)
    ap.add_argument("--in-dim", type=int, default=3, help="D (default 3)")
    ap.add_argument("--hidden-dim", type=int, default=None, help="H (default D)")
    ap.add_argument("--out-dim", type=int, default=None, help="O (default D)")
    ap.add_argument("--n", type=int, default=8, help="samples N (default 8)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 4
    H, O = args.hidden_dim or args.in_dim, args.out_dim or args.in_dim
    try:
        rows = run(args.in_dim, H, O, args.n, args.seed)
    except (ValueError, TypeError) as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    print(f"D={args.in_dim} H={H} O={O} N={args.n} seed={args.seed}  (device {jax.devices()[0]})")
    table = (FIELDS, [[r[k] for k in FIELDS] for r in rows])
    _common.print_table(*table, floatfmt=".2e")
    _common.write_and_report(
        args.out, None, config=vars(args) | {"hidden_dim": H, "out_dim": O},
        metrics={"environment": _common.environment(), "worst_rel": worst(rows), "rows": rows},
        tables={NAME: table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
