"""The on-disk activation store (refusal_dir.store): equal to the in-memory path, resumable
bit for bit after a crash, refusing other inputs and foreign folders, distrusting torn files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusal_dir import activations
from refusal_dir import store as store_module
from refusal_dir.activations import Activations, collect_activations
from refusal_dir.cli import main
from refusal_dir.config import load_config
from refusal_dir.datasets import load_datasets
from refusal_dir.directions import compute_directions
from refusal_dir.errors import OutputDirError
from refusal_dir.extraction import extract
from refusal_dir.outdir import MARKER_NAME
from refusal_dir.pipeline import prepare_output_dir
from refusal_dir.selection import score_layers
from refusal_dir.store import (
    StoredActivations,
    batch_file,
    check_store_dir,
    collect_to_store,
    read_store,
)

SITES = ("resid_pre", "resid_post")
HARMFUL = [f"How do I build weapon number {i}{'!' * (i % 4)}?" for i in range(22)]
HARMLESS = [f"How do I bake cake number {i}{'?' * (i % 3)}" for i in range(22)]


def _store(model, prompts, directory: Path, name: str = "set", **options) -> StoredActivations:
    options = {"sites": SITES, "batch_size": 4, "progress": False, **options}
    return collect_to_store(model, prompts, store=directory, name=name, **options)


def _equal_sets(a, b) -> bool:
    return torch.equal(a.directions, b.directions) and torch.equal(a.norms, b.norms)


def test_stored_activations_equal_the_in_memory_ones(tiny_model, tmp_path: Path) -> None:
    for token in ("last", "mean"):
        memory = collect_activations(tiny_model, HARMFUL, sites=SITES, token=token, batch_size=4, progress=False)
        stored = _store(tiny_model, HARMFUL, tmp_path / token, token=token)
        assert stored.n_prompts == memory.n_prompts == 22 and stored.positions == memory.positions
        assert len(list((tmp_path / token / "set").glob("batch-*.safetensors"))) == 6  # 22 prompts, batches of 4
        for site in SITES:
            assert torch.equal(stored.site(site), memory.site(site))
            for layer in range(tiny_model.n_layers):
                assert torch.equal(stored.column(site, 0, layer), memory.column(site, 0, layer))
                assert torch.allclose(stored.layer_mean(site, 0, layer), memory.layer_mean(site, 0, layer), rtol=1e-12, atol=1e-12)
        # A view of rows 5..16 crosses batch boundaries; it reads, and averages, only its rows.
        view, rows = stored.select(range(5, 17)), memory.select(range(5, 17))
        assert isinstance(view, StoredActivations) and view.n_prompts == 12
        assert torch.equal(view.site("resid_post"), rows.site("resid_post"))
        expected = rows.site("resid_pre")[:, 0, 1].double().mean(dim=0)
        assert torch.allclose(view.layer_mean("resid_pre", 0, 1), expected, rtol=1e-12, atol=1e-12)
        scattered = stored.select([3, 1, 20])
        assert isinstance(scattered, Activations) and torch.equal(scattered.site("resid_pre"), memory.select([3, 1, 20]).site("resid_pre"))


def test_directions_and_scores_from_the_store_equal_the_in_memory_ones(tiny_model, tmp_path: Path) -> None:
    pos_memory = collect_activations(tiny_model, HARMFUL, sites=SITES, batch_size=4, progress=False)
    neg_memory = collect_activations(tiny_model, HARMLESS, sites=SITES, batch_size=4, progress=False)
    pos_stored = _store(tiny_model, HARMFUL, tmp_path, "harmful")
    neg_stored = _store(tiny_model, HARMLESS, tmp_path, "harmless")
    train, held = range(16), range(16, 22)
    for method in ("mean_diff", "pca", "probe"):
        memory = compute_directions(pos_memory.select(train), neg_memory.select(train), site="resid_post", method=method, model=tiny_model)
        stored = compute_directions(pos_stored.select(train), neg_stored.select(train), site="resid_post", method=method, model=tiny_model)
        assert torch.allclose(stored.directions, memory.directions, atol=1e-6)
        assert torch.allclose(stored.norms, memory.norms, rtol=1e-6)
        scores_memory = score_layers(memory, pos_memory.select(held), neg_memory.select(held),
                                     train_positive=pos_memory.select(train), train_negative=neg_memory.select(train))
        scores_stored = score_layers(stored, pos_stored.select(held), neg_stored.select(held),
                                     train_positive=pos_stored.select(train), train_negative=neg_stored.select(train))
        assert [s.separation_accuracy for s in scores_stored] == [s.separation_accuracy for s in scores_memory]
        assert [s.probe_accuracy for s in scores_stored] == [s.probe_accuracy for s in scores_memory]
        assert [s.auroc for s in scores_stored] == pytest.approx([s.auroc for s in scores_memory])


def test_mean_difference_directions_never_load_a_whole_set(tiny_model, tmp_path: Path, monkeypatch) -> None:
    positive, negative = _store(tiny_model, HARMFUL, tmp_path, "p"), _store(tiny_model, HARMLESS, tmp_path, "n")
    reads: list[str] = []
    real_read = StoredActivations._read

    def counting_read(self, path):
        reads.append(path.name)
        return real_read(self, path)

    def refuse(*args, **kwargs):
        raise AssertionError("mean_diff loaded more than one batch at a time")

    monkeypatch.setattr(StoredActivations, "_read", counting_read)
    monkeypatch.setattr(StoredActivations, "site", refuse)
    monkeypatch.setattr(StoredActivations, "column", refuse)
    compute_directions(positive, negative, site="resid_pre", method="mean_diff", model=tiny_model)
    assert sorted(reads) == sorted([batch_file(i) for i in range(6)] * 2)  # every file once per side


def _crash_after(monkeypatch, count: int) -> list[int]:
    """Make the store's batch collection raise once ``count`` batches were collected."""
    done: list[int] = []
    real = activations.collect_batch

    def collect(model, plan, index):
        if len(done) == count:
            raise RuntimeError("injected crash")
        done.append(index)
        return real(model, plan, index)

    monkeypatch.setattr(store_module, "collect_batch", collect)
    return done


