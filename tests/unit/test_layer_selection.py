"""The effect-based layer selection rule (``refusal_dir.selection``)."""

from __future__ import annotations

import json
import math

import pytest

from refusal_dir import extraction as extraction_stage
from refusal_dir.config import load_config
from refusal_dir.datasets import load_datasets, split_pairs
from refusal_dir.extraction import extract, load_extraction
from refusal_dir.pipeline import prepare_output_dir
from refusal_dir.selection import (
    LayerEffect,
    choose_layer,
    layer_effects,
    select_by_effect,
)
from refusal_dir.testing import make_tiny_model


def _effect(layer: int, kl: float, bypass: float, induce: float, sep: float = 1.0) -> LayerEffect:
    return LayerEffect("last", layer, sep, ablation_kl=kl, bypass=bypass, induce=induce)


# What Qwen2.5-Coder-0.5B-Instruct showed (issue #14): the only layer under KL 0.1 makes refusal
# *more* likely when ablated; the layers that remove refusal have KL 0.15-0.23.
QWEN_LIKE = [
    _effect(5, 0.03, bypass=-0.14, induce=0.11),
    _effect(13, 0.23, bypass=2.4, induce=2.1),
    _effect(15, 0.15, bypass=2.2, induce=2.5),
    _effect(17, 0.19, bypass=3.0, induce=2.9),
    _effect(18, 0.45, bypass=4.0, induce=3.5),
]


def test_a_layer_that_does_not_steer_is_never_chosen_for_its_low_kl() -> None:
    choice = choose_layer(QWEN_LIKE, max_kl=0.1)
    # Budget 0.1 -> 0.2 (layers 15 and 17 fit), best bypass + induce among them: 17.
    assert (choice.chosen.layer, choice.rule, choice.kl_budget) == (17, "kl-relaxed", 0.2)
    assert (choice.n_working, choice.n_within) == (4, 2)
    assert "2 of 4 working layers" in choice.describe()
    assert "0.2" in choice.describe() and "kl-relaxed" in choice.describe()
    assert select_by_effect(QWEN_LIKE, max_kl=0.1).layer == 17


def test_within_the_kl_budget_the_best_steering_layer_wins() -> None:
    effects = [
        _effect(1, 0.05, bypass=1.0, induce=0.5),
        _effect(2, 0.02, bypass=2.0, induce=1.0),
        _effect(3, 0.50, bypass=9.0, induce=9.0),  # steers hardest, too destructive
        _effect(4, 0.01, bypass=5.0, induce=-0.1),  # addition lowers refusal: does not work
    ]
    choice = choose_layer(effects, max_kl=0.1)
    assert (choice.chosen.layer, choice.rule, choice.kl_budget) == (2, "within-kl", 0.1)
    # A budget large enough to hold layer 3 picks it.
    assert choose_layer(effects, max_kl=1.0).chosen.layer == 3


def test_when_no_layer_works_the_rule_says_so() -> None:
    effects = [_effect(1, 0.01, bypass=-0.5, induce=1.0), _effect(2, 0.02, bypass=0.4, induce=-1.0)]
    choice = choose_layer(effects, max_kl=0.1)
    assert (choice.chosen.layer, choice.rule, choice.n_working) == (1, "none-works", 0)
    json.dumps(choice.as_record(), allow_nan=False)  # strict JSON: no Infinity in selected.json
    nan_first = [_effect(3, 0.01, bypass=math.nan, induce=-1.0), *effects]
    assert choose_layer(nan_first, max_kl=0.1).chosen.layer == 1


def test_nan_kl_does_not_hang_the_relaxation() -> None:
    effects = [_effect(1, math.nan, bypass=1.0, induce=1.0), _effect(2, math.inf, bypass=2.0, induce=1.0)]
    choice = choose_layer(effects, max_kl=0.1)
    assert (choice.chosen.layer, choice.rule) == (2, "kl-relaxed")


def test_selection_tries_every_eligible_layer_and_records_the_rule(tmp_path, monkeypatch) -> None:
    # Ten layers: the old default tried only the 6 best-separating ones.
    model_dir = make_tiny_model(tmp_path / "ten", n_layers=10, seed=3)
    config = load_config().with_overrides(
        {
            "model.name": str(model_dir),
            "extraction.methods": ("mean_diff",),
            "extraction.sites": ("resid_pre",),
            "extraction.selection_prompts": 4,
            "evaluation.honesty": False,
        }
    )
    from refusal_dir.model import load_model

    model = load_model(str(model_dir), device="cpu", with_bridge=False)
    output = prepare_output_dir(tmp_path / "out", config)
    # Record every text that reaches the model while the layer is selected.
    seen: list[str] = []
    selecting = [False]
    tokenize = model.tokenize

    def recording_tokenize(texts):
        if selecting[0]:
            seen.extend(str(text) for text in texts)
        return tokenize(texts)

    def recording_effects(*args, **kwargs):
        selecting[0] = True
        try:
            return layer_effects(*args, **kwargs)
        finally:
            selecting[0] = False

    monkeypatch.setattr(model, "tokenize", recording_tokenize)
    monkeypatch.setattr(extraction_stage, "layer_effects", recording_effects)
    datasets = load_datasets(config)
    extraction = extract(model, config, datasets, output, progress=False)
    # Layer selection reads the held-out extraction pairs only: no training pair, no
    # evaluation prompt (seen as chat-formatted texts, so compared by containment).
    train, heldout = split_pairs(datasets.refusal_pairs, config)
    allowed = heldout.positives + heldout.negatives
    forbidden = train.positives + train.negatives + datasets.harmful_eval + datasets.benign_eval
    assert seen and all(any(text in s for text in allowed) for s in seen)
    assert not any(text in s for s in seen for text in forbidden if text not in allowed)
    # resid_pre at layer 0 is the embedding of the last template token: the same for every
    # prompt, so its direction is zero and it cannot steer.
    assert sorted(e.layer for e in extraction.effects) == list(range(1, 8))
    assert extraction.selection is not None
    assert extraction.selection["rule"] in ("within-kl", "kl-relaxed", "none-works")
    reloaded = load_extraction(output / "directions", model=model)
    assert reloaded.selection == extraction.selection
    chosen = choose_layer(extraction.effects, max_kl=config.extraction.max_kl)
    assert (extraction.selected.layer, extraction.selection["rule"]) == (chosen.chosen.layer, chosen.rule)


