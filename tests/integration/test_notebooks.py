"""The notebooks and the figure export run end to end on a tiny random model.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (the venv's interpreter),
from the repository root, with ``REFUSAL_DIR_NOTEBOOK_MODEL`` pointing at a tiny Gemma-2 made by
``make_tiny_model`` and small prompt and token counts. A cell that raises fails the test.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from refusal_dir.testing import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("run_steering", "layer_analysis", "mechanistic")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def notebook_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("notebook-model") / "tiny", n_layers=3)


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_configurable(name: str) -> None:
    notebook = _read(name)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "code"
    assert 'os.environ.get(\n    "REFUSAL_DIR_NOTEBOOK_MODEL"' in first.source
    assert '"google/gemma-2-2b-it" if torch.cuda.is_available() else "gemma-3-270m-offline"' in (
        first.source
    )
    assert "REFUSAL_DIR_NOTEBOOK_N" in first.source
    assert any("# !pip install" in cell.source for cell in notebook.cells[:3])
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks cleared"
            assert "._" not in cell.source, "notebooks call the public API only"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(
    name: str, notebook_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFUSAL_DIR_NOTEBOOK_MODEL", str(notebook_model_dir))
    monkeypatch.setenv("REFUSAL_DIR_NOTEBOOK_N", "6")
    monkeypatch.setenv("REFUSAL_DIR_NOTEBOOK_NEW_TOKENS", "4")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    notebook = _read(name)
    client = NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )
    assert "selected layer" in printed


def test_export_figures_writes_html(notebook_model_dir: Path, tmp_path: Path) -> None:
    from analysis.export_figures import main

    output = tmp_path / "figures"
    status = main(
        [
            "--model",
            str(notebook_model_dir),
            "--output-dir",
            str(output),
            "--n-prompts",
            "6",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "8",
            "--png",
            "no",
        ]
    )
    assert status == 0
    written = sorted(path.name for path in output.iterdir())
    expected = {
        "separation",
        "pca_scatter",
        "projection_histograms",
        "cosine_layers",
        "cosine_methods",
        "refusal_vs_honesty",
        "logit_lens",
        "generation_heatmap",
        "frozen_attention",
        "sparsification",
        "coordinate_overlap",
        "head_attribution",
    }
    assert written == sorted(f"{stem}.html" for stem in expected)
    html = (output / "separation.html").read_text()
    assert "plotly" in html and "separation accuracy" in html


def test_export_figures_reports_bad_model(tmp_path: Path) -> None:
    from analysis.export_figures import main

    assert main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