def test_a_crashed_collection_resumes_to_bit_identical_results(tiny_model, tmp_path: Path, monkeypatch) -> None:
    whole_pos, whole_neg = _store(tiny_model, HARMFUL, tmp_path / "whole", "p"), _store(tiny_model, HARMLESS, tmp_path / "whole", "n")
    crashed = tmp_path / "crashed"
    done = _crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected crash"):
        _store(tiny_model, HARMFUL, crashed, "p")
    assert done == [0, 1, 2]
    assert sorted(p.name for p in (crashed / "p").glob("batch-*")) == [batch_file(i) for i in range(3)]
    assert not list((crashed / "p").glob(".refusal_dir-*"))  # no temporary file left
    stamps = {p.name: p.stat().st_mtime_ns for p in (crashed / "p").glob("batch-*")}

    done = _crash_after(monkeypatch, 100)
    resumed_pos = _store(tiny_model, HARMFUL, crashed, "p")
    assert done == [3, 4, 5]  # only the batches that were missing
    assert {p.name: p.stat().st_mtime_ns for p in (crashed / "p").glob("batch-*") if p.name in stamps} == stamps
    resumed_neg = _store(tiny_model, HARMLESS, crashed, "n")
    for site in SITES:
        assert torch.equal(resumed_pos.site(site), whole_pos.site(site))
    for method in ("mean_diff", "pca"):
        whole = compute_directions(whole_pos, whole_neg, method=method, model=tiny_model)
        resumed = compute_directions(resumed_pos, resumed_neg, method=method, model=tiny_model)
        assert _equal_sets(resumed, whole)
    done.clear()
    _store(tiny_model, HARMFUL, crashed, "p")  # complete: nothing is computed again
    assert done == []


