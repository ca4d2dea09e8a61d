"""Mechanistic checks of steering after Cheng, Wiegreffe & Manocha (2026).

Their claims: steering acts mainly through attention OV circuits, so freezing the attention
patterns at their unsteered values keeps most of the effect (they lose ~8.75%); and steering
vectors can be sparsified by 90-99% while keeping most of the effect. Each check here returns
numbers (a dataclass); the ``*_figure`` functions only plot them.

* :func:`frozen_attention_effect`: run unsteered and cache every layer's attention pattern
  (``blocks.{l}.attn.hook_pattern`` on the TransformerLens bridge, post-softmax, so freezing it
  is freezing the attention scores); run steered; run steered again with every pattern replaced
  by its unsteered value. ``fraction_kept = effect_frozen / effect_full`` with
  ``effect = metric(run) - metric(unsteered)``. All three runs use the bridge.
* :func:`sparsified_effect`: keep the ``k`` largest-magnitude coordinates of a steering vector
  (``k = ceil(fraction * d_model)``), zero the rest, and compare the effect with the full vector's
  (runs use the library's fast path, :func:`refusal_dir.next_token_logits`).
* :func:`important_coordinate_overlap`: Jaccard overlap of the top-``k`` coordinates of vectors.
* :func:`head_attribution`: each attention head's write along a direction at one position.

Attributing heads through Gemma's post-attention norm. On Gemma-2/3, ``attn_out`` (what the
block adds to the stream) is ``gain * x / s`` with ``x = sum_h z_h W_O[h]`` the o_proj output and
``s = sqrt(mean(x^2) + eps)`` one number per position (``ln1_post.hook_scale``). With ``s`` held
at its value in the run, the norm is linear in ``x``, so head ``h`` contributes
``(z_h W_O[h]) . (gain * u) / s`` to ``attn_out . u``: the contributions sum to the norm's output
exactly (not to first order: ``s`` is the run's own value). This is the usual linearization of a
norm used by direct logit attribution. ``pre_norm`` holds the plain ``(z_h W_O[h]) . u``, which
sums to the o_proj output's projection. On models without a post-norm the two are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from analysis._common import (
    TEMPLATE,
    annotated_heatmap,
    integer_ticks,
    layer_list,
    unit_vector,
)
from refusal_dir import (
    DirectionSet,
    HookedModel,
    addition,
    bridge_hooks,
    hook_name,
    next_token_logits,
)
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.errors import ConfigError, DataError, DirectionMismatchError
from refusal_dir.interventions import Intervention, PositionState

PerLayer = Float[Tensor, "layers"]
Vector = Float[Tensor, "d_model"]

Metric = Callable[[Float[Tensor, "prompts vocab"]], "Tensor | float"]
DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------
# Metrics on last-position logits
# ----------------------------------------------------------------------------------------------


def token_logprob_metric(token_ids: Sequence[int]) -> Metric:
    """Mean over prompts of ``log sum_t p(t)`` over the target tokens, at the last position."""
    ids = sorted({int(token) for token in token_ids})
    if not ids:
        raise ConfigError("token_logprob_metric needs at least one token id")

    def metric(logits: Float[Tensor, "prompts vocab"]) -> Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(log_probs[:, ids], dim=-1).mean()

    return metric


def refusal_token_metric(model: HookedModel, words: Sequence[str] = ("I",)) -> Metric:
    """Log-probability that the reply starts with a refusal word (first token of each word).

    ``"I"`` is the first token of Gemma's refusals ("I cannot...", "I'm sorry..."), as in
    Arditi et al. (2024).
    """
    ids = []
    for word in words:
        encoded = model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ConfigError(f"the refusal word {word!r} tokenizes to nothing")
        ids.append(int(encoded[0]))
    return token_logprob_metric(ids)


def _metric_value(metric: Metric, logits: Tensor) -> float:
    value = metric(logits)
    return float(value.float().mean()) if isinstance(value, Tensor) else float(value)


def _interventions(intervention: Intervention | Sequence[Intervention]) -> tuple[Intervention, ...]:
    if isinstance(intervention, Sequence):
        return tuple(intervention)
    return (intervention,)


def _texts(model: HookedModel, prompts: Sequence[str], apply_chat_template: bool) -> list[str]:
    if isinstance(prompts, str) or len(prompts) == 0:
        raise DataError("prompts must be a non-empty list of strings")
    return model.format_prompts(prompts) if apply_chat_template else list(prompts)


def _batches(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# (a) Frozen attention patterns
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenAttentionResult:
    """Metric values of the three runs and the effects; ``fraction_kept`` is NaN if no effect."""

    metric_unsteered: float
    metric_steered: float
    metric_frozen: float
    effect_full: float
    effect_frozen: float
    fraction_kept: float


@torch.no_grad()
def frozen_attention_effect(
    model: HookedModel,
    prompts: Sequence[str],
    intervention: Intervention | Sequence[Intervention],
    *,
    metric: Metric | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = True,
) -> FrozenAttentionResult:
    """How much of a steering effect survives with attention patterns frozen at unsteered values.

    ``metric`` takes the last-position logits (``prompts x vocab``) and returns a number (or a
    tensor, averaged); default: :func:`refusal_token_metric`. Interventions must be bridge-able
    (additions, ``mode="stream"`` ablations).
    """
    interventions = _interventions(intervention)
    metric = metric or refusal_token_metric(model)
    texts = _texts(model, prompts, apply_chat_template)
    bridge = model.bridge
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.n_layers)]
    wanted = set(pattern_names)
    unsteered, steered, frozen = [], [], []
    for rows in _batches(len(texts), batch_size):
        batch = model.tokenize(texts[rows]).to(model.device)
        logits, cache = bridge.run_with_cache(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            names_filter=lambda name: name in wanted,
        )
        patterns = {name: cache[name] for name in pattern_names}
        unsteered.append(logits[:, -1].float().cpu())
        steering = bridge_hooks(model, *interventions, state=PositionState(rows=rows))

        def freeze(pattern: Tensor, hook: object, saved: dict[str, Tensor] = patterns) -> Tensor:
            return saved[hook.name]  # type: ignore[attr-defined]

        with bridge.hooks(fwd_hooks=steering):
            logits = bridge(batch.input_ids, attention_mask=batch.attention_mask)
        steered.append(logits[:, -1].float().cpu())
        with bridge.hooks(fwd_hooks=[*steering, *((name, freeze) for name in pattern_names)]):
            logits = bridge(batch.input_ids, attention_mask=batch.attention_mask)
        frozen.append(logits[:, -1].float().cpu())
    base = _metric_value(metric, torch.cat(unsteered))
    full = _metric_value(metric, torch.cat(steered))
    kept = _metric_value(metric, torch.cat(frozen))
    effect_full, effect_frozen = full - base, kept - base
    fraction = effect_frozen / effect_full if effect_full != 0 else math.nan
    return FrozenAttentionResult(base, full, kept, effect_full, effect_frozen, fraction)


def frozen_attention_figure(
    results: FrozenAttentionResult | Mapping[str, FrozenAttentionResult],
    *,
    title: str = "Steering effect with attention patterns frozen",
) -> go.Figure:
    """Grouped bars of the full and frozen-pattern effects, the fraction kept written above."""
    named = {"steering": results} if isinstance(results, FrozenAttentionResult) else dict(results)
    labels = list(named)
    figure = go.Figure()
    figure.add_trace(go.Bar(x=labels, y=[named[k].effect_full for k in labels], name="full effect"))
    figure.add_trace(
        go.Bar(
            x=labels,
            y=[named[k].effect_frozen for k in labels],
            name="attention patterns frozen",
            text=[f"{100 * named[k].fraction_kept:.0f}% kept" for k in labels],
            textposition="outside",
        )
    )
    figure.update_layout(
        title=title, template=TEMPLATE, barmode="group", yaxis_title="effect on the metric"
    )
    return figure


# ----------------------------------------------------------------------------------------------
# (b) Sparsified steering vectors
# ----------------------------------------------------------------------------------------------


def sparsify(vector: Vector, fraction: float) -> Vector:
    """Keep the ``ceil(fraction * d_model)`` largest-magnitude coordinates (at least one).

    ``fraction = 1`` returns an exact copy of ``vector``.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    vector = torch.as_tensor(vector)
    if vector.ndim != 1:
        raise DirectionMismatchError(f"expected a d_model vector, got shape {tuple(vector.shape)}")
    count = max(1, math.ceil(fraction * vector.shape[0]))
    if count >= vector.shape[0]:
        return vector.clone()
    keep = torch.topk(vector.abs(), count).indices
    sparse = torch.zeros_like(vector)
    sparse[keep] = vector[keep]
    return sparse


