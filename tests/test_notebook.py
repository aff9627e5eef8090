"""The exploration notebook: committed without outputs, and runs top to bottom with small settings."""

import json
import os
from pathlib import Path

import pytest

from conftest import REAL_DATA_DIR, requires_real_data

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells and all(not cell["outputs"] and cell["execution_count"] is None for cell in code_cells)
    first = "".join(code_cells[0]["source"])
    assert "KERAS_BACKEND" in first and "select_backend" in first  # the first cell picks the backend


@pytest.mark.slow
@pytest.mark.real_data
@requires_real_data
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="the notebook needs a Python kernel: pip install ipykernel")
    # The kernel inherits this environment: the suite's backend and tiny settings.
    monkeypatch.setenv("FMNIST_DATA_DIR", str(REAL_DATA_DIR))
    monkeypatch.setenv("FMNIST_NB_SUBSET", "1000")
    monkeypatch.setenv("FMNIST_NB_EPOCHS", "1")
    monkeypatch.setenv("FMNIST_NB_TEST", "300")
    monkeypatch.setenv("FMNIST_NB_DEVICE", "cpu")
    monkeypatch.setenv("FMNIST_NB_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 9  # samples, 2 curves, confusion, mistakes, filters, feature maps, saliency, embedding
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # the notebook's one run directory
    for name in ("mlp", "cnn"):
        history = (run / name / "history.csv").read_text().strip().splitlines()
        assert len(history) == 2  # header and the one epoch asked for
    assert (run / "cnn" / "report.md").is_file()
