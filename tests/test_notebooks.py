"""Executes every notebook in colabs/ in its small mode (MEMJAX_NOTEBOOK_SMALL=1)."""

import pathlib

import nbclient
import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("MEMJAX_NOTEBOOK_SMALL", "1")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(COLABS)}})
  client.execute()  # Raises CellExecutionError, with the cell's traceback, on any error.