@dataclass(frozen=True)
class SparsificationResult:
    """Effect of the sparsified vector at each fraction, absolute and relative to the full one."""

    fractions: tuple[float, ...]
    n_coordinates: tuple[int, ...]
    effects: tuple[float, ...]
    relative: tuple[float, ...]
    norm_kept: tuple[float, ...]
    effect_full: float
    metric_unsteered: float


@renamed_keywords(positions="apply_to")
@torch.no_grad()
def sparsified_effect(
    model: HookedModel,
    prompts: Sequence[str],
    vector: Vector | DirectionSet,
    *,
    layer: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    metric: Metric | None = None,
    alpha: float = 1.0,
    site: str = "resid_pre",
    apply_to: str = "all",
    batch_size: int = 16,
    apply_chat_template: bool = True,
) -> SparsificationResult:
    """Steering effect of the top-k% coordinates of ``vector`` added at ``layer``, per fraction.

    ``vector`` is a raw steering vector (a DirectionSet gives its raw vector at ``layer``);
    ``alpha * vector`` is added at ``site`` of ``layer``. ``relative`` is each effect over the
    full vector's (NaN when the full vector has no effect); ``norm_kept`` the share of the
    vector's squared norm that the kept coordinates hold.
    """
    if isinstance(vector, DirectionSet):
        vector = vector.vector(layer)
    vector = torch.as_tensor(vector).detach().float().cpu()
    if vector.ndim != 1 or vector.shape[0] != model.d_model:
        raise DirectionMismatchError(
            f"the steering vector must have d_model {model.d_model}, "
            f"got shape {tuple(vector.shape)}"
        )
    if not fractions:
        raise ConfigError("pass at least one fraction")
    metric = metric or refusal_token_metric(model)

    def measure(interventions: Sequence[Intervention]) -> float:
        logits = next_token_logits(
            model,
            prompts,
            interventions=interventions,
            batch_size=batch_size,
            apply_chat_template=apply_chat_template,
        )
        return _metric_value(metric, logits)

    def steered(candidate: Tensor) -> float:
        return measure(
            [
                addition(
                    candidate, layer=layer, alpha=alpha, site=site, unit="raw", apply_to=apply_to
                )
            ]
        )

    base = measure([])
    effect_full = steered(vector) - base
    total = float(vector.pow(2).sum())
    effects, counts, kept = [], [], []
    for fraction in fractions:
        sparse = sparsify(vector, float(fraction))
        counts.append(int((sparse != 0).sum()) if fraction < 1 else vector.shape[0])
        kept.append(float(sparse.pow(2).sum()) / total if total > 0 else math.nan)
        effects.append(steered(sparse) - base)
    relative = tuple(e / effect_full if effect_full != 0 else math.nan for e in effects)
    return SparsificationResult(
        fractions=tuple(float(f) for f in fractions),
        n_coordinates=tuple(counts),
        effects=tuple(effects),
        relative=relative,
        norm_kept=tuple(kept),
        effect_full=effect_full,
        metric_unsteered=base,
    )


