"""Fault injection (issue #13): every way a run could lose data, give a silently wrong result or
end in a traceback, reproduced on tiny random models.

Each test asserts one of: the user's files are intact; bad input ends in one line and exit 2;
a resume gives results identical to an uninterrupted run; a resume that would mix results is
refused. Disk-full and read-only cases run on a real tmpfs when the tests run as root (else
skipped) and always in a simulated form (an ``OSError`` injected into the writes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from refusal_dir import outdir, shards
from refusal_dir.cli import main
from refusal_dir.config import config_from_dict
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError, DirectionMismatchError, OutputDirError
from refusal_dir.model import load_model
from refusal_dir.testing import make_tiny_model

DATA = Path(__file__).resolve().parents[2] / "refusal_dir" / "data"
PART_GROUPS = ("harmful_generation", "benign_generation", "refusal_score", "mmlu", "kl", "cross_entropy")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def cli(capsys, *arguments: object) -> tuple[int, str]:
    code = main([str(a) for a in arguments])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *fragments: str) -> str:
    """Exit 2 and exactly one error line (progress bars aside), naming each fragment."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("refusal-dir")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


def leftovers(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob(f"{outdir.TEMP_PREFIX}*") if p.name != outdir.MARKER_NAME]


def write_config(path: Path, model_dir: Path, pairs: Path, **sections: dict) -> Path:
    settings = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"max_eval_prompts": 4, "refusal_pairs": str(pairs)},
        "extraction": {"methods": ["mean_diff"], "sites": ["resid_pre"], "selection": "separation"},
        "steering": {"alphas": [-1.0, 0.0, 1.0], "methods": ["addition"]},
        "generation": {"max_new_tokens": 4},
        "evaluation": {"honesty": False, "bootstrap_resamples": 100},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values}
    path.write_text(yaml.safe_dump(settings))
    return path


class Base:
    """One uninterrupted tiny `run`: its config, output directory and results."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root = root
        self.model_dir = model_dir
        self.pairs = root / "pairs.jsonl"
        self.pairs.write_text("".join((DATA / "refusal_pairs.jsonl").read_text().splitlines(True)[:8]))
        self.config = write_config(root / "config.yaml", model_dir, self.pairs)
        self.out = root / "base"
        self.directions = self.out / "directions"

    def results(self, directory: Path | None = None) -> list[dict]:
        return json.loads(((directory or self.out) / "results.json").read_text())

    def copy(self, destination: Path, *, keep_parts: int = 0) -> Path:
        """A copy of the finished run with all but ``keep_parts`` sweep parts and no results."""
        shutil.copytree(self.out, destination)
        for name in ("results.json", "results.csv", "report.md"):
            (destination / name).unlink()
        for index, group in enumerate(PART_GROUPS):
            if index >= keep_parts:
                (destination / "sweep" / "parts" / f"addition__{group}.json").unlink()
        return destination


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Base:
    run = Base(tmp_path_factory.mktemp("faults"), tiny_model_dir)
    assert main(["run", "--config", str(run.config), "--output-dir", str(run.out), "--no-figures", "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape as ``tiny_model_dir``, other weights."""
    return make_tiny_model(tmp_path_factory.mktemp("other") / "gemma2", n_layers=3, seed=1)


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``path`` (root only); skips the test where mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, n_ok: int, code: int = errno.ENOSPC) -> None:
    """Simulate a disk that fills up: the (n_ok+1)-th flushed write fails with ``code``."""
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(outdir.os, "fsync", fsync)


def evaluate_args(base: Base, output: Path, *extra: object) -> list[object]:
    return ["evaluate", "--config", base.config, "--directions-dir", base.out, "--output-dir", output, "--quiet", *extra]


# ----------------------------------------------------------------------------------------------
# Data loss
# ----------------------------------------------------------------------------------------------


def _user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n")
    return path


def test_fresh_with_a_bad_input_deletes_nothing(capsys, base: Base, tmp_path: Path) -> None:
    user = snapshot(_user_dir(tmp_path / "mine"))
    code, err = cli(capsys, "evaluate", "--directions-dir", tmp_path / "missing", "--output-dir", tmp_path / "mine", "--fresh", "--quiet")
    assert_one_line(code, err, "selected.json")
    assert snapshot(tmp_path / "mine") == user
    # A marked results directory survives a --fresh whose inputs are bad, too.
    run = base.copy(tmp_path / "run", keep_parts=5)
    before = snapshot(run)
    code, err = cli(capsys, "run", "--config", base.config, "--output-dir", run, "--fresh", "--pairs-file", tmp_path / "nope.jsonl", "--quiet")
    assert_one_line(code, err, "nope.jsonl")
    assert snapshot(run) == before


