"""Render the measured numbers of README.md and docs/*.md from the committed results.

Every measured number on those pages sits between two HTML comments that say where it
comes from; this command rewrites what is between them from ``docs/results/NAME.json``
(the results an experiment wrote with ``--docs docs``: its metrics, tables, machine,
versions and date). A value::

    <!--= bench_step ratios.batch_grad :.2f -->1.21<!--/-->

is ``format(results["ratios"]["batch_grad"], ".2f")`` of docs/results/bench_step.json.
The path is dotted keys and list indices; ``[a key]`` is a key with spaces or dots
(``summary[ABC without bias].r2``), and ``[k=v,...]`` picks the first dict of a list whose
fields match (``rows[K=64,N=1024,method=clipped].median_s``). The format is a
Python format spec after a colon (``:.3g``), or one of:

- ``table`` or ``table:.3g``: a Markdown table of ``{"header": [...], "rows": [[...]]}``
  (a results file's ``tables.NAME``), its floats in the given format, None as "–";
- ``machine``: the ``environment`` block as one line (device, CPUs, JAX version, date);
- ``x``: a ratio as ``1.21x`` (two significant decimals), ``us``: seconds as microseconds.

Tables go on lines of their own, between a marker line and ``<!--/-->``.

    python -m experiments.render_docs          # rewrite the pages
    python -m experiments.render_docs --check  # exit 1 and list what differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/*.md")
RESULTS = "docs/results"
# <!--= NAME PATH [FORMAT] -->VALUE<!--/-->; VALUE may span lines (tables)
MARKER = re.compile(r"<!--= (?P<name>[\w-]+) (?P<path>(?:[^\s\[]|\[[^\]]*\])+)"
                    r"(?: (?P<fmt>[^-]\S*))? -->(?P<value>.*?)<!--/-->", re.S)
STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]|\[([^\]]+)\]")


class RenderError(ValueError):
    """A marker whose results file, path or format does not resolve."""


@cache
def results(name: str, root: Path = ROOT) -> Any:
    path = root / RESULTS / f"{name}.json"
    if not path.is_file():
        raise RenderError(f"no results file {path.relative_to(root)}: run the experiment with "
                          f"--docs docs to write it")
    return json.loads(path.read_text())


def lookup(data: Any, path: str) -> Any:
    """``data`` at the dotted ``path`` (keys, ``[i]`` indices, ``[k=v,...]`` filters)."""
    at = data
    for key, index, where in STEP.findall(path):
        try:
            if key:
                at = at[key]
            elif index:
                at = at[int(index)]
            elif "=" not in where:  # [a key with spaces or dots]
                at = at[where]
            else:
                want = dict(kv.split("=", 1) for kv in where.split(","))
                at = next(d for d in at if all(str(d.get(k)) == v for k, v in want.items()))
        except (KeyError, IndexError, TypeError, StopIteration):
            raise RenderError(f"{path!r}: nothing at {key or index or where!r}") from None
    return at


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "\u2013"  # an en dash
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    return str(value)


def table(value: Any, fmt: str = "") -> str:
    """A Markdown table of ``{"header": [...], "rows": [[...], ...]}``, floats in ``fmt``."""
    header, rows = value["header"], value["rows"]
    cells = [[cell(c, fmt) for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(map(str, header)) + " |",
                      "|" + "|".join("---" for _ in header) + "|",
                      *("| " + " | ".join(row) + " |" for row in cells)])


def machine(env: dict[str, Any]) -> str:
    parts = [env.get("device_label") or env.get("device") or env.get("backend", "?")]
    if env.get("cpu_count"):
        parts.append(f"{env['cpu_count']} CPU cores")
    parts.append(f"JAX {env.get('jax_version', env.get('jax', '?'))}")
    if env.get("date_utc"):
        parts.append(str(env["date_utc"])[:10])
    return ", ".join(parts)


def render_value(value: Any, fmt: str | None) -> str:
    if fmt and fmt.split(":")[0] == "table":
        return "\n" + table(value, fmt.partition(":")[2]) + "\n"
    if fmt == "machine":
        return machine(value)
    if value is None:
        return "-"
    if fmt == "x":
        return f"{value:.2f}x"
    if fmt == "us":
        return f"{value * 1e6:.1f} µs"
    return format(value, (fmt or "").removeprefix(":"))


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every marker's value rendered from its results file."""
    def one(m: re.Match[str]) -> str:
        try:
            value = render_value(lookup(results(m["name"], root), m["path"]), m["fmt"])
        except RenderError as err:
            raise RenderError(f"<!--= {m['name']} {m['path']} -->: {err}") from None
        except (ValueError, TypeError) as err:
            raise RenderError(f"<!--= {m['name']} {m['path']} {m['fmt']} -->: {err}") from None
        head = m.group(0)[: m.start("value") - m.start()]
        return f"{head}{value}<!--/-->"

    return MARKER.sub(one, text)


def pages(root: Path = ROOT) -> Iterable[Path]:
    for pattern in PAGES:
        yield from sorted(root.glob(pattern))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.render_docs",
                                 description=__doc__.split("\n")[0],
                                 epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a page differs from its rendering")
    args = ap.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        try:
            new = render(text)
        except RenderError as err:
            print(f"{page.relative_to(ROOT)}: {err}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    n = sum(len(MARKER.findall(p.read_text())) for p in pages())
    verb = "differ from their results" if args.check else "rendered anew"
    print(f"{n} values on {len(list(pages()))} pages; "
          + (f"{len(stale)} {verb}: {', '.join(map(str, stale))}" if stale else "all up to date"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