def sparsification_figure(
    results: SparsificationResult | Mapping[str, SparsificationResult],
    *,
    title: str = "Steering effect kept by the top-k% coordinates",
) -> go.Figure:
    """Effect kept (relative to the full vector) against the share of coordinates kept."""
    single = isinstance(results, SparsificationResult)
    named: dict[str, SparsificationResult] = (
        {"effect kept": results} if isinstance(results, SparsificationResult) else dict(results)
    )
    figure = go.Figure()
    ticks: set[float] = set()
    for name, result in named.items():
        ticks.update(100 * f for f in result.fractions)
        percent = [100 * f for f in result.fractions]
        figure.add_trace(
            go.Scatter(
                x=percent,
                y=list(result.relative),
                mode="lines+markers",
                name=name,
                customdata=list(result.n_coordinates),
                hovertemplate="%{x}% (%{customdata} coordinates): %{y:.3f}<extra></extra>",
            )
        )
        figure.add_trace(
            go.Scatter(
                x=percent,
                y=list(result.norm_kept),
                mode="lines",
                line={"dash": "dash"},
                name="squared norm kept" if single else f"{name}: squared norm kept",
            )
        )
    figure.add_hline(y=1.0, line={"color": "grey", "width": 1, "dash": "dot"})
    figure.update_layout(
        title=title,
        template=TEMPLATE,
        xaxis={
            "title": "coordinates kept (%)",
            "type": "log",
            "tickvals": sorted(ticks),
            "ticktext": [f"{tick:g}" for tick in sorted(ticks)],
        },
        yaxis_title="effect relative to the full vector",
    )
    return figure


