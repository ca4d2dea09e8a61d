"""Known-answer tests of the analysis package on constructed data and a tiny random Gemma-2."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from analysis.geometry import (
    cosine_across_layers,
    cosine_across_methods,
    cosine_between,
    cosine_between_figure,
    cosine_layers_figure,
    cosine_methods_figure,
    direction_logit_lens,
    logit_lens_figure,
)
from analysis.heatmap import (
    compare_generation_projections,
    generation_heatmap_figure,
    generation_projections,
)
from analysis.layers import score_curves, separation_figure
from analysis.mechanistic import (
    coordinate_overlap_figure,
    frozen_attention_effect,
    frozen_attention_figure,
    head_attribution,
    head_attribution_figure,
    important_coordinate_overlap,
    sparsification_figure,
    sparsified_effect,
    sparsify,
    token_logprob_metric,
)
from analysis.pca import (
    layer_projections,
    pca_projection,
    pca_projections,
    pca_scatter_figure,
    projection_histogram_figure,
)
from refusal_dir import (
    DirectionSet,
    HookedModel,
    LayerScore,
    ablation,
    addition,
    collect_activations,
    load_model,
)
from refusal_dir.directions import DirectionMeta
from refusal_dir.errors import ConfigError, DataError
from refusal_dir.interventions import norm_gain
from refusal_dir.prompts import refusal_pairs
from refusal_dir.selection import LayerEffect, LayerSelection
from refusal_dir.testing import make_tiny_model

D_MODEL = 64
N_LAYERS = 3


# ----------------------------------------------------------------------------------------------
# Fixtures and builders
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> HookedModel:
    directory = make_tiny_model(tmp_path_factory.mktemp("analysis") / "tiny", seed=0)
    return load_model(str(directory), device="cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return refusal_pairs().positives[:6]


@contextmanager
def scaled_parameters(
    model: HookedModel, select: Callable[[str], bool], factor: float
) -> Iterator[None]:
    """Multiply the selected parameters in place (shared by hf and bridge), then restore them."""
    chosen = {name: p for name, p in model.hf.named_parameters() if select(name)}
    assert chosen, "the selection matched no parameter"
    saved = {name: p.detach().clone() for name, p in chosen.items()}
    try:
        with torch.no_grad():
            for parameter in chosen.values():
                parameter.mul_(factor)
        yield
    finally:
        with torch.no_grad():
            for name, parameter in chosen.items():
                parameter.copy_(saved[name])


def direction_set(units: torch.Tensor, *, name: str = "refusal") -> DirectionSet:
    """A DirectionSet (one position) from ``layers x d_model`` vectors, normalized."""
    meta = DirectionMeta(
        model_id="test",
        model_revision=None,
        d_model=units.shape[-1],
        n_layers=units.shape[0],
        site="resid_post",
        position="last",
        positions=("last",),
        method="mean_diff",
        prompt_set_hash="",
        package_version="0",
        name=name,
    )
    return DirectionSet.from_raw(units.unsqueeze(0).float(), meta)


def planted_acts(
    axis: torch.Tensor, *, n: int = 40, shared: float = 1.0, noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n x 1 x 1 x d`` positive/negative activations that differ along ``axis`` only.

    Pair ``i`` shares a random point (scale ``shared``) and sits at ``+/- g_i * axis`` with
    ``g_i`` in [4, 8), plus independent noise of scale ``noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    common = shared * torch.randn(n, axis.shape[0], generator=generator)
    gaps = 4.0 * (1.0 + torch.rand(n, 1, generator=generator))
    jitter = noise * torch.randn(2, n, axis.shape[0], generator=generator)
    positive = common + gaps * axis + jitter[0]
    negative = common - gaps * axis + jitter[1]
    return positive.view(n, 1, 1, -1), negative.view(n, 1, 1, -1)


# ----------------------------------------------------------------------------------------------
# layers.py
# ----------------------------------------------------------------------------------------------


def _score(position: str, layer: int, accuracy: float) -> LayerScore:
    return LayerScore(position, layer, accuracy, accuracy - 0.05, 1.0, None)


def test_score_curves_group_by_position_and_sort_by_layer() -> None:
    scores = [_score("post-1", 1, 0.9), _score("post-2", 0, 0.6), _score("post-1", 0, 0.7)]
    curves = {curve.label: curve for curve in score_curves(scores)}
    assert set(curves) == {"post-1", "post-2"}
    assert curves["post-1"].layers == (0, 1)
    assert curves["post-1"].values["separation_accuracy"] == (0.7, 0.9)
    by_site = score_curves({"resid_pre": scores, "resid_post": scores[:1]})
    assert [c.label for c in by_site] == [
        "resid_pre/post-1",
        "resid_pre/post-2",
        "resid_post/post-1",
    ]


def test_separation_figure_marks_the_selected_layer() -> None:
    scores = [_score("last", layer, 0.5 + 0.1 * layer) for layer in range(4)]
    figure = separation_figure(scores, selected=scores[2])
    assert isinstance(figure, go.Figure)
    stars = [trace for trace in figure.data if trace.marker.symbol == "star"]
    assert len(stars) == 2 and stars[0].x == (2,) and stars[0].y == (pytest.approx(0.7),)
    with pytest.raises(ConfigError):
        separation_figure(scores, metrics=("nonsense",))


def test_separation_figure_marks_a_layer_chosen_by_effect() -> None:
    scores = [_score("last", layer, 0.5 + 0.1 * layer) for layer in range(4)]
    chosen = LayerEffect("last", 1, 0.6, ablation_kl=0.01, bypass=1.0, induce=2.0)
    for selected in (chosen, LayerSelection(chosen, "within-kl", 0.1, 0.1, 1, 1)):
        figure = separation_figure({"resid_pre": scores}, selected=selected)
        stars = [trace for trace in figure.data if trace.marker.symbol == "star"]
        # both metrics, read from the layer's own score (LayerEffect has no AUROC)
        assert [star.y for star in stars] == [(pytest.approx(0.6),), (pytest.approx(0.55),)]


# ----------------------------------------------------------------------------------------------
# pca.py
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [True, False])
def test_pca_recovers_a_planted_axis(paired: bool) -> None:
    axis = torch.zeros(32)
    axis[5], axis[17] = 0.6, -0.8
    # Paired differences cancel the shared point; pooled PCA needs it small to see the axis.
    positive, negative = planted_acts(axis, shared=1.0 if paired else 0.05)
    result = pca_projection(positive, negative, layer=0, token=0, paired=paired)
    first = result.components[0].double()
    assert float(first @ axis.double()) > 0.99  # recovered, with the mean-difference sign
    assert float(result.explained_variance_ratio[0]) > 0.9
    assert result.positive[:, 0].min() > result.negative[:, 0].max()
    assert result.auroc() == 1.0


def test_pca_paired_needs_matched_pairs() -> None:
    axis = torch.eye(8)[0]
    positive, negative = planted_acts(axis, n=6)
    with pytest.raises(DataError):
        pca_projection(positive, negative[:4], layer=0, paired=True)


def test_layer_projections_use_each_layers_own_direction() -> None:
    generator = torch.Generator().manual_seed(3)
    positive = torch.randn(5, 1, N_LAYERS, 16, generator=generator)
    negative = torch.randn(7, 1, N_LAYERS, 16, generator=generator)
    units = torch.nn.functional.normalize(torch.randn(N_LAYERS, 16, generator=generator), dim=-1)
    result = layer_projections(positive, negative, layers=[0, 2], directions=direction_set(units))
    torch.testing.assert_close(result.positive[1], (positive[:, 0, 2] @ units[2]).float())
    torch.testing.assert_close(result.negative[0], (negative[:, 0, 0] @ units[0]).float())
    on_pc = layer_projections(positive[:5], negative[:5], layers=[1], component=0)
    component = pca_projection(positive[:5], negative[:5], layer=1).components[0]
    torch.testing.assert_close(
        on_pc.positive[0], positive[:, 0, 1] @ component, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ConfigError):
        layer_projections(positive, negative, layers=[0])


def test_pca_and_histogram_figures_have_one_panel_per_layer() -> None:
    axis = torch.eye(16)[3]
    positive, negative = planted_acts(axis, n=10)
    positive, negative = positive.expand(-1, -1, 2, -1), negative.expand(-1, -1, 2, -1)
    scatter = pca_scatter_figure(pca_projections(positive, negative, layers=[0, 1]))
    assert len(scatter.data) == 4  # two sets x two layers
    histogram = projection_histogram_figure(
        direction_set(torch.stack([axis, axis])), positive, negative, layers=[0, 1]
    )
    assert [trace.type for trace in histogram.data] == ["histogram"] * 4
    assert "AUROC 1.00" in histogram.layout.annotations[0].text


# ----------------------------------------------------------------------------------------------
# geometry.py
# ----------------------------------------------------------------------------------------------


def test_cosine_across_layers_of_identical_directions_is_one() -> None:
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0))
    same = direction_set(vector.expand(N_LAYERS, -1).clone())
    torch.testing.assert_close(
        cosine_across_layers(same), torch.ones(N_LAYERS, N_LAYERS, dtype=torch.float64)
    )
    orthogonal = direction_set(torch.eye(D_MODEL)[:N_LAYERS] * 3.0)
    torch.testing.assert_close(
        cosine_across_layers(orthogonal), torch.eye(N_LAYERS, dtype=torch.float64)
    )
    assert isinstance(cosine_layers_figure(cosine_across_layers(same)), go.Figure)


def test_cosine_between_and_across_methods_known_values() -> None:
    units = torch.nn.functional.normalize(torch.randn(N_LAYERS, D_MODEL), dim=-1)
    first, flipped = direction_set(units), direction_set(-2.0 * units)
    torch.testing.assert_close(
        cosine_between(first, first), torch.ones(N_LAYERS, dtype=torch.float64)
    )
    torch.testing.assert_close(
        cosine_between(first, flipped), -torch.ones(N_LAYERS, dtype=torch.float64)
    )
    tilted = units.clone()
    tilted[1] = torch.nn.functional.normalize(units[1] + torch.linalg.svd(units[1:2])[2][1], dim=0)
    result = cosine_across_methods({"a": first, "b": direction_set(tilted)}, 1)
    assert result.value("a", "b") == pytest.approx(math.cos(math.pi / 4), abs=1e-6)
    assert result.value("a", "a") == pytest.approx(1.0)
    assert isinstance(cosine_methods_figure(result), go.Figure)
    assert len(cosine_between_figure({"x": cosine_between(first, flipped)}).data) == 1


def test_logit_lens_of_an_unembedding_row_puts_its_token_first(model: HookedModel) -> None:
    W_U = model.bridge.W_U.detach().float()
    gain = norm_gain(model.hf.model.norm)
    token = int(W_U.norm(dim=0).argmax())  # longest row: first by Cauchy-Schwarz
    vector = W_U[:, token] / gain  # what the final norm's gain maps onto the row itself
    for method in ("readout", "linear"):
        lens = direction_logit_lens(model, vector, k=5, method=method)
        assert lens.promoted[0].token_id == token
        assert lens.promoted[0].value == max(score.value for score in lens.promoted)
        assert (
            direction_logit_lens(model, -vector, k=5, method=method).suppressed[0].token_id == token
        )
    plain = direction_logit_lens(model, W_U[:, 7], k=3)  # the gain alone does not move it here
    assert plain.promoted[0].token_id == 7
    assert isinstance(logit_lens_figure(plain), go.Figure)


def test_logit_lens_readout_and_linear_rank_tokens_alike(model: HookedModel) -> None:
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5))
    readout = direction_logit_lens(model, vector, k=20, method="readout")
    linear = direction_logit_lens(model, vector, k=20, method="linear")
    assert [s.token_id for s in readout.promoted] == [s.token_id for s in linear.promoted]
    assert [s.token_id for s in readout.suppressed] == [s.token_id for s in linear.suppressed]


# ----------------------------------------------------------------------------------------------
# heatmap.py
# ----------------------------------------------------------------------------------------------


def test_generation_projections_match_cached_activations(
    model: HookedModel, prompts: list[str]
) -> None:
    unit = torch.nn.functional.normalize(
        torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2)), dim=0
    )
    result = generation_projections(model, prompts[:4], unit, max_new_tokens=3, prompt_positions=4)
    assert result.values.shape == (4, 4 + 3, N_LAYERS)
    assert result.positions == (-4, -3, -2, -1, 0, 1, 2)
    cached = collect_activations(model, prompts[:4], sites=("resid_post",), progress=False)
    expected = cached.site("resid_post")[:, 0].double() @ unit.double()  # prompts x layers
    last = result.positions.index(-1)
    torch.testing.assert_close(result.values[:, last].double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.isnan(result.values[:, : last + 1]).any()
    assert result.mean().shape == (7, N_LAYERS)
    assert int(result.counts()[0]) == 4

    later = generation_projections(
        model,
        prompts[:4],
        unit,
        max_new_tokens=3,
        prompt_positions=4,
        interventions=[addition(unit, layer=0, alpha=3.0, apply_to="generated")],
    )
    # the rule spares prompt positions exactly as generation did
    torch.testing.assert_close(later.values[:, : last + 1], result.values[:, : last + 1])

    ablated = generation_projections(
        model,
        prompts[:4],
        unit,
        max_new_tokens=3,
        prompt_positions=4,
        interventions=[ablation(unit)],
    )
    finite = ablated.values[~torch.isnan(ablated.values)]
    assert finite.numel() > 0 and float(finite.abs().max()) < 1e-5  # nothing left on the axis

    figure = generation_heatmap_figure({"unsteered": result, "ablated": ablated}, difference=True)
    assert [trace.type for trace in figure.data] == ["heatmap"] * 3


# ----------------------------------------------------------------------------------------------
# mechanistic.py: frozen attention
# ----------------------------------------------------------------------------------------------


def _vector(seed: int = 1) -> torch.Tensor:
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


def test_frozen_attention_keeps_all_when_attention_writes_nothing(
    model: HookedModel, prompts: list[str]
) -> None:
    with scaled_parameters(model, lambda name: "o_proj" in name, 0.0):
        result = frozen_attention_effect(model, prompts, addition(_vector(), layer=0, alpha=5.0))
    assert abs(result.effect_full) > 1e-3  # the MLPs still carry an effect
    assert result.fraction_kept == pytest.approx(1.0, abs=1e-5)


def test_frozen_attention_keeps_all_after_the_last_attention(
    model: HookedModel, prompts: list[str]
) -> None:
    last = addition(_vector(), layer=N_LAYERS - 1, alpha=5.0, site="resid_post")
    result = frozen_attention_effect(model, prompts, last)
    assert abs(result.effect_full) > 1e-3
    assert result.fraction_kept == pytest.approx(1.0, abs=1e-5)


def test_frozen_attention_loses_part_of_the_effect_with_sharp_attention(
    model: HookedModel, prompts: list[str]
) -> None:
    # Random init gives near-uniform attention; sharpen it so that steering moves the patterns.
    with scaled_parameters(model, lambda name: "q_proj" in name or "k_proj" in name, 20.0):
        result = frozen_attention_effect(model, prompts, addition(_vector(), layer=0, alpha=1.0))
    assert abs(result.effect_full) > 1e-2
    assert 0.5 < result.fraction_kept < 0.95  # measured 0.85 on this seed


def test_frozen_attention_without_steering_reproduces_the_baseline(
    model: HookedModel, prompts: list[str]
) -> None:
    result = frozen_attention_effect(model, prompts[:2], addition(_vector(), layer=0, alpha=0.0))
    assert result.effect_full == 0.0 and result.effect_frozen == 0.0
    assert math.isnan(result.fraction_kept)
    assert isinstance(frozen_attention_figure({"zero": result}), go.Figure)


def test_token_logprob_metric_is_log_of_summed_probabilities() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    value = token_logprob_metric([1, 2])(logits)
    assert float(value) == pytest.approx((math.log(0.5) + math.log(0.9)) / 2, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# mechanistic.py: sparsification and coordinate overlap
# ----------------------------------------------------------------------------------------------


def test_sparsify_keeps_the_largest_coordinates_and_full_is_exact() -> None:
    vector = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 1.0, 0.0, -0.7])
    assert torch.equal(sparsify(vector, 1.0), vector)
    assert torch.equal(sparsify(vector, 0.25), torch.tensor([0, -3.0, 0, 2.0, 0, 0, 0, 0]))
    assert int((sparsify(vector, 0.01) != 0).sum()) == 1
    with pytest.raises(ConfigError):
        sparsify(vector, 0.0)


def test_sparsified_effect_at_full_fraction_equals_the_full_vector(
    model: HookedModel, prompts: list[str]
) -> None:
    result = sparsified_effect(model, prompts[:4], _vector() * 5.0, layer=1, fractions=(0.1, 1.0))
    assert result.n_coordinates == (7, D_MODEL)
    assert result.effects[-1] == result.effect_full and result.relative[-1] == 1.0
    assert result.norm_kept[-1] == 1.0 and 0 < result.norm_kept[0] < 1
    assert abs(result.effect_full) > 0
    assert len(sparsification_figure(result).data) == 2


def test_coordinate_overlap_known_jaccard() -> None:
    first = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.1, 0.1])
    second = torch.tensor([5.0, 0.1, 0.1, -4.0, 3.0, 0.1])  # shares one of three
    result = important_coordinate_overlap({"a": first, "b": second, "c": -2 * first}, k=3)
    assert result.top["a"] == (0, 1, 2)
    assert result.value("a", "b") == pytest.approx(1 / 5)
    assert result.value("a", "c") == 1.0 and result.value("b", "b") == 1.0
    assert isinstance(coordinate_overlap_figure(result), go.Figure)


# ----------------------------------------------------------------------------------------------
# mechanistic.py: head attribution
# ----------------------------------------------------------------------------------------------


def test_head_attribution_sums_to_the_attention_write(
    model: HookedModel, prompts: list[str]
) -> None:
    unit = torch.nn.functional.normalize(_vector(4), dim=0)
    result = head_attribution(model, prompts, unit, batch_size=4)
    assert result.values.shape == (N_LAYERS, 4) and result.post_norm
    scale = float(result.attn_out.abs().max())
    torch.testing.assert_close(result.values.sum(-1), result.attn_out, rtol=1e-4, atol=1e-5 * scale)
    write_scale = float(result.attn_write.abs().max())
    torch.testing.assert_close(
        result.pre_norm.sum(-1), result.attn_write, rtol=1e-4, atol=1e-5 * write_scale
    )
    assert isinstance(head_attribution_figure(result), go.Figure)


def test_head_attribution_matches_knocking_out_the_head(
    model: HookedModel, prompts: list[str]
) -> None:
    unit = torch.nn.functional.normalize(_vector(4), dim=0)
    layer, head = 1, 2
    result = head_attribution(model, prompts[:3], unit, layers=[layer])
    bridge = model.bridge
    batch = model.tokenize(model.format_prompts(prompts[:3]))

    def write_along_unit(hooks: list) -> float:
        with bridge.hooks(fwd_hooks=hooks):
            _, cache = bridge.run_with_cache(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                names_filter=lambda name: name == f"blocks.{layer}.attn.hook_out",
            )
        return float((cache[f"blocks.{layer}.attn.hook_out"][:, -1] @ unit).mean())

    def knock_out(z: torch.Tensor, hook: object) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    change = write_along_unit([]) - write_along_unit([(f"blocks.{layer}.attn.hook_z", knock_out)])
    assert change == pytest.approx(float(result.pre_norm[0, head]), rel=1e-4, abs=1e-7)


def test_head_attribution_and_freezing_on_gemma3(
    tmp_path_factory: pytest.TempPathFactory, prompts: list[str]
) -> None:
    directory = make_tiny_model(
        tmp_path_factory.mktemp("gemma3") / "tiny", n_layers=2, seed=1, architecture="gemma3"
    )
    gemma3 = load_model(str(directory), device="cpu")
    unit = torch.nn.functional.normalize(_vector(6), dim=0)
    result = head_attribution(gemma3, prompts[:3], unit)
    assert result.post_norm
    torch.testing.assert_close(
        result.values.sum(-1),
        result.attn_out,
        rtol=1e-4,
        atol=1e-5 * float(result.attn_out.abs().max()),
    )
    with scaled_parameters(gemma3, lambda name: "o_proj" in name, 0.0):
        frozen = frozen_attention_effect(
            gemma3, prompts[:3], addition(_vector(), layer=0, alpha=5.0)
        )
    assert abs(frozen.effect_full) > 1e-4
    assert frozen.fraction_kept == pytest.approx(1.0, abs=1e-5)


def test_unit_vector_rejects_a_zero_direction(model: HookedModel, prompts: list[str]) -> None:
    with pytest.raises(Exception, match="zero"):
        head_attribution(model, prompts[:1], torch.zeros(D_MODEL))


def test_refusal_dir_never_imports_plotly_or_analysis() -> None:
    """The dependency runs one way: no refusal_dir module imports plotly or analysis on import."""
    import ast
    import subprocess
    import sys

    import refusal_dir

    root = Path(refusal_dir.__file__).parent
    modules = sorted(
        ".".join(("refusal_dir", *source.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for source in root.rglob("*.py")
    )
    for source in root.rglob("*.py"):
        for node in ast.parse(source.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"plotly", "analysis"}, (source, name)
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'analysis'))\n"
        "print(leaked)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.strip() == "[]", completed.stdout


# ----------------------------------------------------------------------------------------------
# Old keyword names (docs/glossary.md): they warn and give the same result for one release
# ----------------------------------------------------------------------------------------------


def two_label_set(seed: int = 5) -> DirectionSet:
    """A DirectionSet with two token labels, so that choosing the label matters."""
    raw = torch.randn(2, N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(seed))
    meta = dataclasses.replace(direction_set(raw[0]).meta, positions=("post_instruction-1", "last"))
    return DirectionSet.from_raw(raw, meta)


def _same(old: object, new: object) -> None:
    if isinstance(new, torch.Tensor):
        torch.testing.assert_close(old, new)
    elif isinstance(new, dict):
        assert old.keys() == new.keys()
        for key in new:
            _same(old[key], new[key])
    elif isinstance(new, (tuple, list)):
        assert len(old) == len(new)
        for old_item, new_item in zip(old, new):
            _same(old_item, new_item)
    elif dataclasses.is_dataclass(new):
        for field in dataclasses.fields(new):
            _same(getattr(old, field.name), getattr(new, field.name))
    elif isinstance(new, float) and math.isnan(new):
        assert math.isnan(old)
    else:
        assert old == new


def _renamed_cases() -> list[tuple[str, Callable[..., object], dict, dict]]:
    directions, other = two_label_set(5), two_label_set(6)
    acts = torch.randn(6, 2, N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(7))
    return [
        (
            "cosine_across_layers",
            lambda **k: cosine_across_layers(directions, **k),
            {"position": 0},
            {"token": 0},
        ),
        (
            "cosine_across_methods",
            lambda **k: cosine_across_methods({"a": directions, "b": other}, 1, **k),
            {"position": "post_instruction-1"},
            {"token": "post_instruction-1"},
        ),
        (
            "cosine_between",
            lambda **k: cosine_between(directions, other, **k),
            {"position_first": 0, "position_second": "last"},
            {"token_first": 0, "token_second": "last"},
        ),
        (
            "pca_projection",
            lambda **k: pca_projection(acts, acts.flip(0), layer=1, **k),
            {"position": 0},
            {"token": 0},
        ),
        (
            "pca_projections",
            lambda **k: pca_projections(acts, acts.flip(0), layers=[0, 2], **k)[1],
            {"position": 0},
            {"token": 0},
        ),
        (
            "layer_projections",
            lambda **k: layer_projections(
                acts, acts.flip(0), layers=[1], directions=directions, **k
            ),
            {"position": 0, "direction_position": 0},
            {"token": 0, "direction_token": 0},
        ),
    ]


@pytest.mark.parametrize("case", range(6), ids=[case[0] for case in _renamed_cases()])
def test_old_keyword_names_warn_and_give_the_same_result(case: int) -> None:
    name, call, old, new = _renamed_cases()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = call(**new)
    with pytest.warns(DeprecationWarning) as caught:
        result = call(**old)
    _same(result, expected)
    messages = {str(warning.message) for warning in caught}
    for old_name, new_name in zip(old, new):
        assert f"{name}({old_name}=) is deprecated: use {new_name}= (docs/glossary.md)" in messages
    with pytest.raises(ConfigError, match="use"), pytest.warns(DeprecationWarning):
        call(**old, **new)


def test_old_keyword_names_on_the_model_functions(model: HookedModel, prompts: list[str]) -> None:
    directions = two_label_set(8)
    steer = addition(directions, layer=1, alpha=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heads = head_attribution(model, prompts[:2], directions, layer=1, batch_size=2)
        panels = compare_generation_projections(
            model,
            prompts[:2],
            directions,
            layer=1,
            token=0,
            interventions=[steer],
            max_new_tokens=2,
            prompt_positions=2,
        )
        sparse = sparsified_effect(
            model, prompts[:2], directions, layer=1, fractions=(0.5,), apply_to="prompt"
        )
    with pytest.warns(DeprecationWarning, match="direction_layer"):
        _same(
            head_attribution(model, prompts[:2], directions, direction_layer=1, batch_size=2), heads
        )
    with pytest.warns(DeprecationWarning) as caught:
        old_panels = compare_generation_projections(
            model,
            prompts[:2],
            directions,
            direction_layer=1,
            direction_position=0,
            interventions=[steer],
            max_new_tokens=2,
            prompt_positions=2,
        )
    assert {str(warning.message).split(" is ")[0] for warning in caught} == {
        "compare_generation_projections(direction_layer=)",
        "compare_generation_projections(direction_position=)",
    }
    _same(old_panels, panels)
    with pytest.warns(DeprecationWarning, match=r"sparsified_effect\(positions=\)"):
        old_sparse = sparsified_effect(
            model, prompts[:2], directions, layer=1, fractions=(0.5,), positions="prompt"
        )
    _same(old_sparse, sparse)