def test_fresh_refuses_a_directory_refusal_dir_did_not_write(capsys, base: Base, tmp_path: Path) -> None:
    user = snapshot(_user_dir(tmp_path / "mine"))
    for fresh in (["--fresh"], []):
        code, err = cli(capsys, *evaluate_args(base, tmp_path / "mine", *fresh))
        assert_one_line(code, err, "did not write", outdir.MARKER_NAME)
        assert snapshot(tmp_path / "mine") == user


def test_unmarked_folders_with_our_names_are_not_adopted(capsys, base: Base, tmp_path: Path) -> None:
    # A user's folder holding only "directions/" and "figures/" is not an earlier output.
    mine = tmp_path / "mine"
    (mine / "directions").mkdir(parents=True)
    (mine / "figures").mkdir()
    (mine / "directions" / "keep.txt").write_text("mine")
    (mine / "figures" / "plot.png").write_text("mine")
    user = snapshot(mine)
    for fresh in (["--fresh"], []):
        code, err = cli(capsys, *evaluate_args(base, mine, *fresh))
        assert_one_line(code, err, outdir.MARKER_NAME)
        assert snapshot(mine) == user
    code, err = cli(capsys, "extract", "--config", base.config, "--output-dir", mine, "--quiet")
    assert_one_line(code, err, outdir.MARKER_NAME)
    assert snapshot(mine) == user
    # An earlier version's output (unmarked, but with its config file) resumes; --fresh is refused.
    legacy = base.copy(tmp_path / "legacy", keep_parts=5)
    (legacy / outdir.MARKER_NAME).unlink()
    before = snapshot(legacy)
    code, err = cli(capsys, "run", "--config", base.config, "--output-dir", legacy, "--fresh", "--quiet")
    assert_one_line(code, err, "no " + outdir.MARKER_NAME)
    assert snapshot(legacy) == before


def test_fresh_never_deletes_the_directions_it_reads(capsys, base: Base, tmp_path: Path) -> None:
    run = base.copy(tmp_path / "run", keep_parts=5)
    before = snapshot(run)
    for directions in (run, run / "directions"):
        code, err = cli(capsys, "evaluate", "--config", base.config, "--directions-dir", directions, "--output-dir", run, "--fresh", "--quiet")
        assert_one_line(code, err, "which this command reads")
        assert snapshot(run) == before


def test_fresh_never_deletes_the_working_directory(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    run = base.copy(tmp_path / "run", keep_parts=5)
    (run / "inner").mkdir()
    before = snapshot(tmp_path)
    monkeypatch.chdir(run / "inner")
    for output, message in (("", "is empty"), (".", "current directory"), ("..", "current directory")):
        code, err = cli(capsys, "run", "--config", base.config, "--output-dir", output, "--fresh", "--quiet")
        assert_one_line(code, err, message)
    with pytest.raises(OutputDirError, match="home directory"):
        outdir.check_deletable(Path.home())
    with pytest.raises(OutputDirError, match="root|never deletes"):
        outdir.check_deletable(Path("/"))
    assert snapshot(tmp_path) == before


def test_fresh_empties_only_a_marked_directory_and_keeps_its_marker(tmp_path: Path) -> None:
    with outdir.claim_output_dir(tmp_path / "out") as out:
        (out / "results.json").write_text("[]")
    with outdir.claim_output_dir(tmp_path / "out", fresh=True) as out:
        assert sorted(p.name for p in out.iterdir()) == sorted([outdir.MARKER_NAME, outdir.LOCK_NAME])


def test_export_never_replaces_user_files(capsys, base: Base, tmp_path: Path) -> None:
    user = snapshot(_user_dir(tmp_path / "mine"))
    code, err = cli(capsys, "export", "--directions-dir", base.out, "--output-dir", tmp_path / "mine", "--quiet")
    assert_one_line(code, err, "did not write")
    assert snapshot(tmp_path / "mine") == user
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, "export", "--directions-dir", base.out, "--output-dir", tmp_path / "file", "--quiet")
    assert_one_line(code, err, "is a file")
    assert (tmp_path / "file").read_text() == "x"
    before = snapshot(base.out)
    code, err = cli(capsys, "export", "--directions-dir", base.out, "--output-dir", base.out, "--quiet")
    assert_one_line(code, err, "which this command reads")
    assert snapshot(base.out) == before
    # An earlier export (it carries the marker) is replaced, whole, by the new one.
    assert cli(capsys, "export", "--directions-dir", base.out, "--output-dir", tmp_path / "model", "--quiet")[0] == 0
    (tmp_path / "model" / "stale.bin").write_text("old")
    assert cli(capsys, "export", "--directions-dir", base.out, "--output-dir", tmp_path / "model", "--quiet")[0] == 0
    assert not (tmp_path / "model" / "stale.bin").exists() and (tmp_path / "model" / "config.json").exists()
    assert outdir.owner_kind(tmp_path / "model") == "model"
    assert not leftovers(tmp_path)