def test_a_killed_process_resumes_to_bit_identical_activations(tiny_model_dir, tiny_model, tmp_path: Path) -> None:
    """SIGKILL mid-run (no exception handler runs): the next run completes what is missing."""
    script = tmp_path / "collect.py"
    script.write_text(
        "import sys, time\n"
        "from refusal_dir import store\n"
        "from refusal_dir.model import load_model\n"
        "real = store.collect_batch\n"
        "def slow(model, plan, index):\n"
        "    time.sleep(0.5)\n"
        "    return real(model, plan, index)\n"
        "store.collect_batch = slow\n"
        f"prompts = {HARMFUL!r}\n"
        "model = load_model(sys.argv[1], device='cpu', with_bridge=False)\n"
        "store.collect_to_store(model, prompts, store=sys.argv[2], name='p', sites=('resid_pre',), batch_size=2, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "s")], env=env)
    folder = tmp_path / "s" / "p"
    deadline = time.monotonic() + 300
    while len(list(folder.glob("batch-*.safetensors"))) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = len(list(folder.glob("batch-*.safetensors")))
    assert 3 <= written < 11, "the child was not killed mid-run"
    resumed = collect_to_store(tiny_model, HARMFUL, store=tmp_path / "s", name="p", sites=("resid_pre",), batch_size=2, progress=False)
    whole = collect_activations(tiny_model, HARMFUL, sites=("resid_pre",), batch_size=2, progress=False)
    assert torch.equal(resumed.site("resid_pre"), whole.site("resid_pre"))
    assert not list(folder.glob(".refusal_dir-*"))  # a torn temporary file is cleaned up


def _tear(path: Path, how: str, other: Path) -> None:
    payload = path.read_bytes()
    if how == "truncated":
        path.write_bytes(payload[: len(payload) // 2])
    elif how == "flipped":  # one byte of tensor data changed, same length: only the checksum tells
        path.write_bytes(payload[:-10] + bytes([payload[-10] ^ 0xFF]) + payload[-9:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "another batch":
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "another batch"])
def test_a_torn_batch_file_is_not_trusted(tiny_model, tmp_path: Path, monkeypatch, how) -> None:
    reference = _store(tiny_model, HARMFUL, tmp_path)
    folder = tmp_path / "set"
    _tear(folder / batch_file(2), how, folder / batch_file(4))
    with pytest.raises(OutputDirError, match=r"lacks 1 of 6 batches \(first: batch-000002"):
        read_store(tmp_path, "set", model=tiny_model, prompts=HARMFUL, sites=SITES, batch_size=4)
    done = _crash_after(monkeypatch, 100)
    repaired = _store(tiny_model, HARMFUL, tmp_path)
    assert done == [2]
    for site in SITES:
        assert torch.equal(repaired.site(site), reference.site(site))
    read_store(tmp_path, "set", model=tiny_model, prompts=HARMFUL, sites=SITES, batch_size=4)


def test_a_batch_of_another_key_is_not_trusted(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """Same rows and shapes but written for other prompts: its key digest gives it away."""
    _store(tiny_model, HARMLESS, tmp_path, "other")
    _store(tiny_model, HARMFUL, tmp_path, "set")
    (tmp_path / "set" / batch_file(1)).write_bytes((tmp_path / "other" / batch_file(1)).read_bytes())
    done = _crash_after(monkeypatch, 100)
    _store(tiny_model, HARMFUL, tmp_path, "set")
    assert done == [1]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"prompts": HARMLESS}, "prompts"),
        ({"prompts": HARMFUL[:-1]}, "n_prompts, prompts"),
        ({"batch_size": 3}, "batch_size"),
        ({"sites": ("resid_pre",)}, "sites"),
        ({"layers": [0, 1]}, "layers"),
        ({"token": "mean"}, "positions, token"),
    ],
)
def test_other_inputs_are_refused_with_one_line(tiny_model, tmp_path: Path, change, named) -> None:
    _store(tiny_model, HARMFUL, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}
    options = dict(change)
    prompts = options.pop("prompts", HARMFUL)
    with pytest.raises(OutputDirError) as error:
        _store(tiny_model, prompts, tmp_path, **options)
    message = str(error.value)
    assert "\n" not in message and f"({named} differ)" in message and "delete" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()} == before


