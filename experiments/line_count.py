"""Where abc_jax's code lines are, by role: the mathematics against everything around it.

Counts the code lines of every module of abc_jax/ at a git revision (default: the working
tree), without docstrings, comments or blank lines (Python's own tokenizer and AST), and
sums them by what the module is for. With --before REV it counts that revision too, so a
redesign shows what it moved. Writes config.json, metrics.json, line_count.csv and
line_count.png under --out.

    python -m experiments.line_count --before HEAD~5
"""

from __future__ import annotations

import ast
import dataclasses
import io
import subprocess
import sys
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import common

NAME = "line_count"
ROOT = Path(__file__).resolve().parent.parent
# what each module is for; a module not listed counts as "other"
ROLES = {
    "mathematics": ("core/model.py", "core/backward.py", "core/tangents.py", "core/norms.py",
                    "core/oracles.py", "core/update.py", "core/curvature.py"),
    "training methods": ("engine/steps.py", "engine/privacy.py", "engine/second_order.py"),
    "training loop": ("engine/loop.py", "engine/pipeline.py", "engine/train.py",
                      "engine/validation.py", "engine/config.py"),
    "checks and dispatch": ("edge.py", "api.py", "engine/arguments.py"),
    "files, devices, processes": ("files.py", "checkpoint.py", "atomic.py", "parallel.py",
                                  "data.py"),
    "data and models around it": ("preprocessing.py", "sklearn.py", "graph.py"),
}
ORDER = (*ROLES, "other")


@dataclasses.dataclass(frozen=True)
class Config:
    """The revisions to count."""

    revision: str | None = common.flag(None, "a git revision to count (default: the working "
                                       "tree)", metavar="REV")
    before: str | None = common.flag(None, "a second revision to count beside it",
                                     metavar="REV")
    quick: bool = False


QUICK = Config(quick=True)


def code_lines(source: str) -> int:
    """Lines holding code: a token other than a comment, a newline or indentation, and not
    inside a docstring (a string that is the first statement of a module, class or def)."""
    tree = ast.parse(source)
    docs: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and \
                isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING}
    lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type not in skip}
    return len(lines - docs)


def sources(revision: str | None) -> dict[str, str]:
    """abc_jax's modules (path under abc_jax/ -> source) at ``revision`` (None: on disk)."""
    if revision is None:
        return {str(p.relative_to(ROOT / "abc_jax")): p.read_text()
                for p in sorted((ROOT / "abc_jax").rglob("*.py"))}
    try:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "abc_jax/"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise common.cli.Failed(f"cannot list abc_jax/ at revision {revision!r}: "
                                f"{getattr(e, 'stderr', '') or e}".strip(), 2) from None
    return {n.removeprefix("abc_jax/"): subprocess.run(
        ["git", "show", f"{revision}:{n}"], cwd=ROOT, capture_output=True, text=True,
        check=True).stdout for n in names.split() if n.endswith(".py")}


def role(module: str) -> str:
    return next((r for r, mods in ROLES.items() if module in mods), "other")


def count(revision: str | None) -> dict[str, Any]:
    """Code lines per module and per role, and each role's share of the total."""
    modules = {m: code_lines(s) for m, s in sources(revision).items()}
    roles = {r: sum(n for m, n in modules.items() if role(m) == r) for r in ORDER}
    total = sum(modules.values())
    return {"revision": revision or "working tree", "total": total, "modules": modules,
            "roles": roles, "shares": {r: n / total for r, n in roles.items()}}


def run(cfg: Config) -> dict[str, Any]:
    """The counts of ``revision`` (and ``before``)."""
    counts = {"after": count(cfg.revision)}
    if cfg.before is not None:
        counts["before"] = count(cfg.before)
    return {"config": dataclasses.asdict(cfg), "environment": common.environment(), **counts}


def plot(res: dict[str, Any]) -> Any:
    """Code lines by role, one bar per revision."""
    fig, ax = common.figure(width=7, height=3.2)
    shown = [k for k in ("before", "after") if k in res]
    for i, k in enumerate(shown):
        left = 0
        for j, r in enumerate(ORDER):
            n = res[k]["roles"][r]
            ax.barh(i, n, left=left, color=f"C{j}", label=r if i == 0 else None)
            left += n
    ax.set_yticks(range(len(shown)), [f"{k}: {res[k]['revision']}" for k in shown])
    ax.set(xlabel="code lines (no docstrings, comments, blank lines)",
           title="abc_jax's code lines by role")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4)
    return fig


def report(res: dict[str, Any], out: Any, docs: Any = None) -> dict[str, Any]:
    """Print the table of roles; write config.json, metrics.json, line_count.csv and .png."""
    shown = [k for k in ("before", "after") if k in res]
    header = ["role", *(f"{k} lines" for k in shown), *(f"{k} %" for k in shown)]
    rows = [[r, *(res[k]["roles"][r] for k in shown),
             *(100 * res[k]["shares"][r] for k in shown)] for r in ORDER]
    rows.append(["total", *(res[k]["total"] for k in shown), *(100.0 for _ in shown)])
    common.print_table(header, rows, ".1f")
    modules = sorted(set().union(*(res[k]["modules"] for k in shown)))
    per_module = (["module", "role", *shown], [[m, role(m), *(res[k]["modules"].get(m) for k in
                                                              shown)] for m in modules])
    return common.write_and_report(
        NAME, out, docs, [NAME], config=res["config"],
        metrics={k: res[k] for k in ("environment", *shown)},
        tables={NAME: (header, rows), "modules": per_module}, figures={NAME: plot(res)})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, report; the exit code."""
    return common.cli.main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
