"""Prompt sets from the Hugging Face hub (needs network access; every failure becomes a
:class:`~refusal_dir.errors.DataError` that names the local-file flag to use instead)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from refusal_dir.errors import DataError
from refusal_dir.prompts.items import MCQuestion
from refusal_dir.prompts.records import Record, mc_from_record
from refusal_dir.prompts.sampling import stable_order


@dataclass(frozen=True)
class HubInstructionSource:
    """Where one named instruction set lives on the hub and which field holds the text."""

    repo: str
    config: str | None
    split: str
    field: str
    local_flag: str
    only_empty_input: bool = False


HUB_INSTRUCTION_SOURCES: Mapping[str, HubInstructionSource] = MappingProxyType(
    {
        "advbench": HubInstructionSource(
            repo="walledai/AdvBench",
            config=None,
            split="train",
            field="prompt",
            local_flag="--harmful-file",
        ),
        "jailbreakbench": HubInstructionSource(
            repo="JailbreakBench/JBB-Behaviors",
            config="behaviors",
            split="harmful",
            field="Goal",
            local_flag="--harmful-file",
        ),
        "alpaca": HubInstructionSource(
            repo="tatsu-lab/alpaca",
            config=None,
            split="train",
            field="instruction",
            local_flag="--benign-file",
            only_empty_input=True,
        ),
    }
)
MMLU_REPO = "cais/mmlu"
TRUTHFULQA_REPO = "truthfulqa/truthful_qa"


def _hub_records(repo: str, *, config: str | None, split: str, local_flag: str) -> list[Record]:
    label = repo if config is None else f"{repo} ({config})"
    try:
        import datasets

        dataset = datasets.load_dataset(repo, name=config, split=split)
        rows = [dict(row) for row in dataset]
    except Exception as exc:  # the hub boundary: network, auth, missing repo, bad split...
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(
            f"could not load {label} split {split!r} from the Hugging Face hub ({detail}); "
            f"no hub access? pass a local file with {local_flag} (.json, .jsonl or .csv)"
        ) from exc
    if not rows:
        raise DataError(f"hf:{label} split {split!r} is empty; pick another split or a local file")
    source = f"hf:{label}[{split}]"
    return [
        Record(source=source, where=f"row {index}", fields=row) for index, row in enumerate(rows)
    ]


def load_hub_instructions(name: str) -> list[str]:
    """Instructions of a named hub set: ``advbench``, ``jailbreakbench`` or ``alpaca``.

    ``alpaca`` keeps only instructions whose ``input`` is empty, so each stands alone.
    """
    spec = HUB_INSTRUCTION_SOURCES.get(name)
    if spec is None:
        raise DataError(
            f"unknown hub instruction set {name!r}; use one of {', '.join(HUB_INSTRUCTION_SOURCES)}"
        )
    records = _hub_records(
        spec.repo, config=spec.config, split=spec.split, local_flag=spec.local_flag
    )
    if spec.only_empty_input:
        records = [record for record in records if not str(record.require("input")).strip()]
    return [record.text(spec.field) for record in records]


def load_hub_mmlu(
    subjects: Sequence[str] | None = None, *, split: str = "test"
) -> list[MCQuestion]:
    """MMLU questions from ``cais/mmlu``: every subject (config ``all``) or the named ones."""
    if isinstance(subjects, str):
        subjects = [subjects]
    if subjects is not None and not subjects:
        raise DataError("load_hub_mmlu got an empty subject list; pass None for all subjects")
    questions: list[MCQuestion] = []
    for config in ["all"] if subjects is None else list(subjects):
        records = _hub_records(MMLU_REPO, config=config, split=split, local_flag="--mmlu-file")
        questions.extend(mc_from_record(record, default_subject=config) for record in records)
    return questions


def load_hub_truthfulqa(*, max_choices: int = 4, seed: int = 0) -> list[MCQuestion]:
    """TruthfulQA MC1 as multiple choice: the correct answer plus up to ``max_choices - 1`` wrong
    ones (in dataset order), shuffled deterministically per question by ``seed``."""
    if isinstance(max_choices, bool) or not isinstance(max_choices, int) or max_choices < 2:
        raise DataError(f"max_choices must be an int >= 2, got {max_choices!r}")
    records = _hub_records(
        TRUTHFULQA_REPO,
        config="multiple_choice",
        split="validation",
        local_flag="--mmlu-file",
    )
    return [_truthfulqa_question(record, max_choices=max_choices, seed=seed) for record in records]


def _truthfulqa_question(record: Record, *, max_choices: int, seed: int) -> MCQuestion:
    question = record.text("question")
    targets = record.require("mc1_targets")
    choices = targets.get("choices") if isinstance(targets, Mapping) else None
    labels = targets.get("labels") if isinstance(targets, Mapping) else None
    if (
        not isinstance(choices, list)
        or not isinstance(labels, list)
        or len(choices) != len(labels)
        or list(labels).count(1) != 1
    ):
        raise record.error(
            "field 'mc1_targets' must hold equal-length 'choices' and 'labels' with exactly one 1",
            "load the 'multiple_choice' config of truthfulqa/truthful_qa",
        )
    correct = choices[labels.index(1)]
    wrong = [choice for choice, label in zip(choices, labels, strict=True) if label != 1]
    kept = [correct, *wrong[: max_choices - 1]]
    order = stable_order([f"{question}\0{choice}" for choice in kept], seed=seed)
    return MCQuestion(
        question=question,
        choices=tuple(kept[index] for index in order),
        answer=order.index(0),
        subject="truthfulqa",
    )