@pytest.mark.parametrize("max_kl", [0.0, -1.0, math.inf])
def test_bad_kl_budget_is_refused(max_kl: float) -> None:
    from refusal_dir.errors import ConfigError

    with pytest.raises(ConfigError, match="max_kl"):
        choose_layer(QWEN_LIKE, max_kl=max_kl)


def test_post_instruction_positions_are_candidates_too(tiny_model, tiny_model_dir, tmp_path) -> None:
    config = load_config().with_overrides(
        {
            "model.name": str(tiny_model_dir),
            "extraction.token": "post_instruction",
            "extraction.methods": ("mean_diff",),
            "extraction.sites": ("resid_pre",),
            "extraction.selection_prompts": 4,
            "evaluation.honesty": False,
        }
    )
    output = prepare_output_dir(tmp_path / "out", config)
    extraction = extract(tiny_model, config, load_datasets(config), output, progress=False)
    positions = {e.position for e in extraction.effects}
    assert len(positions) == tiny_model.n_post_instruction_tokens > 1
    assert (extraction.selected.layer, extraction.selected.position) in {(e.layer, e.position) for e in extraction.effects}


def test_batched_effects_equal_each_candidate_measured_alone(tiny_model, tiny_model_dir, tmp_path) -> None:
    from refusal_dir.evaluation.metrics import kl_from_logits, refusal_score
    from refusal_dir.generation import next_token_logits
    from refusal_dir.interventions import ablation, addition
    from refusal_dir.prompts import benign_eval, harmful_eval
    from refusal_dir.selection import layer_effects

    config = load_config().with_overrides(
        {
            "model.name": str(tiny_model_dir),
            "extraction.methods": ("mean_diff",),
            "extraction.sites": ("resid_pre",),
            "evaluation.honesty": False,
        }
    )
    extraction = extract(tiny_model, config, load_datasets(config), prepare_output_dir(tmp_path / "o", config), progress=False)
    directions, scores = extraction.steering_set, extraction.scores[extraction.selected_key]
    harmful, harmless = harmful_eval()[:3], benign_eval()[:3]
    effects = layer_effects(tiny_model, directions, scores, harmful=harmful, harmless=harmless, max_layer_fraction=1.0, batch_size=2)
    assert len(effects) >= 2
    base_harmful = refusal_score(tiny_model, harmful)
    base_harmless = refusal_score(tiny_model, harmless)
    base_logits = next_token_logits(tiny_model, harmless)
    for effect in effects:
        ablate = [ablation(directions, layer=effect.layer, token=effect.position)]
        add = [addition(directions, layer=effect.layer, token=effect.position, alpha=1.0)]
        bypass = float((base_harmful - refusal_score(tiny_model, harmful, interventions=ablate)).mean())
        induce = float((refusal_score(tiny_model, harmless, interventions=add) - base_harmless).mean())
        kl = float(kl_from_logits(base_logits, next_token_logits(tiny_model, harmless, interventions=ablate)).mean())
        assert effect.bypass == pytest.approx(bypass, abs=1e-4)
        assert effect.induce == pytest.approx(induce, abs=1e-4)
        assert effect.ablation_kl == pytest.approx(kl, abs=1e-5)
    # The candidates differ, so a mix-up of rows between them would show above.
    assert len({round(e.bypass, 4) for e in effects}) == len(effects)


def test_ranked_layers_puts_the_selected_layer_first_then_by_effect_or_separation() -> None:
    from types import SimpleNamespace

    from refusal_dir.selection import LayerScore, ranked_layers

    scores = [LayerScore("last", layer, sep, 0.5, 0.0, None) for layer, sep in ((1, 0.6), (3, 0.7), (5, 0.9))]
    by_separation = SimpleNamespace(effects=(), cosines=(), scores={"set": scores}, selected_key="set", selected=scores[1])
    assert ranked_layers(by_separation, 3) == [3, 5, 1]
    assert ranked_layers(by_separation, 2) == [3, 5]
    effects = (_effect(5, 0.1, 1.0, 1.0), _effect(1, 0.1, 2.5, 2.5), _effect(3, 0.1, 0.5, 0.5))
    by_effect = SimpleNamespace(**{**vars(by_separation), "effects": effects})
    assert ranked_layers(by_effect, 3) == [3, 1, 5]


@pytest.mark.parametrize("old", ["refusal_dir.scoring", "refusal_dir.evaluation.selection"])
def test_the_old_selection_modules_warn_and_reexport_the_new_one(old: str, monkeypatch) -> None:
    import importlib
    import sys

    from refusal_dir import selection

    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match="import from refusal_dir.selection"):
        module = importlib.import_module(old)
    assert module.__all__ and all(getattr(module, name) is getattr(selection, name) for name in module.__all__)


def test_the_library_imports_no_deprecated_selection_module() -> None:
    from pathlib import Path

    import refusal_dir

    package = Path(refusal_dir.__file__).parent
    shims = {package / "scoring.py", package / "evaluation" / "selection.py"}
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path not in shims:
            assert "refusal_dir.scoring" not in text and "refusal_dir.evaluation.selection" not in text, path
