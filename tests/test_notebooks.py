"""Execute every tutorial notebook (notebooks/*.ipynb) from a fresh kernel.

The kernel is a subprocess, so the pytest ``filterwarnings = error`` setting does not
reach the notebook code; a warning there is shown in the notebook, an exception fails
the test. Plots use the Agg backend (no display). Each notebook is kept well under two
minutes on two CPU cores.
"""

from __future__ import annotations

import os
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 180


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install -e .[test])")
    nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install -e .[test])")
    pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install -e .[test])")
    pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib (pip install -e .[test])")
    # The kernel inherits the environment: no display, and the repository importable.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # The notebooks' tensors are tiny: one thread avoids OpenMP spinning on a shared 2-core box.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # show the failing cell, not the client internals
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)


def test_notebooks_have_no_outputs() -> None:
    """Notebooks are committed without outputs (the docs render them as sources)."""
    nbformat = pytest.importorskip("nbformat")
    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs: strip them"
