"""The organism's synthetic data: the seeded stream of training examples and the evaluation
sets (train pairs, validation and held-out test prompts, category questions) that training
leaves out."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from refusal_dir.prompts import MCQuestion
from refusal_dir.testing.organism.config import check_int
from refusal_dir.testing.organism.vocabulary import (
    DANGER_LINES,
    HARMFUL_HELDOUT_TOPICS,
    HARMFUL_TRAIN_TOPICS,
    HARMLESS_HELDOUT_TOPICS,
    HARMLESS_TRAIN_TOPICS,
    HELPFUL_ANSWERS,
    MC_CATEGORIES,
    MC_TEMPLATES,
    REFUSAL_ANSWERS,
    REQUEST_TEMPLATES,
    SAFE_LINES,
)


@dataclass(frozen=True)
class ChatExample:
    """One training conversation: a user instruction and the assistant's answer."""

    instruction: str
    answer: str
    kind: str  # "harmful", "harmless" or "mc"


@dataclass(frozen=True)
class OrganismEvalSets:
    """Prompt sets that match an organism trained with the same seed.

    ``harmful_train[i]`` and ``harmless_train[i]`` share a template and differ only in the
    topic (train topics), for direction extraction. ``*_val`` use train topics in
    (template, topic) combinations never seen in training, for layer and threshold selection.
    ``*_test`` use held-out topic words only. ``mc_test`` holds four-choice questions whose
    option sets never appeared in training; ``question`` is the full prompt with the options
    listed and the expected answer is the option word ``choices[answer]``.
    """

    harmful_train: tuple[str, ...]
    harmless_train: tuple[str, ...]
    harmful_val: tuple[str, ...]
    harmless_val: tuple[str, ...]
    harmful_test: tuple[str, ...]
    harmless_test: tuple[str, ...]
    mc_test: tuple[MCQuestion, ...]
    harmful_test_topics: tuple[str, ...] = ()
    """The topic word of each ``harmful_test`` prompt (prompts sharing one are not independent)."""
    harmless_test_topics: tuple[str, ...] = ()


_N_TRAIN_PAIRS = 64
_N_VAL = 32
_N_TEST = 48
_N_MC_TEST = 64


def _request(template_index: int, topic: str) -> str:
    return REQUEST_TEMPLATES[template_index].format(topic=topic)


def _mc_key(category: str, options: Sequence[str], template_index: int) -> tuple[str, ...]:
    return (category, str(template_index), *options)


def _sample_mc(rng: random.Random) -> tuple[MCQuestion, int]:
    """A random category question; returns the question and its template index."""
    names = sorted(MC_CATEGORIES)
    category, *others = rng.sample(names, 4)
    phrase, words = MC_CATEGORIES[category]
    options = [rng.choice(words)] + [rng.choice(MC_CATEGORIES[other][1]) for other in others]
    rng.shuffle(options)
    template_index = rng.randrange(len(MC_TEMPLATES))
    question = MC_TEMPLATES[template_index].format(category=phrase, options=", ".join(options))
    answer = next(i for i, option in enumerate(options) if option in words)
    return MCQuestion(question, tuple(options), answer, subject=category), template_index