def test_export_never_replaces_the_model_its_directions_name(capsys, base: Base, tmp_path: Path) -> None:
    # Directions extracted from an earlier export name it as their model: exporting them into
    # that same directory would replace the weights being read.
    exported = tmp_path / "model"
    assert cli(capsys, "export", "--directions-dir", base.out, "--output-dir", exported, "--quiet")[0] == 0
    assert cli(capsys, "extract", "--config", base.config, "--model", exported, "--output-dir", tmp_path / "dirs", "--quiet")[0] == 0
    before = snapshot(exported)
    code, err = cli(capsys, "export", "--directions-dir", tmp_path / "dirs", "--output-dir", exported, "--quiet")
    assert_one_line(code, err, "which this command reads")
    assert snapshot(exported) == before


# ----------------------------------------------------------------------------------------------
# Silent wrong results
# ----------------------------------------------------------------------------------------------


def _other_directions(base: Base, destination: Path) -> Path:
    """A copy of the base extraction whose steering direction is negated (other content)."""
    shutil.copytree(base.directions, destination)
    selected = json.loads((destination / "selected.json").read_text())
    steering = DirectionSet.load(destination / selected["set"])
    (-steering).save(destination / selected["set"])
    return destination


def test_evaluate_refuses_parts_made_with_other_directions(capsys, base: Base, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert cli(capsys, *evaluate_args(base, out))[0] == 0
    (out / "sweep" / "parts" / "addition__kl.json").unlink()  # as if killed before the last part
    before = snapshot(out)
    other = _other_directions(base, tmp_path / "other")
    code, err = cli(capsys, "evaluate", "--config", base.config, "--directions-dir", other, "--output-dir", out, "--quiet")
    assert_one_line(code, err, "directions_dir", "direction content", "--fresh")
    assert snapshot(out) == before
    # The same directions at another path are another run, too.
    shutil.copytree(base.directions, tmp_path / "moved")
    code, err = cli(capsys, "evaluate", "--config", base.config, "--directions-dir", tmp_path / "moved", "--output-dir", out, "--quiet")
    assert_one_line(code, err, "directions_dir")


def test_resume_refuses_an_edited_data_file(capsys, base: Base, tmp_path: Path) -> None:
    harmful = tmp_path / "harmful.jsonl"
    lines = (DATA / "harmful_eval.jsonl").read_text().splitlines(True)
    harmful.write_text("".join(lines[:8]))
    out = tmp_path / "eval"
    assert cli(capsys, *evaluate_args(base, out, "--harmful-file", harmful))[0] == 0
    (out / "sweep" / "parts" / "addition__refusal_score.json").unlink()  # killed mid-sweep
    before = snapshot(out)
    harmful.write_text("".join(lines[4:12]))  # edited before the resume
    code, err = cli(capsys, *evaluate_args(base, out, "--harmful-file", harmful))
    assert_one_line(code, err, "data harmful_eval changed", "--fresh")
    assert snapshot(out) == before


def test_run_refuses_directions_of_another_extraction(capsys, base: Base, tmp_path: Path) -> None:
    # Older versions wrote the new config first, so a killed re-extraction with token rule
    # `mean` left `last` directions under a config saying `mean`.
    run = base.copy(tmp_path / "run", keep_parts=2)
    recorded = yaml.safe_load((run / "config.resolved.yaml").read_text())
    recorded["extraction"]["token"] = "mean"
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(recorded))
    mean = write_config(tmp_path / "mean.yaml", base.model_dir, base.pairs, extraction={"token": "mean"})
    before = snapshot(run)
    code, err = cli(capsys, "run", "--config", mean, "--output-dir", run, "--no-figures", "--quiet")
    assert_one_line(code, err, "extracted under another config", "--fresh")
    assert snapshot(run) == before


