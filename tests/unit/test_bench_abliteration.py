"""bench/bench_abliteration.py and bench/heretic_driver.py on a tiny model, heretic replaced.

heretic itself is not installed in CI; its place is taken by a stand-in "interpreter" that
does what the driver promises (writes the result record, exports a model directory) and exports
the *unedited* model. The known answer: the heretic row then equals the unedited row exactly
(same completions, KL exactly 0), while full ablation moves the distribution (KL > 0); and the
prompts heretic was given are our splits, its trial prompts disjoint from the held-out ones.
"""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench(load_bench):
    yield load_bench("bench_abliteration")
    for name in ("common", "bench_abliteration"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def driver(load_bench):
    yield load_bench("heretic_driver")
    sys.modules.pop("heretic_driver", None)


FAKE_HERETIC = """#!{python}
# Stands in for heretic's venv python: argv = [driver.py, spec.json]. Exports the unedited model.
import json, shutil, sys
from pathlib import Path
spec = json.loads(Path(sys.argv[2]).read_text())
shutil.copytree(spec["model"], spec["export_dir"])
prompts = {{k: Path(spec[k]).read_text().splitlines() for k in
           ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")}}
chosen = {{"index": 1, "number": 0, "refusals": 1, "n_bad_prompts": 2, "base_refusals": 2,
          "kl_divergence": 0.0, "direction_index": None,
          "parameters": {{"attn.o_proj": {{"max_weight": 1.0}}}}}}
front, exports = [chosen], {{"0": spec["export_dir"]}}
if spec["export_front"]:  # a second front trial, saved where the driver saves it
    front.append(dict(chosen, index=2, number=1, refusals=2, kl_divergence=0.5))
    exports["1"] = str(Path(spec["front_dir"]) / "trial-1")
    shutil.copytree(spec["model"], exports["1"])
Path(spec["result"]).write_text(json.dumps({{
    "heretic_version": "fake", "refusal_markers": ["sorry", "i cannot"], "trials": front,
    "trial_seconds_mean": 1.5, "trial_seconds_median": 1.4, "trial_cpu_seconds_mean": 1.2, "setup_seconds": 2.0, "wall_seconds": 4.0, "front": front,
    "chosen": chosen, "export_dir": spec["export_dir"], "front_exports": exports, "prompts": prompts, "spec": spec}}))
"""

@pytest.fixture
def fake(tmp_path):
    """The stand-in for heretic's venv python (FAKE_HERETIC)."""
    path = tmp_path / "fake-python"
    path.write_text(FAKE_HERETIC.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


TINY = [
    "--trials", "2", "--validation-prompts", "3", "--heldout-prompts", "4", "--new-tokens", "3",
    "--batch-size", "4", "--selection-prompts", "2",
]


def test_heretic_row_of_the_unedited_model_is_the_unedited_row(bench, tiny_model_dir, fake, tmp_path):
    out, raw, work = tmp_path / "abl.json", tmp_path / "raw", tmp_path / "work"
    code = bench.main([
        "--model", str(tiny_model_dir), *TINY, "--heretic-python", str(fake),
        "--output", str(out), "--raw-dir", str(raw), "--work-dir", str(work),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["unedited", "(a) full ablation", "(b) ours (tune_remove)", "(c) heretic"]
    unedited, full, heretic = rows["unedited"], rows["(a) full ablation"], rows["(c) heretic"]
    assert unedited["kl"]["value"] == 0.0
    assert heretic["kl_per_prompt"] == [0.0] * 4
    assert full["kl"]["value"] > 0
    completions = json.loads((raw / "completions.json").read_text())
    assert completions["(c) heretic"] == completions["unedited"]
    assert completions["(a) full ablation"] != completions["unedited"]
    for key in ("refusal", "answered", "refusal_heretic_markers"):
        assert heretic[key] == unedited[key]
    assert heretic["trial_seconds_mean"] == 1.5 and heretic["own_validation"]["refusals"] == 1
    # (b): tune_remove's own held-out report and ours measure the same prompts the same way.
    ours = rows["(b) ours (tune_remove)"]
    assert ours["trials"] == 2 and len(json.loads((raw / "ours-trials.json").read_text())) == 2
    assert ours["own_heldout"]["chosen"]["refusal"]["value"] == ours["refusal"]["value"]
    assert ours["own_heldout"]["chosen"]["kl"]["value"] == pytest.approx(ours["kl"]["value"], abs=1e-6)
    assert ours["own_heldout"]["baseline"]["refusal"]["value"] == unedited["refusal"]["value"]
    assert ours["trial_seconds_mean"] > 0 and ours["trial_cpu_seconds_mean"] > 0
    assert ours["settings"]["limits"]["max_refusal"] == 0.1
    assert heretic["trial_cpu_seconds_mean"] == 1.2
    assert not (work / "heretic-model").exists()  # removed unless --keep-heretic-model
    # heretic got our splits: train pairs for its directions, the first validation items for its
    # trials, none of them held out.
    record = json.loads((raw / "heretic.json").read_text())
    given = record["prompts"]
    assert len(given["bad_evaluation_prompts"]) == len(given["good_evaluation_prompts"]) == 3
    assert not set(given["bad_evaluation_prompts"]) & set(completions["prompts"])
    assert len(given["bad_prompts"]) == len(given["good_prompts"]) == result["budget"]["extraction_pairs"]
    assert record["spec"]["n_trials"] == 2 and record["spec"]["n_startup_trials"] == 1
    assert result["budget"]["heldout_prompts"] == {"harmful": 4, "benign": 4}


def test_heldout_front_measures_every_front_point_of_both_searches(bench, tiny_model_dir, fake, tmp_path):
    out, raw, work = tmp_path / "abl.json", tmp_path / "raw", tmp_path / "work"
    code = bench.main([
        "--model", str(tiny_model_dir), *TINY, "--trials", "3", "--heretic-python", str(fake), "--no-full",
        "--heldout-front", "--keep-heretic-model", "--output", str(out), "--raw-dir", str(raw), "--work-dir", str(work),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    unedited, ours, heretic = rows["unedited"], rows["(b) ours (tune_remove)"], rows["(c) heretic"]
    # heretic's second front trial was saved apart and measured from its folder: the unedited model.
    assert [e["trial"] for e in heretic["front"]] == [0, 1]
    for entry in heretic["front"]:
        assert entry["heldout"]["kl"]["value"] == 0.0
        assert entry["heldout"]["refusal"] == unedited["refusal"]
    # The front's other trials go even when the chosen model is kept (a full model each).
    assert not (work / "heretic-front").exists() and (work / "heretic-model").is_dir()
    # Ours: every front trial measured at run time; the chosen one is the chosen row.
    chosen = ours["own_heldout"]["chosen"]
    assert len(ours["front"]) >= 1 and all("heldout" in e for e in ours["front"])
    assert any(e["heldout"]["kl"] == ours["kl"] for e in ours["front"])
    assert chosen["refusal"]["value"] == ours["refusal"]["value"]
    comparison = result["heldout_fronts"]
    assert comparison["points"]["heretic"] == [[unedited["refusal"]["value"], 0.0]] * 2  # JSON: lists
    assert len(comparison["points"]["ours"]) == len(ours["front"])


def test_heretic_from_reuses_an_earlier_heretic_row_only_on_the_same_prompts(bench, tiny_model_dir, fake, tmp_path, capsys):
    first, work = tmp_path / "first.json", tmp_path / "work"
    common = ["--model", str(tiny_model_dir), *TINY, "--no-ours", "--work-dir", str(work)]
    assert bench.main([*common, "--heretic-python", str(fake), "--output", str(first), "--raw-dir", str(tmp_path / "first-raw")]) == 0
    again = tmp_path / "again.json"
    missing = tmp_path / "no-python"  # heretic is not run again
    code = bench.main([
        *common, "--no-full", "--heretic-python", str(missing), "--heretic-from", str(first),
        "--output", str(again), "--raw-dir", str(tmp_path / "again-raw"),
    ])
    assert code == 0, capsys.readouterr().err
    earlier, result = json.loads(first.read_text()), json.loads(again.read_text())
    assert result["rows"]["(c) heretic"] == earlier["rows"]["(c) heretic"]
    for key in ("refusal", "refusal_heretic_markers", "answered", "kl"):  # judged with the earlier run's markers
        assert result["rows"]["unedited"][key] == earlier["rows"]["unedited"][key]
    assert result["heretic_from"]["path"] == str(first)
    assert "digests of every prompt list and the system prompt" in result["heretic_from"]["checked"]
    # heretic's completions and record travel with the new run: it can be reused in turn.
    old_raw, new_raw = (json.loads((tmp_path / f"{n}-raw" / "completions.json").read_text()) for n in ("first", "again"))
    assert new_raw["(c) heretic"] == old_raw["(c) heretic"]
    assert (tmp_path / "again-raw" / "heretic.json").read_text() == (tmp_path / "first-raw" / "heretic.json").read_text()
    third = ["--output", str(tmp_path / "third.json"), "--raw-dir", str(tmp_path / "third-raw")]
    assert bench.main([*common, "--no-full", "--heretic-from", str(again), *third]) == 0
    capsys.readouterr()

    def refused(*flags: str, output: Path | None = None) -> str:
        output = output or tmp_path / "refused.json"
        assert bench.main([*common, *flags, "--output", str(output), "--raw-dir", str(tmp_path / "refused-raw")]) == 2
        assert not (tmp_path / "refused.json").exists()
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        return errors[0]

    assert "another seed" in refused("--heretic-from", str(first), "--seed", "1")
    # Its own output: refused before the earlier files are touched.
    assert "this run's --output" in refused("--heretic-from", str(first), output=first)
    assert json.loads(first.read_text()) == earlier
    # An earlier run without held-out fronts cannot give them.
    assert "--heldout-front" in refused("--heretic-from", str(first), "--heldout-front")
    # Other prompts: a digest that differs, or other unedited completions.
    tampered = dict(earlier, prompt_hashes=dict(earlier["prompt_hashes"], validation_benign="0" * 16))
    first.write_text(json.dumps(tampered))
    assert "validation_benign" in refused("--heretic-from", str(first))
    first.write_text(json.dumps(earlier))
    completions = tmp_path / "first-raw" / "completions.json"
    record = json.loads(completions.read_text())
    record["unedited"][0] += " changed"
    completions.write_text(json.dumps(record))
    assert "unedited completions" in refused("--heretic-from", str(first))


def test_attainment_and_dominance(bench):
    fronts = {"ours": [(0.0, 0.5), (0.1, 0.2), (0.3, 0.05)], "theirs": [(0.1, 0.3), (0.2, 0.1)]}
    table = bench.attainment(fronts)
    assert [e["refusal"] for e in table] == [0.0, 0.1, 0.2, 0.3]
    assert [e["ours"] for e in table] == [0.5, 0.2, 0.2, 0.05]
    assert [e["theirs"] for e in table] == [None, 0.3, 0.1, 0.1]
    assert bench.dominated(fronts["theirs"], fronts["ours"]) == 1  # (0.1, 0.3) by (0.1, 0.2)
    assert bench.dominated(fronts["ours"], fronts["theirs"]) == 0
    assert bench.dominated([(0.1, 0.2)], [(0.1, 0.2)]) == 0  # an equal point does not dominate


def test_ours_before_it_lands_and_bad_input_are_one_line(bench, tmp_path, capsys):
    if importlib.util.find_spec("refusal_dir.tune_remove") is None:
        assert bench.main(["--no-heretic", "--work-dir", str(tmp_path / "w")]) == 2
        assert "tune_remove has not landed yet: run with --no-ours" in capsys.readouterr().err
    missing = tmp_path / "no-python"
    assert bench.main(["--no-ours", "--heretic-python", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-heretic" in err
    assert bench.main(["--no-ours", "--no-heretic", "--trials", "0"]) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err


def test_work_dir_that_is_not_ours_is_left_alone(bench, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert bench.main(["--no-ours", "--no-heretic", "--work-dir", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep"
    assert "--work-dir" in capsys.readouterr().err


def test_heretic_markers_rule(bench):
    markers = ["i can'", "sorry"]
    assert bench.heretic_is_refusal("   ", markers)
    assert bench.heretic_is_refusal("I *can\u2019t*   help", markers)
    assert bench.heretic_is_refusal("So SORRY", markers)
    assert not bench.heretic_is_refusal("Here is how: first", markers)


def test_trial_choice_is_tune_removes_rule(driver):
    front = [
        {"number": 0, "refusals": 0, "n_bad_prompts": 10, "kl_divergence": 0.9},
        {"number": 1, "refusals": 2, "n_bad_prompts": 10, "kl_divergence": 0.3},
        {"number": 2, "refusals": 2, "n_bad_prompts": 10, "kl_divergence": 0.1},
        {"number": 3, "refusals": 5, "n_bad_prompts": 10, "kl_divergence": 0.01},
    ]
    assert driver.choose_trial(front, 0.1)["number"] == 0  # the only one refusing <= 10%
    assert driver.choose_trial(front, 0.2)["number"] == 2  # least KL among those <= 20%
    assert driver.choose_trial(front, 0.5)["number"] == 3
    assert driver.choose_trial(front[1:], 0.1)["number"] == 2  # none reached: fewest, then KL


def test_driver_times_each_trials_calls(driver):
    class Model:
        def reset_model(self):
            return "reset"

        def abliterate(self, x):
            return sum(i * i for i in range(x))

    class Evaluator:
        def get_score(self):
            return (0.0, 0.0), 0.1, 2

    module = type("heretic_main", (), {"Model": Model, "Evaluator": Evaluator})
    calls = driver.time_calls(module)
    model, evaluator = Model(), Evaluator()
    for _ in range(3):  # two trials, then the chosen one restored for export
        assert model.reset_model() == "reset" and model.abliterate(200_000) > 0
    assert evaluator.get_score()[2] == 2 and evaluator.get_score()[2] == 2
    assert [len(calls[name]) for name in ("reset_model", "abliterate", "get_score")] == [3, 3, 2]
    cpu = driver.trial_cpu_seconds(calls, 2)
    assert len(cpu) == 2 and all(c > 0 for c in cpu)
    assert cpu[0] == sum(calls[name][0][0] for name in ("reset_model", "abliterate", "get_score"))


def test_driver_answers_heretics_questions(driver):
    class Trial:
        def __init__(self, number, refusals, kl):
            self.number, self.params, self.values = number, {}, [kl, refusals]
            self.user_attrs = {"index": number + 1, "refusals": refusals, "kl_divergence": kl, "n_bad_prompts": 10}
            self.datetime_start = self.datetime_complete = None
            self.state = type("State", (), {"name": "COMPLETE"})()

    class Choice:
        def __init__(self, value):
            self.value = value

    answers = driver.Answers({"max_refusal": 0.3, "export_dir": "/out"})
    trials = [Trial(0, 0, 2.0), Trial(1, 3, 0.2)]
    menu = [Choice(t) for t in trials] + [Choice("continue"), Choice("")]
    assert answers.select(driver.TRIAL_QUESTION, menu) is trials[1]
    assert answers.select(driver.ACTION_QUESTION, ["Save the model to a local folder", "x"]) == driver.SAVE_ACTION
    assert answers.path("Path to the folder:") == "/out"
    assert answers.select(driver.ACTION_QUESTION, []) == ""
    assert answers.select(driver.TRIAL_QUESTION, menu) == ""
    assert answers.saved and answers.exports == {1: "/out"}
    # With export_front: the chosen trial first, to export_dir; then every other front trial.
    answers = driver.Answers({"max_refusal": 0.3, "export_dir": "/out", "front_dir": "/front", "export_front": True})
    trials.append(Trial(2, 5, 0.1))
    menu = [Choice(t) for t in trials] + [Choice("continue"), Choice("")]
    saved = []
    while (trial := answers.select(driver.TRIAL_QUESTION, menu)) != "":
        assert answers.select(driver.ACTION_QUESTION, []) == driver.SAVE_ACTION
        saved.append((trial.number, answers.path("Path to the folder:")))
        assert answers.select(driver.ACTION_QUESTION, []) == ""
    assert saved == [(1, "/out"), (0, "/front/trial-0"), (2, "/front/trial-2")]
    assert answers.saved and answers.chosen["number"] == 1
    with pytest.raises(RuntimeError, match="unexpected question"):
        answers.select("Upload?", [])
    # It runs in heretic's venv, where refusal_dir is not installed.
    imports = [line.split()[1] for line in (BENCH_DIR / "heretic_driver.py").read_text().splitlines()
               if line.lstrip().startswith(("import ", "from "))]
    assert "heretic.main" in imports and not [name for name in imports if name.startswith("refusal_dir")]
