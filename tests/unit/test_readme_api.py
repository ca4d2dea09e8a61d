"""The README's Python API example runs (issue #16), on a tiny model with 3 prompts per set."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_python_api_example_runs(tiny_model_dir, monkeypatch) -> None:
    import plotly.graph_objects as go

    source = _example()
    assert 'load_model("qwen2.5-coder-0.5b-instruct-offline")' in source
    assert "sweep(" in source and "Steer(" in source and "result.plot()" in source
    source = source.replace('"qwen2.5-coder-0.5b-instruct-offline"', repr(str(tiny_model_dir)))
    source = source.replace("[:16]", "[:3]").replace("result.plot().show()", "figure = result.plot()")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    assert isinstance(namespace["figure"], go.Figure)
    assert {row["alpha"] for row in namespace["result"].rows} == {0.0, 1.0, 2.0, 4.0}