def test_killed_reextraction_keeps_the_previous_directions(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from refusal_dir import extraction

    run = base.copy(tmp_path / "run", keep_parts=5)
    before = snapshot(run)
    saved = extraction.load_extraction(base.directions)
    monkeypatch.setattr(extraction, "_extract", lambda *args, **kwargs: saved)  # skip the compute

    def killed(staging: Path, target: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "swap_in", killed)
    code, _ = cli(capsys, "extract", "--config", base.config, "--output-dir", run, "--token", "mean", "--quiet")
    assert code == 130
    assert snapshot(run) == before  # old directions and old config, no half-written staging


def test_a_second_run_is_refused_while_one_holds_the_directory(capsys, base: Base, tmp_path: Path) -> None:
    run = base.copy(tmp_path / "run", keep_parts=5)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom refusal_dir.outdir import lock_output_dir\n"
         "with lock_output_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        for extra in (["--fresh"], []):
            code, err = cli(capsys, "run", "--config", base.config, "--output-dir", run, "--no-figures", "--quiet", *extra)
            assert_one_line(code, err, "another refusal-dir run holds")
            assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_directions_of_a_same_shape_model_are_refused(capsys, base: Base, other_model_dir: Path) -> None:
    other = load_model(str(other_model_dir), device="cpu", with_bridge=False)
    selected = json.loads((base.directions / "selected.json").read_text())
    with pytest.raises(DirectionMismatchError, match="other weights"):
        DirectionSet.load(base.directions / selected["set"], model=other)
    code, err = cli(capsys, "steer", "--directions-dir", base.out, "--model", other_model_dir, "--prompt", "Hi", "--max-new-tokens", "2", "--quiet")
    assert_one_line(code, err, "other weights")


def test_weights_check_accepts_another_dtype_of_the_same_model(base: Base, tiny_model_dir: Path) -> None:
    selected = json.loads((base.directions / "selected.json").read_text())
    for dtype in ("bfloat16", "float16"):
        model = load_model(str(tiny_model_dir), device="cpu", dtype=dtype, with_bridge=False)
        DirectionSet.load(base.directions / selected["set"], model=model)


def test_an_edited_model_id_is_refused_before_any_model_loads(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from refusal_dir import cli as cli_module

    copy = shutil.copytree(base.directions, tmp_path / "directions")
    selected = json.loads((copy / "selected.json").read_text())
    meta_path = copy / selected["set"] / "directions.json"
    meta = json.loads(meta_path.read_text())
    meta["model_id"] = str(tmp_path / "some-other-model")
    meta_path.write_text(json.dumps(meta))

    def no_load(config):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli_module, "_load", no_load)
    for command in (["steer", "--prompt", "Hi"], ["export", "--output-dir", tmp_path / "model"]):
        code, err = cli(capsys, *command, "--directions-dir", copy, "--quiet")
        assert_one_line(code, err, "checksum mismatch")


def _legacy_copy(base: Base, destination: Path) -> Path:
    """The steering set alone, without its checksum (as an older version wrote it)."""
    selected = json.loads((base.directions / "selected.json").read_text())
    shutil.copytree(base.directions / selected["set"], destination)
    meta = json.loads((destination / "directions.json").read_text())
    meta.pop("checksum")
    (destination / "directions.json").write_text(json.dumps(meta))
    return destination


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d, n: (d.index_fill_(2, torch.tensor([0]), float("nan")), n), "NaN or infinite"),
        (lambda d, n: (d, n.fill_(float("inf"))), "NaN or infinite"),
        (lambda d, n: (d, n.fill_(1e9)), "norms outside"),
        (lambda d, n: (d * 3.0, n), "not 1"),
    ],
    ids=["nan", "inf", "huge", "not-unit"],
)
def test_bad_direction_values_are_refused(capsys, base: Base, tmp_path: Path, edit, message) -> None:
    from safetensors.torch import load_file, save_file

    directory = _legacy_copy(base, tmp_path / "set")
    tensors = load_file(str(directory / "directions.safetensors"))
    directions, norms = edit(tensors["directions"].clone(), tensors["norms"].clone())
    save_file({"directions": directions.contiguous(), "norms": norms.contiguous()}, str(directory / "directions.safetensors"))
    with pytest.raises(DirectionMismatchError, match=message):
        DirectionSet.load(directory)
    code, err = cli(capsys, "steer", "--directions-dir", directory, "--layer", "0", "--prompt", "Hi", "--quiet")
    assert_one_line(code, err, message)


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp", "a/../../b", ".."])
def test_selected_set_outside_the_directory_is_refused(capsys, base: Base, tmp_path: Path, name: str) -> None:
    copy = shutil.copytree(base.directions, tmp_path / "directions")
    selected = json.loads((copy / "selected.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    selected["set"] = name
    (copy / "selected.json").write_text(json.dumps(selected))
    for command in (["steer", "--prompt", "Hi"], ["evaluate", "--output-dir", tmp_path / "out"]):
        code, err = cli(capsys, *command, "--directions-dir", copy, "--quiet")
        assert_one_line(code, err, "must name a direction set inside")


def _steered(tiny_model, base: Base):
    from refusal_dir.interventions import addition

    selected = json.loads((base.directions / "selected.json").read_text())
    directions = DirectionSet.load(base.directions / selected["set"])
    return addition(directions, layer=1, alpha=8.0)


def test_hooks_are_removed_when_reduce_raises(tiny_model, base: Base) -> None:
    from refusal_dir.generation import next_token_logits

    prompts = ["Hi there", "How are you?"]
    unsteered = next_token_logits(tiny_model, prompts)

    def reduce(logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("reduce failed")

    with pytest.raises(RuntimeError, match="reduce failed") as caught:
        next_token_logits(tiny_model, prompts, interventions=[_steered(tiny_model, base)], reduce=reduce)
    assert caught.value is not None  # the exception (and its traceback) is still alive here
    torch.testing.assert_close(next_token_logits(tiny_model, prompts), unsteered, rtol=0, atol=0)


def test_hooks_are_removed_when_kl_divergence_raises(tiny_model, base: Base) -> None:
    from refusal_dir.errors import DataError
    from refusal_dir.evaluation.metrics import kl_divergence
    from refusal_dir.generation import next_token_logits

    prompts = ["Hi there", "How are you?"]
    unsteered = next_token_logits(tiny_model, prompts)
    wrong_vocab = torch.zeros(len(prompts), unsteered.shape[-1] + 1)
    with pytest.raises(DataError, match="logits per row") as caught:
        kl_divergence(tiny_model, prompts, interventions=[_steered(tiny_model, base)], reference_logits=wrong_vocab)
    assert caught.value is not None
    torch.testing.assert_close(next_token_logits(tiny_model, prompts), unsteered, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["no", "false", "yes", 0, 1, None])
def test_yaml_strings_and_numbers_are_not_booleans(capsys, tmp_path: Path, value) -> None:
    with pytest.raises(ConfigError, match="evaluation.honesty: must be true or false"):
        config_from_dict({"evaluation": {"honesty": value}})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"evaluation": {"honesty": value}}))
    code, err = cli(capsys, "run", "--config", config, "--output-dir", tmp_path / "out", "--quiet")
    assert_one_line(code, err, "evaluation.honesty")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# One line, exit 2
