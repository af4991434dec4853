"""The notebooks execute top to bottom on their tiny settings."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"


def _execute(path: Path) -> str:
    """Runs the notebook at ``path`` and returns the text of its outputs."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts.append(out.get("text", ""))
            texts.append(out.get("data", {}).get("text/markdown", ""))
    return "".join(texts)


def test_quickstart_notebook_runs():
    outputs = _execute(NOTEBOOK)
    assert "fedper" in outputs and "accuracy" in outputs


def test_sweep_notebook_runs():
    outputs = _execute(NOTEBOOKS / "sweep.ipynb")
    assert "4 runs:" in outputs and "4 run, 0 skipped" in outputs
    assert "lr 0.05  seed 1: complete" in outputs
    assert "(best)" in outputs  # the results table


def test_incentives_notebook_runs():
    outputs = _execute(NOTEBOOKS / "incentives.ipynb")
    assert "shaping targets" in outputs and "largest gain from deviating" in outputs
    assert "max |delivered - target|" in outputs
    assert "incfl   accuracy" in outputs and "IPR" in outputs


def test_clock_notebook_runs():
    outputs = _execute(NOTEBOOKS / "clock.ipynb")
    assert "wait_all" in outputs and "fedbuff" in outputs
    assert "participation [" in outputs and "virtual time" in outputs


def test_natural_data_notebook_runs():
    outputs = _execute(NOTEBOOKS / "natural_data.ipynb")
    assert "FEMNIST-shaped, ragged" in outputs and "StackOverflow-shaped, padded" in outputs
    assert "fedper  accuracy" in outputs and "transformer token accuracy" in outputs


def test_tuning_notebook_runs():
    outputs = _execute(NOTEBOOKS / "tuning.ipynb")
    assert "-> chosen {'lr'" in outputs and "fedper  test accuracy" in outputs


def test_privacy_notebook_runs():
    outputs = _execute(NOTEBOOKS / "privacy.ipynb")
    assert "target ε 2: calibrated σ = " in outputs and "no DP    round 6" in outputs
    assert "ε ≤ 2    round 6" in outputs and "cohort " in outputs
