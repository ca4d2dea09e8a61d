"""The notebooks and the figure export run end to end on a tiny random model.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (the venv's interpreter),
from the repository root, with ``REFUSAL_DIR_NOTEBOOK_MODEL`` pointing at a tiny Gemma-2 made by
``make_tiny_model`` and small prompt and token counts. A cell that raises fails the test, and so
does a call that uses one of the library's old names (docs/glossary.md): a first cell, added here
and not in the notebook, turns those DeprecationWarnings into errors and checks that the kernel
imports this checkout's ``refusal_dir``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from refusal_dir.testing import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("run_steering", "layer_analysis", "mechanistic")
TIMEOUT_S = 300
# The messages of refusal_dir's and analysis's own deprecations (old keywords, keys, modules).
OWN_DEPRECATIONS = (
    r".*\(docs/glossary\.md\)|refusal_dir\.\S+ (is deprecated|moved)|addition\(layer=\["
)
SETUP = f"""\
import warnings

warnings.filterwarnings("error", message={OWN_DEPRECATIONS!r}, category=DeprecationWarning)
import refusal_dir

print("refusal_dir from", refusal_dir.__file__)
"""


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
    assert (
        '"google/gemma-2-2b-it" if torch.cuda.is_available() '
        'else "qwen2.5-coder-0.5b-instruct-offline"'
    ) in first.source
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
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout
    notebook = _read(name)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
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
    assert f"refusal_dir from {REPO / 'refusal_dir' / '__init__.py'}" in printed
    assert "selected layer" in printed


@pytest.mark.parametrize(
    "message",
    [
        "compare_generation_projections(direction_layer=) is deprecated: use layer= (docs/glossary.md)",
        "config key steering.positions is deprecated: rename it to steering.apply_to (docs/glossary.md)",
        "refusal_dir.scoring is deprecated: import from refusal_dir.selection",
        "refusal_dir.organism moved to refusal_dir.testing.organism: import it from there",
        "addition(layer=[...]) is deprecated: use layer= (whose direction) and at_layers= (where)",
    ],
)
def test_the_setup_cell_turns_own_deprecations_into_errors(message: str) -> None:
    with warnings.catch_warnings():
        exec(SETUP, {})
        with pytest.raises(DeprecationWarning):
            warnings.warn(message, DeprecationWarning, stacklevel=1)
        with pytest.warns(DeprecationWarning):  # another library's: still only a warning
            warnings.warn("datetime.utcnow() is deprecated", DeprecationWarning, stacklevel=1)


def test_export_figures_writes_html(notebook_model_dir: Path, tmp_path: Path) -> None:
    from analysis.export_figures import main

    output = tmp_path / "figures"
    arguments = [
        "--model",
        str(notebook_model_dir),
        "--output-dir",
        str(output),
        "--n-prompts",
        "6",
    ]
    arguments += ["--max-new-tokens", "3", "--batch-size", "8", "--png", "no"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=OWN_DEPRECATIONS, category=DeprecationWarning)
        status = main(arguments)
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