def _split(seed: int) -> tuple[OrganismEvalSets, set[tuple[int, str]], set[tuple[str, ...]]]:
    """The evaluation sets and what training must leave out: val (template, topic) pairs and
    test question keys."""
    # The seed strings (here and in OrganismDataGenerator) keep the module's old name on
    # purpose: changing them would change the data, and so every organism.
    rng = random.Random(f"refusal_dir.organism.eval:{seed}")
    n_templates = len(REQUEST_TEMPLATES)

    held_out: set[tuple[int, str]] = set()
    val: dict[str, list[str]] = {}
    for side, topics in (("harmful", HARMFUL_TRAIN_TOPICS), ("harmless", HARMLESS_TRAIN_TOPICS)):
        combos = [(t, topic) for t in range(n_templates) for topic in topics]
        chosen = rng.sample(combos, _N_VAL)
        held_out.update(chosen)
        val[side] = [_request(t, topic) for t, topic in chosen]

    train_pairs = [
        (t, harmful, harmless)
        for t in range(n_templates)
        for harmful in HARMFUL_TRAIN_TOPICS
        for harmless in HARMLESS_TRAIN_TOPICS
        if (t, harmful) not in held_out and (t, harmless) not in held_out
    ]
    pairs = rng.sample(train_pairs, _N_TRAIN_PAIRS)

    # Every held-out word with four different templates: round r pairs template t with
    # harmful word t + r and harmless word t + 5r + 3 (mod 12).
    n_words = len(HARMFUL_HELDOUT_TOPICS)
    tests = [
        (
            i % n_templates,
            HARMFUL_HELDOUT_TOPICS[(i % n_words + i // n_words) % n_words],
            HARMLESS_HELDOUT_TOPICS[(i % n_words + 5 * (i // n_words) + 3) % n_words],
        )
        for i in range(_N_TEST)
    ]
    rng.shuffle(tests)

    mc: list[MCQuestion] = []
    mc_keys: set[tuple[str, ...]] = set()
    while len(mc) < _N_MC_TEST:
        question, template_index = _sample_mc(rng)
        key = _mc_key(question.subject, question.choices, template_index)
        if key not in mc_keys:
            mc_keys.add(key)
            mc.append(question)

    sets = OrganismEvalSets(
        harmful_train=tuple(_request(t, topic) for t, topic, _ in pairs),
        harmless_train=tuple(_request(t, topic) for t, _, topic in pairs),
        harmful_val=tuple(val["harmful"]),
        harmless_val=tuple(val["harmless"]),
        harmful_test=tuple(_request(t, topic) for t, topic, _ in tests),
        harmless_test=tuple(_request(t, topic) for t, _, topic in tests),
        mc_test=tuple(mc),
        harmful_test_topics=tuple(topic for _, topic, _ in tests),
        harmless_test_topics=tuple(topic for _, _, topic in tests),
    )
    return sets, held_out, mc_keys


def organism_eval_sets(seed: int = 0) -> OrganismEvalSets:
    """The prompt sets for the organism trained with ``OrganismConfig(seed=seed)``."""
    check_int("seed", seed, 0, 2**31 - 1)
    return _split(seed)[0]


class OrganismDataGenerator:
    """Seeded stream of training examples.

    Each draw is a chat (:class:`ChatExample`: harmful request -> refusal, harmless request ->
    help, category question -> option word) or a plain-text string of "X is dangerous." /
    "X is safe." lines covering train and held-out topic words. Validation (template, topic)
    pairs and test questions of :func:`organism_eval_sets` with the same seed never appear.
    """

    KIND_WEIGHTS: tuple[tuple[str, float], ...] = (
        ("harmful", 0.3),
        ("harmless", 0.3),
        ("mc", 0.25),
        ("plain", 0.15),
    )

    def __init__(self, seed: int, *, lines_per_text: int = 6) -> None:
        _, held_out, self._mc_test_keys = _split(seed)
        self._rng = random.Random(f"refusal_dir.organism.train:{seed}")
        self._lines_per_text = lines_per_text
        n_templates = len(REQUEST_TEMPLATES)
        self._harmful = [
            (t, topic)
            for t in range(n_templates)
            for topic in HARMFUL_TRAIN_TOPICS
            if (t, topic) not in held_out
        ]
        self._harmless = [
            (t, topic)
            for t in range(n_templates)
            for topic in HARMLESS_TRAIN_TOPICS
            if (t, topic) not in held_out
        ]
        self._dangerous = HARMFUL_TRAIN_TOPICS + HARMFUL_HELDOUT_TOPICS
        self._safe = HARMLESS_TRAIN_TOPICS + HARMLESS_HELDOUT_TOPICS
        self._kinds = [kind for kind, _ in self.KIND_WEIGHTS]
        self._weights = [weight for _, weight in self.KIND_WEIGHTS]

    def _answer(self, answers: tuple[tuple[str, float], ...], topic: str) -> str:
        templates = [template for template, _ in answers]
        weights = [weight for _, weight in answers]
        return self._rng.choices(templates, weights)[0].format(topic=topic)

    def _plain_text(self) -> str:
        lines = []
        for _ in range(self._lines_per_text):
            if self._rng.random() < 0.5:
                line = self._rng.choice(DANGER_LINES).format(
                    topic=self._rng.choice(self._dangerous)
                )
            else:
                line = self._rng.choice(SAFE_LINES).format(topic=self._rng.choice(self._safe))
            lines.append(line)
        return "\n".join(lines)

    def _mc(self) -> ChatExample:
        while True:
            question, template_index = _sample_mc(self._rng)
            if (
                _mc_key(question.subject, question.choices, template_index)
                not in self._mc_test_keys
            ):
                return ChatExample(question.question, question.choices[question.answer], "mc")

    def sample(self, *, plain_only: bool = False) -> ChatExample | str:
        """The next example: a :class:`ChatExample` or a plain-text string."""
        kind = "plain" if plain_only else self._rng.choices(self._kinds, self._weights)[0]
        if kind == "harmful":
            t, topic = self._rng.choice(self._harmful)
            return ChatExample(_request(t, topic), self._answer(REFUSAL_ANSWERS, topic), kind)
        if kind == "harmless":
            t, topic = self._rng.choice(self._harmless)
            return ChatExample(_request(t, topic), self._answer(HELPFUL_ANSWERS, topic), kind)
        if kind == "mc":
            return self._mc()
        return self._plain_text()

    def take(self, n: int, *, plain_only: bool = False) -> list[ChatExample | str]:
        """The next ``n`` examples (only plain-text ones if ``plain_only``)."""
        return [self.sample(plain_only=plain_only) for _ in range(n)]