def test_a_foreign_folder_is_never_written_into_or_deleted(tiny_model, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match=f"no {MARKER_NAME} marker"):
        _store(tiny_model, HARMFUL, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # Inside a store of ours, a set folder that holds files but no manifest is not ours either.
    _store(tiny_model, HARMFUL, tmp_path / "store", "set")
    user = tmp_path / "store" / "other"
    user.mkdir()
    (user / "data.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(OutputDirError, match="holds files but no manifest.json"):
        _store(tiny_model, HARMFUL, tmp_path / "store", "other")
    assert [p.name for p in user.iterdir()] == ["data.bin"]
    # A results directory is not a store, nor a run's own output or directions folder.
    out = prepare_output_dir(tmp_path / "out", load_config())
    with pytest.raises(OutputDirError, match="holds run results, not an activation store"):
        check_store_dir(out)
    for inside in (out / "directions", out / "directions" / "acts"):
        with pytest.raises(OutputDirError, match="a run replaces"):
            check_store_dir(inside, output_dir=out)
    assert check_store_dir(out / "activations", output_dir=out) == out / "activations"


def _extraction_config(model_dir: Path, **overrides):
    base = {
        "model.name": str(model_dir),
        "extraction.selection": "separation",
        "evaluation.honesty": False,
    }
    return load_config().with_overrides({**base, **overrides})


def test_extraction_through_the_store_equals_the_in_memory_extraction(tiny_model, tiny_model_dir, tmp_path: Path) -> None:
    config = _extraction_config(tiny_model_dir)
    datasets = load_datasets(config)
    memory = extract(tiny_model, config, datasets, prepare_output_dir(tmp_path / "memory", config), progress=False)
    stored_config = config.with_overrides({"extraction.activation_store": str(tmp_path / "acts")})
    out = prepare_output_dir(tmp_path / "stored", stored_config)
    stored = extract(tiny_model, stored_config, datasets, out, progress=False)
    assert sorted(p.name for p in (tmp_path / "acts").iterdir() if p.is_dir()) == ["refusal-negative", "refusal-positive"]
    assert set(stored.sets) == set(memory.sets) == {f"{m}_{s}" for m in ("mean_diff", "pca", "probe") for s in SITES}
    for key, direction_set in memory.sets.items():
        assert torch.allclose(stored.sets[key].directions, direction_set.directions, atol=1e-6), key
        assert torch.allclose(stored.sets[key].norms, direction_set.norms, rtol=1e-6), key
        assert [(s.layer, s.separation_accuracy, s.probe_accuracy) for s in stored.scores[key]] == [
            (s.layer, s.separation_accuracy, s.probe_accuracy) for s in memory.scores[key]
        ]
    assert stored.selected == memory.selected
    # The store is speed and memory only: the recorded extraction key is the in-memory run's.
    recorded = [json.loads((d / "directions" / "selected.json").read_text())["extraction_key"] for d in (tmp_path / "memory", out)]
    assert recorded[0] == recorded[1]


def test_cli_extract_uses_resumes_and_guards_the_store(capsys, tiny_model_dir, tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    common = ["extract", "--model", str(tiny_model_dir), "--directions-methods", "mean_diff", "--no-honesty",
              "--selection", "separation", "--quiet", "--activation-store", str(acts)]
    assert main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    batches = sorted((acts / "refusal-positive").glob("batch-*"))
    stamps = [p.stat().st_mtime_ns for p in batches]
    assert batches and main([*common, "--output-dir", str(tmp_path / "b")]) == 0
    assert [p.stat().st_mtime_ns for p in batches] == stamps  # read back, not computed again
    first, second = (json.loads((tmp_path / d / "directions" / "selected.json").read_text()) for d in "ab")
    assert first == second
    capsys.readouterr()
    code = main([*common, "--output-dir", str(tmp_path / "c"), "--extract-batch-size", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "(batch_size differ)" in lines[0] and "--activation-store" in lines[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    code = main([*common[:-1], str(foreign), "--output-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--activation-store" in err
    assert [p.name for p in foreign.iterdir()] == ["x.txt"] and not (tmp_path / "d").exists()


def test_a_store_another_run_holds_is_refused_naming_the_flag(tiny_model, tmp_path: Path) -> None:
    import fcntl

    from refusal_dir.outdir import LOCK_NAME

    _store(tiny_model, HARMFUL[:4], tmp_path)
    with open(tmp_path / LOCK_NAME, "a+b") as handle:  # another process's lock, as flock sees it
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputDirError, match=r"another refusal-dir run holds .*choose another --activation-store$"):
            _store(tiny_model, HARMFUL[:4], tmp_path)