# ----------------------------------------------------------------------------------------------
# (c) Overlap of the most important coordinates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinateOverlap:
    """Jaccard overlap of the top-``k`` coordinates (by magnitude) between named vectors."""

    names: tuple[str, ...]
    k: int
    matrix: Float[Tensor, "n n"]
    top: dict[str, tuple[int, ...]]

    def value(self, first: str, second: str) -> float:
        return float(self.matrix[self.names.index(first), self.names.index(second)])


def important_coordinate_overlap(
    sets: Mapping[str, Tensor | DirectionSet], k: int, *, layer: int | None = None
) -> CoordinateOverlap:
    """Pairwise Jaccard overlap ``|A & B| / |A | B|`` of the top-``k`` coordinates by magnitude.

    Values are vectors (or DirectionSets, read at ``layer``), e.g. one method's direction each.
    """
    if not sets:
        raise ConfigError("pass at least one vector")
    vectors = {name: unit_vector(value, layer=layer) for name, value in sets.items()}
    widths = {vector.shape[0] for vector in vectors.values()}
    if len(widths) != 1:
        raise DirectionMismatchError(f"the vectors differ in length: {sorted(widths)}")
    width = widths.pop()
    if not 1 <= k <= width:
        raise ConfigError(f"k must be in 1..{width}, got {k}")
    top = {
        name: tuple(sorted(int(i) for i in torch.topk(vector.abs(), k).indices))
        for name, vector in vectors.items()
    }
    names = tuple(vectors)
    matrix = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, first in enumerate(names):
        for j, second in enumerate(names):
            a, b = set(top[first]), set(top[second])
            matrix[i, j] = len(a & b) / len(a | b)
    return CoordinateOverlap(names, k, matrix, top)


def coordinate_overlap_figure(result: CoordinateOverlap, *, title: str | None = None) -> go.Figure:
    """Annotated heatmap of the Jaccard overlaps."""
    return annotated_heatmap(
        result.matrix,
        result.names,
        zmin=0,
        zmax=1,
        colorscale="Blues",
        colorbar_title="Jaccard",
        title=title or f"Overlap of the top-{result.k} coordinates",
    )


# ----------------------------------------------------------------------------------------------
# (d) Per-head attribution along a direction
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadAttribution:
    """Mean per-head write along a unit direction at one position (``layers x heads``).

    ``values``: contribution to ``attn_out . u`` (through the linearized post-attention norm on
    Gemma-2/3); ``pre_norm``: contribution to ``o_proj output . u``. ``attn_out`` and
    ``attn_write`` are the per-layer totals measured from the run; on models without biases
    ``values.sum(-1) == attn_out`` and ``pre_norm.sum(-1) == attn_write``.
    """

    layers: tuple[int, ...]
    values: Float[Tensor, "layers heads"]
    pre_norm: Float[Tensor, "layers heads"]
    attn_out: PerLayer
    attn_write: PerLayer
    post_norm: bool
    n_prompts: int


