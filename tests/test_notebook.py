"""docs/walkthrough.ipynb runs top to bottom, and its stored outputs are from the current code."""

import inspect
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import abc_jax

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"

# "manual vs jax.grad   D, H, O = 3, 3, 3   relative error  A 3.6e-16  B ...  (tolerance 1e-12)"
ERROR_LINE = re.compile(
    r"^(?P<method>\w[\w ]*?)\s+vs jax\.grad\s+D, H, O = (?P<shape>[\d, ]+?)\s+relative error"
    r"\s+A (?P<A>\S+)\s+B (?P<B>\S+)\s+C (?P<C>\S+)\s+\(tolerance (?P<tol>\S+)\)$", re.M)
TOLERANCES = {"manual": 1e-12, "finite differences": 1e-7}  # float64


def _stored():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _check_gradient_errors(text):
    rows = [m.groupdict() for m in ERROR_LINE.finditer(text)]
    assert {r["method"] for r in rows} == set(TOLERANCES), text
    assert len({r["shape"] for r in rows}) >= 2, "a square and a rectangular shape"
    for r in rows:
        tol = TOLERANCES[r["method"]]
        assert float(r["tol"]) == tol, r
        assert all(float(r[p]) <= tol for p in "ABC"), r


def test_stored_notebook_ran_top_to_bottom_and_is_small():
    nb = _stored()
    nbformat.validate(nb)
    assert NOTEBOOK.stat().st_size < 1_000_000
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert "jax_enable_x64" in code[0].source
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # graph and three plots
    assert str(ROOT) not in json.dumps(nb)  # no paths of the machine it ran on
    for c in code:  # no progress bar in a stored notebook's output
        assert "abc_jax.train" not in c.source or "progress=False" in c.source


def test_stored_derivation_is_the_current_code():
    """Each code line printed beside the homework's derivation is a line of the current _vjp."""
    printed = _stdout(_cell(_stored(), "derivation")).splitlines()
    code = [line.split("│", 1)[1].strip() for line in printed]
    source = [line.strip() for line in inspect.getsource(abc_jax.core.backward.vjp).splitlines()]
    assert [c.split("=")[0].strip() for c in code] == ["gw", "gC", "gz", "gu", "gB", "gy", "gA",
                                                       "gx"]
    assert all(c in source for c in code), code


@pytest.mark.integration
def test_notebook_runs_top_to_bottom():
    """Execute the notebook in the python3 kernel of this environment; any error fails."""
    nb = _stored()
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    assert _stdout(nb.cells[-1]).strip() == sys.prefix  # the kernel is this venv's python
    _check_gradient_errors(_stdout(_cell(nb, "gradient-check")))
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]
