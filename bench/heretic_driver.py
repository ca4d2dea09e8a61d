"""Run heretic (``heretic-llm``) without its menus; runs in heretic's own venv, not ours.

``bench_abliteration.py`` calls it as ``VENV/bin/python bench/heretic_driver.py SPEC.json``.
It imports nothing from refusal_dir (heretic's venv has its own transformers), and it runs
heretic's unchanged ``heretic.main.run()``: the settings come from a ``config.toml`` written
into the work directory (heretic reads ``./config.toml``), and the three interactive questions
that follow the search are answered here:

* "Which trial do you want to use?": the Pareto-front trial chosen by :func:`choose_trial`,
  the rule ``refusal_dir.tune_remove.choose`` applies to our trials (least KL among those
  refusing at most ``max_refusal`` of the prompts; none there: fewest refusals, then least KL;
  the front holds every such trial); with ``SPEC["export_front"]``, then every other front
  trial in the menu's order; then, when asked again, exit;
* "What do you want to do with the decensored model?": save it (``export_strategy = "merge"``:
  the LoRA merged into full weights), then go back;
* "Path to the folder:": ``SPEC["export_dir"]`` for the chosen trial, ``SPEC["front_dir"]/
  trial-<number>`` for the other front trials.

SPEC (JSON): ``model`` (a local model directory), ``work_dir`` (empty or absent),
``export_dir``, ``result``, the four prompt files (``good_prompts``, ``bad_prompts``,
``good_evaluation_prompts``, ``bad_evaluation_prompts``: one prompt a line), ``n_trials``,
``n_startup_trials``, ``batch_size``, ``max_response_length``, ``seed``, ``system_prompt``,
``dtype``, ``max_refusal`` (a rate), ``threads`` (torch's, 0: its default), optionally
``export_front`` and ``front_dir``. Writes ``SPEC["result"]``: every trial (parameters, heretic's
refusals and KL, start and end), the Pareto front, the chosen trial, the exported folders
(``front_exports``: trial number -> folder) and the wall times.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

TRIAL_QUESTION = "Which trial do you want to use?"
ACTION_QUESTION = "What do you want to do with the decensored model?"
SAVE_ACTION = "Save the model to a local folder"


def choose_trial(front: list[dict[str, Any]], max_refusal: float) -> dict[str, Any]:
    """Least KL among the trials refusing at most ``max_refusal`` of the prompts; with none,
    fewest refusals, then least KL (``refusal_dir.tune_remove.choose``'s rule)."""

    def rate(trial: dict[str, Any]) -> float:
        return trial["refusals"] / trial["n_bad_prompts"]

    reached = [t for t in front if rate(t) <= max_refusal + 1e-12]
    if reached:
        return min(reached, key=lambda t: (t["kl_divergence"], t["refusals"], t["number"]))
    return min(front, key=lambda t: (t["refusals"], t["kl_divergence"], t["number"]))


def _trial_record(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    start, end = trial.datetime_start, trial.datetime_complete
    return {
        "index": attrs.get("index"),
        "number": trial.number,
        "state": trial.state.name,
        "refusals": attrs.get("refusals"),
        "n_bad_prompts": attrs.get("n_bad_prompts"),
        "base_refusals": attrs.get("base_refusals"),
        "kl_divergence": attrs.get("kl_divergence"),
        "values": list(trial.values) if trial.values is not None else None,
        "direction_index": attrs.get("direction_index"),
        "parameters": attrs.get("parameters"),
        "sampled": dict(trial.params),
        "seconds": (end - start).total_seconds() if start and end else None,
        "start": start.isoformat() if start else None,
    }


class Answers:
    """Stand-ins for heretic's ``prompt_select`` and ``prompt_path``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.front: list[dict[str, Any]] = []
        self.chosen: dict[str, Any] | None = None
        self.exports: dict[int, str] = {}  # trial number -> the folder it was saved to
        self._queue: list[int] = []  # trial numbers still to save
        self._current: int | None = None  # the trial heretic has restored
        self._current_saved = False
        self.questions: list[str] = []

    @property
    def saved(self) -> bool:
        """Whether the chosen trial's model was saved."""
        return self.chosen is not None and self.chosen["number"] in self.exports

    def select(self, message: str, choices: list[Any]) -> Any:
        self.questions.append(message)
        values = [getattr(choice, "value", choice) for choice in choices]
        if message == TRIAL_QUESTION:
            trials = [v for v in values if hasattr(v, "user_attrs")]
            if self.chosen is None:
                self.front = [_trial_record(t) for t in trials]
                self.chosen = choose_trial(self.front, self.spec["max_refusal"])
                others = [t["number"] for t in self.front if t["number"] != self.chosen["number"]]
                self._queue = [self.chosen["number"]] + (others if self.spec.get("export_front") else [])
            if not self._queue:
                return ""  # every trial to save is saved: exit
            self._current, self._current_saved = self._queue.pop(0), False
            return next(t for t in trials if t.number == self._current)
        if message == ACTION_QUESTION:
            if self._current_saved:
                return ""  # back to the trial menu
            self._current_saved = True
            return SAVE_ACTION
        raise RuntimeError(f"heretic asked an unexpected question: {message!r}")

    def path(self, message: str) -> str:
        self.questions.append(message)
        if self._current is None or self.chosen is None:
            raise RuntimeError(f"heretic asked {message!r} before a trial was restored")
        if self._current == self.chosen["number"]:
            folder = self.spec["export_dir"]
        else:
            folder = str(Path(self.spec["front_dir"]) / f"trial-{self._current}")
        self.exports[self._current] = folder
        return folder

    def text(self, message: str, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError(f"heretic asked an unexpected question: {message!r}")


def config_toml(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    def prompts(key: str) -> dict[str, Any]:
        return {"dataset": str(Path(spec[key]).resolve())}

    return {
        "model": str(Path(spec["model"]).resolve()),
        "dtypes": [spec["dtype"]],
        "device_map": spec.get("device_map", "cpu"),
        "batch_size": spec["batch_size"],
        "max_response_length": spec["max_response_length"],
        # Skips heretic's common-prefix check (a generation over up to 200 prompts); the model
        # has no chain-of-thought block, so the prefix it would find is empty.
        "response_prefix": "",
        "n_trials": spec["n_trials"],
        "n_startup_trials": spec["n_startup_trials"],
        "seed": spec["seed"],
        "system_prompt": spec["system_prompt"],
        "study_checkpoint_dir": str(work_dir / "checkpoints"),
        "export_strategy": "merge",
        "good_prompts": prompts("good_prompts"),
        "bad_prompts": prompts("bad_prompts"),
        "good_evaluation_prompts": prompts("good_evaluation_prompts"),
        "bad_evaluation_prompts": prompts("bad_evaluation_prompts"),
    }


TIMED = (("Model", "reset_model"), ("Model", "abliterate"), ("Evaluator", "get_score"))
"""What a trial runs besides the sampler: reset the LoRA, abliterate, score (KL and refusals)."""


def time_calls(heretic_main: Any) -> dict[str, list[tuple[float, float]]]:
    """Record (process CPU seconds, wall seconds) of every call of :data:`TIMED`."""
    calls: dict[str, list[tuple[float, float]]] = {}
    for owner, name in TIMED:
        cls = getattr(heretic_main, owner)
        original = getattr(cls, name)
        record = calls.setdefault(name, [])

        def timed(*args: Any, _original: Any = original, _record: list = record, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _record.append((time.process_time() - cpu, time.perf_counter() - wall))

        setattr(cls, name, timed)
    return calls


def trial_cpu_seconds(calls: dict[str, list[tuple[float, float]]], n_trials: int) -> list[float]:
    """Process CPU seconds of each trial: its reset, abliteration and scoring (the first
    ``n_trials`` calls of each; later ones restore the chosen trial for export)."""
    return [sum(calls[name][i][0] for _, name in TIMED) for i in range(n_trials)]


def _study_trials(work_dir: Path) -> list[dict[str, Any]]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    files = sorted((work_dir / "checkpoints").glob("*.jsonl"))
    if len(files) != 1:
        raise RuntimeError(f"expected one study journal in {work_dir / 'checkpoints'}, found {len(files)}")
    storage = JournalStorage(JournalFileBackend(str(files[0])))
    study = storage.get_all_studies()[0]
    return [_trial_record(t) for t in storage.get_all_trials(study._study_id)]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work_dir = Path(spec["work_dir"]).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if any(work_dir.iterdir()):
        print(f"error: {work_dir} is not empty: heretic would resume its study there", file=sys.stderr)
        return 2

    import tomli_w

    (work_dir / "config.toml").write_text(tomli_w.dumps(config_toml(spec, work_dir)))
    os.chdir(work_dir)
    sys.argv = ["heretic"]  # heretic's settings also parse the command line

    import heretic.main as heretic_main
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    calls = time_calls(heretic_main)
    answers = Answers(spec)
    heretic_main.prompt_select = answers.select
    heretic_main.prompt_path = answers.path
    heretic_main.prompt_text = answers.text

    started_at, started = datetime.now(), time.perf_counter()
    heretic_main.run()
    wall = time.perf_counter() - started

    if answers.chosen is None or not answers.saved:
        print(f"error: heretic stopped before a trial was saved (asked: {answers.questions})", file=sys.stderr)
        return 1
    trials = _study_trials(work_dir)
    seconds = [t["seconds"] for t in trials if t["seconds"] is not None and t["state"] == "COMPLETE"]
    first_start = min((t["start"] for t in trials if t["start"]), default=None)
    setup = (datetime.fromisoformat(first_start) - started_at).total_seconds() if first_start else None
    result = {
        "heretic_version": version("heretic-llm"),
        "versions": {name: version(name) for name in ("torch", "transformers", "optuna", "peft")},
        "settings": config_toml(spec, work_dir),
        "refusal_markers": list(heretic_main.Settings.model_fields["refusal_markers"].default),
        "choice_rule": f"least KL with refusal rate <= {spec['max_refusal']}; none: fewest refusals, then least KL",
        "wall_seconds": wall,
        "setup_seconds": setup,
        "trial_seconds": seconds,
        "trial_seconds_mean": sum(seconds) / len(seconds) if seconds else math.nan,
        "trial_seconds_median": statistics.median(seconds) if seconds else math.nan,
        "trial_cpu_seconds": (cpu := trial_cpu_seconds(calls, len(seconds))),
        "trial_cpu_seconds_mean": sum(cpu) / len(cpu) if cpu else math.nan,
        "first_trial_start": first_start,
        "trials": trials,
        "front": answers.front,
        "chosen": answers.chosen,
        "export_dir": spec["export_dir"],
        "front_exports": {str(number): folder for number, folder in answers.exports.items()},
        "questions_answered": answers.questions,
    }
    target = Path(spec["result"])
    partial = target.with_suffix(target.suffix + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, target)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: heretic_driver.py SPEC.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
