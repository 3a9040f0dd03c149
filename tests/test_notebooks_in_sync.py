"""Every chapter is a jupytext source (notebooks/NN_name.py, percent format) paired with its .ipynb,
and the two hold the same cells. Edit either side, then `jupytext --sync notebooks/*.py`."""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))
PAIRED = sorted(NOTEBOOKS.glob("*.ipynb"))
FIX = "edit one side, then run `.venv/bin/jupytext --sync notebooks/*.py`"


def cells(notebook) -> list:
    """What the pair must agree on: each cell's type and source (not outputs, ids or metadata)."""
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_the_chapters_are_jupytext_sources():
    assert SOURCES and PAIRED


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_the_notebook_holds_the_cells_of_its_jupytext_source(source):
    text = jupytext.read(source)
    assert text.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", \
        f"{source.name} must declare its pairing in its header (jupytext --set-formats ipynb,py:percent)"
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{source.name} has no {paired.name}: {FIX}"
    expected, found = cells(text), cells(nbformat.read(paired, as_version=4))
    for index, (want, got) in enumerate(zip(expected, found)):
        assert got == want, f"{paired.name} cell {index} differs from {source.name}: {FIX}\n" \
                            f"--- {source.name}\n{want[1]}\n--- {paired.name}\n{got[1]}"
    assert len(found) == len(expected), \
        f"{paired.name} has {len(found)} cells, {source.name} {len(expected)}: {FIX}"


@pytest.mark.parametrize("notebook", PAIRED, ids=lambda path: path.name)
def test_every_notebook_has_a_jupytext_source(notebook):
    assert notebook.with_suffix(".py").exists(), \
        f"{notebook.name} has no source: `jupytext --set-formats ipynb,py:percent notebooks/{notebook.name}`"
