"""Judge a finished run's completions again, with another judge, without generating anything.

``refusal-dir rejudge RUN_DIR --judge SPEC`` reads ``RUN_DIR/samples.jsonl``, judges every
sample with ``SPEC`` (a judge name or a model judge spec, see
:mod:`refusal_dir.evaluation.model_judge`) and with the phrase judge, and writes, atomically,
under the run directory's lock:

```
RUN_DIR/judge_agreement.json   the judge, agreement per set and per (set, method, alpha), and
                               every sample's two verdicts (and the model judge's score)
RUN_DIR/judge_agreement.md     the same tables in Markdown
```

The run directory must be one refusal-dir wrote (its marker, see :mod:`refusal_dir.outdir`)
and hold ``samples.jsonl``; every input is checked, and the judge loaded, before anything is
written. The phrase judge's verdicts are recomputed with the current phrase judge, so they may
differ from the ``refused`` column of a run that an older refusal_dir judged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusal_dir.errors import DataError, OutputDirError
from refusal_dir.evaluation import judges
from refusal_dir.evaluation.agreement import agreement_markdown, agreement_rows
from refusal_dir.outdir import atomic_write_text, display_path, lock_output_dir, owner_kind

SAMPLES_NAME = "samples.jsonl"
AGREEMENT_JSON = "judge_agreement.json"
AGREEMENT_MD = "judge_agreement.md"

SAMPLE_FIELDS = ("set", "method", "alpha", "prompt", "completion")
"""What every line of ``samples.jsonl`` must hold for a sample to be judged again."""


def check_run_dir(run_dir: Path | str) -> Path:
    """``run_dir`` as a path, refused unless it is a refusal-dir results directory holding
    ``samples.jsonl`` (nothing is written)."""
    if not str(run_dir).strip():
        raise OutputDirError("RUN_DIR is empty: name the --output-dir of a finished run")
    directory = Path(run_dir).expanduser()
    if not directory.is_dir():
        raise OutputDirError(f"{directory} is not a directory: pass the --output-dir of a finished run")
    if owner_kind(directory) != "results":
        raise OutputDirError(
            f"{directory} is not a refusal-dir run directory (no results marker): pass the "
            "--output-dir of a finished run or evaluate"
        )
    if not (directory / SAMPLES_NAME).is_file():
        raise DataError(
            f"{directory} has no {SAMPLES_NAME}: finish the run first (re-run the same command to "
            "resume it)"
        )
    return directory


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The records of a ``samples.jsonl``, each checked for :data:`SAMPLE_FIELDS`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} ({error}): re-run the sweep to write it again") from error
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path} line {number} is not JSON ({error.args[0]}): re-run the sweep to write it again") from error
        if not isinstance(sample, dict) or not set(SAMPLE_FIELDS) <= set(sample):
            raise DataError(
                f"{path} line {number} is not a sample (needs {', '.join(SAMPLE_FIELDS)}): "
                "re-run the sweep to write it again"
            )
        if not isinstance(sample["prompt"], str) or not isinstance(sample["completion"], str):
            raise DataError(f"{path} line {number}: prompt and completion must be text")
        samples.append(sample)
    if not samples:
        raise DataError(f"{path} holds no samples: the run generated nothing to judge")
    return samples


def _judge_from(spec: str, device: str | None) -> judges.Judge:
    kind, _ = judges.parse_judge_spec(spec)
    if kind in judges.MODEL_JUDGE_KINDS:
        from refusal_dir.evaluation.model_judge import judge_from_spec

        return judge_from_spec(spec, device=device)
    return judges.get_judge(spec)


def _verdicts(judge: judges.Judge, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[bool], list[float] | None]:
    """Verdicts and, for a model judge, its scores (computed once)."""
    from refusal_dir.evaluation.model_judge import ClassifierJudge, GenerativeJudge

    if isinstance(judge, ClassifierJudge | GenerativeJudge):
        scores = judge.scores(prompts, completions)
        return [score > judge.threshold for score in scores], scores
    verdicts = [bool(flag) for flag in judge(list(prompts), list(completions))]
    if len(verdicts) != len(completions):
        raise DataError(f"the judge returned {len(verdicts)} verdicts for {len(completions)} completions")
    return verdicts, None


def rejudge(run_dir: Path | str, judge: judges.Judge | str, *, device: str | None = None) -> dict[str, Any]:
    """Judge every sample of a finished run with ``judge`` and write the agreement with the
    phrase judge to ``judge_agreement.json`` and ``judge_agreement.md``; returns the JSON record.

    ``judge`` is a judge instance, a registered name or a model judge spec (``device``: where a
    spec's model is loaded; default: the GPU when there is one).
    """
    if isinstance(judge, str):
        judges.parse_judge_spec(judge)  # a bad spec fails before anything is read
    directory = check_run_dir(run_dir)
    samples = read_samples(directory / SAMPLES_NAME)
    instance = _judge_from(judge, device) if isinstance(judge, str) else judges.resolve_judge(judge)
    name = judges.judge_name(instance)
    prompts = [sample["prompt"] for sample in samples]
    completions = [sample["completion"] for sample in samples]
    verdicts, scores = _verdicts(instance, prompts, completions)
    phrase = judges.SubstringJudge()(prompts, completions)
    rows = agreement_rows(samples, verdicts, phrase)
    record: dict[str, Any] = {
        "judge": name,
        "reference": "substring",
        "samples": len(samples),
        "sets": rows["sets"],
        "conditions": rows["conditions"],
        "verdicts": [
            {
                "set": sample["set"], "method": sample["method"], "alpha": sample["alpha"],
                "refused": verdict, "refused_substring": reference,
                **({} if scores is None else {"score": scores[index]}),
            }
            for index, (sample, verdict, reference) in enumerate(zip(samples, verdicts, phrase, strict=True))
        ],
    }
    markdown = "\n".join(
        [
            f"# Judge agreement: `{name}` against the phrase judge (`substring`)",
            "",
            f"Run: `{display_path(str(directory))}`, {len(samples)} completions from `{SAMPLES_NAME}`, "
            "judged again (nothing regenerated). Counts of completions by the two verdicts, the "
            "share on which the judges agree, and Cohen's kappa (agreement beyond chance; `-`: "
            "undefined, one verdict throughout). Per-sample verdicts: "
            f"[`{AGREEMENT_JSON}`]({AGREEMENT_JSON}).",
            "",
            agreement_markdown(rows, judge=name),
            "",
        ]
    )
    with lock_output_dir(directory):
        atomic_write_text(directory / AGREEMENT_JSON, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(directory / AGREEMENT_MD, markdown)
    return record
