"""Is the hand-derived gradient right? Manual vs jax.grad vs finite differences.

For one shape (default the homework's K = 3) and a random batch, prints the max
absolute and relative error per parameter in float32 and float64, and writes
config.json, metrics.json and gradcheck.csv under --out.

    python experiments/gradcheck.py --in-dim 7 --hidden-dim 5 --out-dim 3
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import abc_jax  # noqa: E402
from abc_jax import files as io  # noqa: E402


def run(in_dim: int, hidden_dim: int, out_dim: int, n: int, seed: int) -> list[dict]:
    """Rows of (dtype, param, comparison, max_abs, rel) for both dtypes."""
    rows = []
    kp, kx = jax.random.split(jax.random.key(seed))
    for dtype in (jnp.float32, jnp.float64):
        params = abc_jax.init_params(kp, in_dim, hidden_dim, out_dim, dtype=dtype)
        X = jax.random.normal(kx, (n, in_dim), dtype)
        manual = abc_jax.batch_grad(params, X)
        oracle = abc_jax.oracle_grad(params, X)
        fd = abc_jax.fd_grad(params, X)
        for comparison, errs in (
            ("manual vs jax.grad", abc_jax.grad_errors(manual, oracle)),
            ("finite diff vs jax.grad", abc_jax.grad_errors(fd, oracle)),
        ):
            for name, e in errs.items():
                rows.append(
                    dict(dtype=jnp.dtype(dtype).name, param=name, comparison=comparison, **e)
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-dim", type=int, default=3, help="D (default 3)")
    ap.add_argument("--hidden-dim", type=int, default=None, help="H (default D)")
    ap.add_argument("--out-dim", type=int, default=None, help="O (default D)")
    ap.add_argument("--n", type=int, default=8, help="samples N (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/gradcheck", help="results folder")
    args = ap.parse_args(argv)
    H = args.hidden_dim or args.in_dim
    O = args.out_dim or args.in_dim
    try:
        rows = run(args.in_dim, H, O, args.n, args.seed)
    except (ValueError, TypeError) as e:
        print(f"gradcheck: error: {e}", file=sys.stderr)
        return 2
    print(f"D={args.in_dim} H={H} O={O} N={args.n} seed={args.seed}  (device {jax.devices()[0]})")
    print(f"{'dtype':8} {'param':5} {'comparison':24} {'max abs err':>12} {'rel err':>10}")
    for r in rows:
        print(
            f"{r['dtype']:8} {r['param']:5} {r['comparison']:24} "
            f"{r['max_abs']:12.2e} {r['rel']:10.2e}"
        )
    worst = {
        f"{dt}/{cmp}": max(r["rel"] for r in rows if r["dtype"] == dt and r["comparison"] == cmp)
        for dt in ("float32", "float64")
        for cmp in ("manual vs jax.grad", "finite diff vs jax.grad")
    }
    config = dict(vars(args), hidden_dim=H, out_dim=O)
    io.write_json(f"{args.out}/config.json", config)
    io.write_json(f"{args.out}/metrics.json", {"worst_rel": worst, "rows": rows})
    io.write_csv(
        f"{args.out}/gradcheck.csv",
        ["dtype", "param", "comparison", "max_abs", "rel"],
        ([r[k] for k in ("dtype", "param", "comparison", "max_abs", "rel")] for r in rows),
    )
    print(f"wrote {args.out}/metrics.json, gradcheck.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
