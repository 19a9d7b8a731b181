"""notebooks/quickstart.ipynb runs top to bottom (it asserts on its own outputs)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(demo_models_dir: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel is this interpreter's (python3 -> sys.executable, the venv)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "Paris" in outputs
