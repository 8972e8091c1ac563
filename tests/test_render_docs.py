"""The pages' measured numbers are their committed results, rendered: README.md and docs/*.md
equal what ``python -m experiments.render_docs`` makes of them."""

from __future__ import annotations

import json

import pytest

from experiments import render_docs


def test_every_page_equals_its_rendering_from_the_committed_results():
    stale = [str(p) for p in render_docs.pages() if render_docs.render(p.read_text())
             != p.read_text()]
    assert not stale, f"run python -m experiments.render_docs: {stale} differ from docs/results"


def test_the_pages_render_numbers_and_every_results_file_says_where_it_ran():
    used = {m["name"] for p in render_docs.pages()
            for m in render_docs.MARKER.finditer(p.read_text())}
    files = {p.stem for p in (render_docs.ROOT / render_docs.RESULTS).glob("*.json")}
    assert used and used <= files
    for name in used:
        env = render_docs.results(name)["environment"]
        assert env["jax_version"] and env["date_utc"], name


@pytest.fixture
def results_dir(tmp_path):
    (tmp_path / render_docs.RESULTS).mkdir(parents=True)
    data = {"ratio": 1.2345, "by name": {"a b.c": [7, 8]}, "rows": [{"K": 64, "N": 1024, "t": 2e-6},
                                      {"K": 64, "N": 4096, "t": 5e-6}],
            "table": {"header": ["K", "t"], "rows": [[64, 2.0], [256, None]]},
            "environment": {"device": "cpu", "cpu_count": 2, "jax_version": "0.1",
                            "date_utc": "2026-12-07T10:00:00+00:00"}}
    (tmp_path / render_docs.RESULTS / "demo.json").write_text(json.dumps(data))
    render_docs.results.cache_clear()
    yield tmp_path
    render_docs.results.cache_clear()


def test_values_filters_tables_and_machine_lines(results_dir):
    text = ("a <!--= demo ratio :.2f -->?<!--/--> b <!--= demo ratio x -->1<!--/--> "
            "c <!--= demo rows[N=4096].t us -->0<!--/--> d <!--= demo environment machine -->"
            "<!--/-->\n<!--= demo table table:.2f -->\nold\n<!--/-->")
    out = render_docs.render(text, results_dir)
    assert out == ("a <!--= demo ratio :.2f -->1.23<!--/--> b <!--= demo ratio x -->1.23x"
                   "<!--/--> c <!--= demo rows[N=4096].t us -->5.0 µs<!--/--> d "
                   "<!--= demo environment machine -->cpu, 2 CPU cores, JAX 0.1, 2026-12-07"
                   "<!--/-->\n<!--= demo table table:.2f -->\n| K | t |\n|---|---|\n| 64 | 2.00 |\n"
                   "| 256 | \u2013 |\n<!--/-->")
    assert render_docs.render(out, results_dir) == out  # rendering is idempotent
    assert render_docs.render("<!--= demo [by name][a b.c][1] -->?<!--/-->", results_dir) == (
        "<!--= demo [by name][a b.c][1] -->8<!--/-->")


@pytest.mark.parametrize("marker, message", [
    ("<!--= nothing ratio -->1<!--/-->", "no results file docs/results/nothing.json"),
    ("<!--= demo ratios -->1<!--/-->", "'ratios': nothing at 'ratios'"),
    ("<!--= demo rows[N=7].t -->1<!--/-->", "nothing at 'N=7'"),
    ("<!--= demo ratio :d -->1<!--/-->", "Unknown format code 'd'"),
])
def test_a_marker_that_does_not_resolve_is_named(results_dir, marker, message):
    with pytest.raises(render_docs.RenderError, match=message.replace("[", r"\[")):
        render_docs.render(marker, results_dir)