# ----------------------------------------------------------------------------------------------


def test_disk_full_is_one_line_leaves_no_temporary_files_and_resumes(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "eval"
    fail_writes_after(monkeypatch, 4)  # marker, config, resume key, first part; then the disk is full
    code, err = cli(capsys, *evaluate_args(base, out))
    assert_one_line(code, err, "No space left on device", "the disk is full")
    assert not leftovers(out)
    assert len(list((out / "sweep" / "parts").glob("*.json"))) == 1
    monkeypatch.undo()  # space freed: the same command resumes and matches an uninterrupted run
    assert cli(capsys, *evaluate_args(base, out))[0] == 0
    assert base.results(out) == base.results()


def test_disk_full_on_a_real_tmpfs(capsys, base: Base, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=32k") as mount:
        code, err = cli(capsys, *evaluate_args(base, mount / "eval"))
        assert_one_line(code, err, "the disk is full")
        assert not leftovers(mount)
        code, err = cli(capsys, "export", "--directions-dir", base.out, "--output-dir", mount / "model", "--quiet")
        assert_one_line(code, err, "the disk is full")
        assert not leftovers(mount) and not (mount / "model").exists()


def test_export_disk_full_simulated(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)  # the in-memory export
    monkeypatch.setattr(shards, "write_file", full)  # the streamed one
    code, err = cli(capsys, "export", "--directions-dir", base.out, "--output-dir", tmp_path / "model", "--quiet")
    assert_one_line(code, err, "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_dir_on_a_real_mount(capsys, base: Base, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        code, err = cli(capsys, *evaluate_args(base, mount / "eval"))
        assert_one_line(code, err, "read-only")


def test_read_only_output_dir_simulated(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = cli(capsys, *evaluate_args(base, tmp_path / "eval"))
    assert_one_line(code, err, "read-only")


def test_an_unexpected_os_error_is_one_line(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from refusal_dir import datasets

    def denied(config):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/pairs.jsonl")

    monkeypatch.setattr(datasets, "load_datasets", denied)
    code, err = cli(capsys, *evaluate_args(base, tmp_path / "eval"))
    assert_one_line(code, err, "/data/pairs.jsonl", "Permission denied")


def _break_selected_list(d: Path) -> None:
    (d / "selected.json").write_text("[1, 2]")


def _break_selected_keys(d: Path) -> None:
    (d / "selected.json").write_text('{"set": "mean_diff_resid_pre"}')


def _break_meta_encoding(d: Path) -> None:
    (d / "mean_diff_resid_pre" / "directions.json").write_bytes(b'{"model_id": "\xff\xfe"}')


def _break_meta_json(d: Path) -> None:
    (d / "mean_diff_resid_pre" / "directions.json").write_text("{")


def _break_meta_type(d: Path) -> None:
    path = d / "mean_diff_resid_pre" / "directions.json"
    meta = json.loads(path.read_text())
    meta.pop("checksum")
    meta["n_layers"] = "three"
    path.write_text(json.dumps(meta))


def _remove_scores(d: Path) -> None:
    (d / "scores.csv").unlink()


def _break_scores(d: Path) -> None:
    (d / "scores.csv").write_text("set,position,layer,separation_accuracy,auroc,effect_size,probe_accuracy\nmean_diff_resid_pre,last,one,x,y,z,\n")


def _drop_score_column(d: Path) -> None:
    (d / "scores.csv").write_text("set,layer\nmean_diff_resid_pre,0\n")


def _missing_effects(d: Path) -> None:
    selected = json.loads((d / "selected.json").read_text())
    selected["rule"] = "effect"
    (d / "selected.json").write_text(json.dumps(selected))


def _selected_json_corrupt(d: Path) -> None:
    (d / "selected.json").write_bytes(b"\x80\x81")


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_selected_list, "must hold a JSON object"),
        (_break_selected_keys, "lacks the key(s) layer, position"),
        (_selected_json_corrupt, "selected.json is corrupt"),
        (_break_meta_encoding, "is corrupt or not a refusal_dir direction file"),
        (_break_meta_json, "is corrupt or not a refusal_dir direction file"),
        (_break_meta_type, "field 'n_layers' has the wrong type"),
        (_remove_scores, "scores.csv is missing"),
        (_break_scores, "scores.csv line 2 is malformed"),
        (_drop_score_column, "lacks the column(s)"),
        (_missing_effects, "layer_effects.csv is missing"),
    ],
)
def test_broken_direction_files_are_one_line(capsys, base: Base, tmp_path: Path, breaker, message) -> None:
    copy = shutil.copytree(base.directions, tmp_path / "directions")
    breaker(copy)
    for command in (["evaluate", "--output-dir", tmp_path / "out"], ["tune", "--output-dir", tmp_path / "tune"]):
        code, err = cli(capsys, *command, "--config", base.config, "--directions-dir", copy, "--quiet")
        assert_one_line(code, err, message)
    if breaker not in (_remove_scores, _break_scores, _drop_score_column, _missing_effects):
        code, err = cli(capsys, "steer", "--directions-dir", copy, "--prompt", "Hi", "--quiet")
        assert_one_line(code, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (lambda run: (run / "sweep" / "parts" / "addition__harmful_generation.json").write_text('{"rows": ['), "sweep part"),
        (lambda run: (run / "sweep" / "parts" / "addition__harmful_generation.json").write_text('{"rows": [1]}'), "not a part written by refusal-dir"),
        (lambda run: (run / "config.resolved.yaml").write_text("model: [unclosed"), "config.resolved.yaml is corrupt"),
        (lambda run: (run / "config.resolved.yaml").write_bytes(b"\xff\xfe"), "config.resolved.yaml is corrupt"),
        (lambda run: (run / "config.resolved.yaml").write_text("- a list"), "config.resolved.yaml is corrupt"),
    ],
    ids=["part-truncated", "part-foreign", "config-yaml", "config-encoding", "config-list"],
)
def test_corrupt_resume_state_is_one_line(capsys, base: Base, tmp_path: Path, breaker, message) -> None:
    run = base.copy(tmp_path / "run", keep_parts=2)
    breaker(run)
    before = snapshot(run)
    code, err = cli(capsys, "run", "--config", base.config, "--output-dir", run, "--no-figures", "--quiet")
    assert_one_line(code, err, message)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"generation": {"batch_size": "abc"}}, "generation.batch_size: must be an integer"),
        ({"generation": {"max_new_tokens": 4.5}}, "generation.max_new_tokens: must be an integer"),
        ({"steering": {"alphas": 1.0}}, "steering.alphas: must be a list of numbers"),
        ({"steering": {"alphas": ["a"]}}, "steering.alphas: must be a list of numbers"),
        ({"extraction": {"max_kl": "1e-2"}}, "write 1.0e-2"),
        ({"extraction": {"sites": "resid_pre"}}, "extraction.sites: must be a list of strings"),
        ({"data": {"max_eval_prompts": True}}, "data.max_eval_prompts: must be an integer or null"),
        ({"model": ["a"]}, "must be a mapping"),
        ({"model": {"name": 3}}, "model.name: must be a string"),
    ],
)
def test_badly_typed_config_values_are_one_line(capsys, tmp_path: Path, settings, message) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    code, err = cli(capsys, "run", "--config", config, "--output-dir", tmp_path / "out", "--quiet")
    assert_one_line(code, err, message)