@renamed_keywords(direction_layer="layer")
@torch.no_grad()
def head_attribution(
    model: HookedModel,
    prompts: Sequence[str],
    unit_direction: Vector | DirectionSet,
    *,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    position: int = -1,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 8,
    apply_chat_template: bool = True,
) -> HeadAttribution:
    """Each attention head's mean write along a direction at one prompt position.

    ``position`` indexes the left-padded sequence (``-1``: the last prompt token); the run may
    be under ``interventions`` (bridge-able ones: additions, ``mode="stream"`` ablations). The
    direction is normalized here (a DirectionSet gives its unit direction at
    ``layer``). See the module docstring for the attribution through Gemma's
    post-attention norm.
    """
    unit = unit_vector(unit_direction, layer=layer)
    if unit.shape[0] != model.d_model:
        raise DirectionMismatchError(
            f"the direction has d_model {unit.shape[0]} but the model has {model.d_model}"
        )
    if position >= 0:
        raise ConfigError("position counts from the end of the prompt: use -1, -2, ...")
    chosen = layer_list(layers, model.n_layers)
    texts = _texts(model, prompts, apply_chat_template)
    bridge = model.bridge
    architecture = model.architecture
    # TransformerLens names the post-attention norm of Gemma-2/3 blocks ln1_post.
    post_norm = architecture.has_post_norms
    names: dict[int, dict[str, str]] = {}
    for block in chosen:
        names[block] = {
            "z": f"blocks.{block}.attn.hook_z",
            "write": f"blocks.{block}.attn.hook_out",
            "out": hook_name("attn_out", block),
        }
        if post_norm:
            names[block]["scale"] = f"blocks.{block}.ln1_post.hook_scale"
    wanted = {name for entry in names.values() for name in entry.values()}
    unit_device = unit.to(device=model.device)
    n_heads = int(bridge.cfg.n_heads)
    values = torch.zeros(len(chosen), n_heads, dtype=torch.float64)
    pre_norm = torch.zeros(len(chosen), n_heads, dtype=torch.float64)
    attn_out = torch.zeros(len(chosen), dtype=torch.float64)
    attn_write = torch.zeros(len(chosen), dtype=torch.float64)
    for rows in _batches(len(texts), batch_size):
        batch = model.tokenize(texts[rows]).to(model.device)
        if -position > batch.input_ids.shape[1]:
            raise ConfigError(f"position {position} is before the start of the prompts")
        state = PositionState(rows=rows)
        with bridge.hooks(fwd_hooks=bridge_hooks(model, *interventions, state=state)):
            _, cache = bridge.run_with_cache(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                names_filter=lambda name: name in wanted,
                stop_at_layer=max(chosen) + 1,
                return_type=None,
            )
        for index, block in enumerate(chosen):
            z = cache[names[block]["z"]][:, position].to(torch.float64)  # batch heads d_head
            W_O = bridge.blocks[block].attn.W_O.detach().to(torch.float64)  # heads d_head d_model
            per_head = torch.einsum("bhd,hdm->bhm", z, W_O) @ unit_device  # batch heads
            pre_norm[index] += per_head.sum(dim=0).cpu()
            attn_write[index] += (
                (cache[names[block]["write"]][:, position].to(torch.float64) @ unit_device)
                .sum()
                .cpu()
            )
            attn_out[index] += (
                (cache[names[block]["out"]][:, position].to(torch.float64) @ unit_device)
                .sum()
                .cpu()
            )
            norm = architecture.post_norm(model.layers[block], "attn")
            if norm is not None:
                gain = architecture.norm_gain(norm).to(device=model.device, dtype=torch.float64)
                scale = cache[names[block]["scale"]][:, position].to(torch.float64)  # batch 1
                through = torch.einsum("bhd,hdm->bhm", z, W_O) @ (gain * unit_device)
                values[index] += (through / scale).sum(dim=0).cpu()
            else:
                values[index] += per_head.sum(dim=0).cpu()
    count = len(texts)
    return HeadAttribution(
        layers=tuple(chosen),
        values=(values / count).float(),
        pre_norm=(pre_norm / count).float(),
        attn_out=(attn_out / count).float(),
        attn_write=(attn_write / count).float(),
        post_norm=post_norm,
        n_prompts=count,
    )


def head_attribution_figure(
    result: HeadAttribution,
    *,
    pre_norm: bool = False,
    title: str = "Attention heads' write along the direction",
) -> go.Figure:
    """Heatmap ``layer x head`` of the mean write (diverging scale centred on zero)."""
    data = result.pre_norm if pre_norm else result.values
    bound = float(data.abs().max()) or 1.0
    where = "o_proj output" if pre_norm or not result.post_norm else "attn_out (linearized norm)"
    figure = go.Figure(
        go.Heatmap(
            z=data.tolist(),
            x=list(range(data.shape[1])),
            y=list(result.layers),
            zmin=-bound,
            zmax=bound,
            colorscale="RdBu_r",
            colorbar={"title": "projection"},
            hovertemplate="layer %{y} head %{x}: %{z:.4f}<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"{title}: {where}, mean over {result.n_prompts} prompts",
        template=TEMPLATE,
        xaxis_title="head",
        yaxis_title="layer",
        height=max(360, 24 * len(result.layers) + 160),
    )
    figure.update_xaxes(**integer_ticks(data.shape[1]))
    figure.update_yaxes(**integer_ticks(len(result.layers)))
    return figure