def test_a_non_utf8_config_is_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"model:\n  name: \xff\n")
    code, err = cli(capsys, "run", "--config", tmp_path / "c.yaml", "--output-dir", tmp_path / "out", "--quiet")
    assert_one_line(code, err, "UTF-8")


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--fresh"],
        ["evaluate", "--fresh", "--directions-dir", "{base}"],
        ["tune", "--directions-dir", "{base}"],
        ["export", "--directions-dir", "{base}"],
        ["extract"],
    ],
    ids=lambda c: c[0],
)
def test_an_output_path_that_is_a_file_is_one_line(capsys, base: Base, tmp_path: Path, command) -> None:
    (tmp_path / "file").write_text("keep me")
    filled = [part.format(base=base.out) for part in command]
    code, err = cli(capsys, *filled, "--config", base.config, "--output-dir", tmp_path / "file", "--quiet")
    assert_one_line(code, err, "is a file")
    assert (tmp_path / "file").read_text() == "keep me"


HUB_OFFLINE = """
import logging, sys
from refusal_dir import model as model_module

original = model_module._load_hf_model

def noisy_load(*args, **kwargs):
    # transformers (and with it huggingface_hub) is first imported here, as in a real run.
    import transformers

    def offline(*args, **kwargs):
        log = logging.getLogger("huggingface_hub.utils._http")
        for attempt in range(1, 6):
            log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x/config.json")
            log.warning("Retrying in %ds [Retry %d/5].", attempt, attempt)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")

    transformers.AutoTokenizer.from_pretrained = offline
    return original(*args, **kwargs)

model_module._load_hf_model = noisy_load
from refusal_dir.cli import main
sys.exit(main(["extract", "--model", "some-org/some-model", "--output-dir", sys.argv[1], "--quiet"]))
"""


def test_hub_retry_noise_is_one_line(tmp_path: Path) -> None:
    # A process of its own: under pytest the root logger's handlers would hide the noise.
    done = subprocess.run([sys.executable, "-c", HUB_OFFLINE, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "cannot load model 'some-org/some-model'" in done.stderr


def test_prompts_longer_than_the_context_are_refused(capfd, base: Base, tmp_path: Path) -> None:
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text(json.dumps({"instruction": "Tell me a story. " * 200}) + "\n" + json.dumps({"instruction": "Hi"}) + "\n")
    code = main([str(a) for a in evaluate_args(base, tmp_path / "eval", "--harmful-file", harmful)])
    err = capfd.readouterr().err
    assert_one_line(code, err, "item 1", "exceeds the model's context of 512 tokens")
    assert "Token indices sequence length" not in err
    assert not (tmp_path / "eval").exists()
    code = main(["steer", "--directions-dir", str(base.out), "--prompt", "Tell me a story. " * 200, "--quiet"])
    assert_one_line(code, capfd.readouterr().err, "--prompt/--prompts-file item 1", "exceeds the model's context")


def test_an_out_of_range_layer_is_refused_before_the_expensive_stage(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from refusal_dir import extraction

    def expensive(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(extraction, "_extract", expensive)
    code, err = cli(capsys, "run", "--config", base.config, "--output-dir", tmp_path / "run", "--layer", "99", "--quiet")
    assert_one_line(code, err, "steering.layer 99 is out of range")
    assert not (tmp_path / "run").exists()
    code, err = cli(capsys, *evaluate_args(base, tmp_path / "eval", "--layer", "99"))
    assert_one_line(code, err, "steering.layer 99 is out of range")


def test_a_bad_tune_output_dir_is_refused_before_tuning(capsys, base: Base, tmp_path: Path, monkeypatch) -> None:
    from refusal_dir import tune

    def expensive(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(tune, "tune", expensive)
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, "tune", "--config", base.config, "--directions-dir", base.out, "--output-dir", tmp_path / "file" / "sub", "--quiet")
    assert_one_line(code, err, "--output-dir")
    code, err = cli(capsys, "tune", "--config", base.config, "--directions-dir", base.out, "--output-dir", _user_dir(tmp_path / "mine"), "--quiet")
    assert_one_line(code, err, "did not write")


# ----------------------------------------------------------------------------------------------
# Resumes that are allowed give the results of an uninterrupted run
# ----------------------------------------------------------------------------------------------


def test_resume_with_another_batch_size_matches_an_uninterrupted_run(capsys, base: Base, tmp_path: Path) -> None:
    run = base.copy(tmp_path / "run", keep_parts=2)
    (run / "sweep" / "parts" / f"{outdir.TEMP_PREFIX}torn{outdir.TEMP_SUFFIX}").write_text("{")  # killed mid-write
    assert cli(capsys, "run", "--config", base.config, "--output-dir", run, "--batch-size", "2", "--no-figures", "--quiet")[0] == 0
    assert base.results(run) == base.results()
    assert not leftovers(run)


def test_a_run_stored_under_the_old_key_names_resumes(capsys, base: Base, tmp_path: Path) -> None:
    # Written before extraction.position -> extraction.token and steering.positions ->
    # steering.apply_to (docs/glossary.md): nothing else changed, so it resumes, silently.
    run = base.copy(tmp_path / "run", keep_parts=2)
    recorded = yaml.safe_load((run / "config.resolved.yaml").read_text())
    recorded["extraction"]["position"] = recorded["extraction"].pop("token")
    recorded["steering"]["positions"] = recorded["steering"].pop("apply_to")
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    code, err = cli(capsys, "run", "--config", base.config, "--output-dir", run, "--no-figures", "--quiet")
    assert code == 0, err
    assert "deprecated" not in err
    assert base.results(run) == base.results()


def test_sigkill_mid_sweep_then_resume_matches_an_uninterrupted_run(capsys, base: Base, tmp_path: Path) -> None:
    # A slower sweep (10 parts) reusing the base directions (same extraction settings).
    slow = write_config(
        tmp_path / "slow.yaml", base.model_dir, base.pairs,
        steering={"alphas": [-2.0, 0.0, 2.0], "methods": ["addition", "ablation"]},
        generation={"max_new_tokens": 8},
    )

    def fresh_copy(destination: Path) -> Path:
        copy = base.copy(destination)
        (copy / "config.resolved.yaml").unlink()
        (copy / "resume.json").unlink()
        return copy

    reference = fresh_copy(tmp_path / "reference")
    assert cli(capsys, "run", "--config", slow, "--output-dir", reference, "--no-figures", "--quiet")[0] == 0
    run = fresh_copy(tmp_path / "run")
    parts = run / "sweep" / "parts"
    # The child pauses after writing each sweep part, so the second run below and the kill land
    # mid-sweep however fast or busy the machine is.
    child = (
        "import sys, time\n"
        "import refusal_dir.pipeline as pipeline\n"
        "from refusal_dir.cli import main\n"
        "write = pipeline.write_json\n"
        "def paused(path, payload):\n"
        "    write(path, payload)\n"
        "    if path.parent.name == 'parts':\n"
        "        time.sleep(60)\n"
        "pipeline.write_json = paused\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", child, "run", "--config", str(slow), "--output-dir", str(run), "--no-figures", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not list(parts.glob("*.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        # A second run on the directory, one with --fresh, is refused while the first runs.
        code, err = cli(capsys, "run", "--config", base.config, "--output-dir", run, "--fresh", "--no-figures", "--quiet")
        assert_one_line(code, err, "another refusal-dir run holds")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert len(list(parts.glob("*.json"))) == 1 and not (run / "results.json").exists()
    assert cli(capsys, "run", "--config", slow, "--output-dir", run, "--no-figures", "--quiet")[0] == 0
    assert base.results(run) == base.results(reference)
    assert not leftovers(run)


def test_the_resume_key_changes_with_the_prompt_format(tiny_model_dir: Path) -> None:
    # A hub revision that changes only the chat template must not resume old parts silently.
    from refusal_dir.chat import PLAIN_CHAT_TEMPLATE
    from refusal_dir.pipeline import _chat_digest

    model = load_model(str(tiny_model_dir), device="cpu", with_bridge=False)
    digest = _chat_digest(model)
    assert _chat_digest(load_model(str(tiny_model_dir), device="cpu", with_bridge=False)) == digest
    model.chat_template = PLAIN_CHAT_TEMPLATE
    assert _chat_digest(model) != digest


def test_an_interrupted_swap_in_keeps_the_previous_directory(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with outdir.claim_output_dir(out) as claimed:
        (claimed / "directions").mkdir()
        (claimed / "directions" / "old.txt").write_text("previous directions")
    staging = outdir.staging_dir(out, "directions")
    umask = os.umask(0)
    os.umask(umask)
    assert staging.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    real_replace = os.replace

    def interrupt_the_second(source, destination):  # the first rename sets the old copy aside
        if Path(source) == staging:
            raise KeyboardInterrupt("Ctrl-C between the two renames")
        return real_replace(source, destination)

    monkeypatch.setattr(outdir.os, "replace", interrupt_the_second)
    with pytest.raises(KeyboardInterrupt):
        outdir.swap_in(staging, out / "directions")
    monkeypatch.setattr(outdir.os, "replace", real_replace)
    assert (out / "directions" / "old.txt").read_text() == "previous directions"
    # A kill at the same point leaves the old copy set aside; the next run puts it back.
    aside = out / f"{outdir.TEMP_PREFIX}directions-old-x{outdir.STAGING_SUFFIX}"
    aside.mkdir()
    real_replace(out / "directions", aside / "directions")
    with outdir.claim_output_dir(out):
        pass
    assert (out / "directions" / "old.txt").read_text() == "previous directions"
    assert not aside.exists()


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    """Results are written through mkstemp (0600); the renamed file has the umask's mode, as
    any file the user's tools write (others on a shared machine can read a report)."""
    import os

    from refusal_dir.outdir import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
