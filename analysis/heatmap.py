"""Projection of every position's residual stream onto a direction, prompt and generated tokens.

The seed's generation heatmap: positions on the x axis (the last prompt tokens, then the
generated ones), layers on the y axis, colour the projection of ``resid_post`` onto one unit
direction, averaged over prompts.

How the numbers are made (:func:`generation_projections`):

1. generate greedily with :func:`refusal_dir.generation.generate_tokens` under the interventions
   (batched, KV-cached, stop tokens cut);
2. rebuild each batch exactly as generation laid it out: the left-padded prompts, then the
   generated tokens (a row that stopped early is padded on the right with mask 0; causal
   attention makes those pads invisible to earlier positions);
3. run one forward pass over prompt + generated tokens through the TransformerLens bridge
   (``run_with_cache``, ``resid_post`` of every layer) under the *same* interventions, given as
   bridge hooks whose position state marks the padded prompt width, so ``apply_to="prompt"`` or
   ``"generated"`` rules cover the same tokens as during generation;
4. project each layer's ``resid_post`` on the unit direction.

Position labels: ``-1`` is the last prompt token (the template's last token), ``-2`` the one
before...; ``0`` is the first generated token *as an input*, so its residual stream is what
predicts the second generated token. A prompt that has no token at a position (a shorter prompt,
or a generation that stopped) has ``NaN`` there; means skip them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from analysis._common import TEMPLATE, integer_ticks, unit_vector
from refusal_dir import DirectionSet, GenerationSettings, HookedModel, bridge_hooks, hook_name
from refusal_dir.deprecation import renamed_keywords
from refusal_dir.errors import ConfigError
from refusal_dir.generation import generate_tokens
from refusal_dir.interventions import Intervention, PositionState

PerPosition = Float[Tensor, "positions"]


@dataclass(frozen=True)
class GenerationProjections:
    """Per-prompt projections ``prompts x positions x layers`` (NaN where there is no token)."""

    values: Float[Tensor, "prompts positions layers"]
    positions: tuple[int, ...]
    layers: tuple[int, ...]
    completions: tuple[str, ...]

    def mean(self) -> Float[Tensor, "positions layers"]:
        """Mean over the prompts that have a token at each position."""
        return torch.nanmean(self.values, dim=0)

    def counts(self) -> PerPosition:
        """How many prompts have a token at each position."""
        return (~torch.isnan(self.values[:, :, 0])).sum(dim=0)


@renamed_keywords(direction_layer="layer", direction_position="token")
@torch.no_grad()
def generation_projections(
    model: HookedModel,
    prompts: Sequence[str],
    directions: DirectionSet | Tensor,
    *,
    layer: int | None = None,
    token: str | int | None = None,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 16,
    prompt_positions: int = 8,
    batch_size: int = 16,
    apply_chat_template: bool = True,
) -> GenerationProjections:
    """Generate, then project every position's ``resid_post`` at every layer on one direction.

    ``directions`` is a DirectionSet (its unit direction of ``layer``, at ``token``) or a vector
    (normalized here). Interventions must work as bridge hooks (additions and ``mode="stream"``
    ablations). See the module docstring for the exact procedure and position labels.
    """
    if prompt_positions < 1:
        raise ConfigError(f"prompt_positions must be >= 1, got {prompt_positions}")
    unit = unit_vector(directions, layer=layer, token=token)
    if unit.shape[0] != model.d_model:
        raise ConfigError(
            f"the direction has d_model {unit.shape[0]} but the model has {model.d_model}"
        )
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    completions, generated = generate_tokens(
        model,
        prompts,
        interventions=interventions,
        settings=settings,
        apply_chat_template=apply_chat_template,
        progress=False,
    )
    texts = model.format_prompts(prompts) if apply_chat_template else list(prompts)
    n_layers = model.n_layers
    width = prompt_positions + max_new_tokens
    values = torch.full((len(texts), width, n_layers), float("nan"))
    names = [hook_name("resid_post", layer) for layer in range(n_layers)]
    bridge = model.bridge
    unit_on_device = unit.to(device=model.device)
    for start in range(0, len(texts), batch_size):
        rows = slice(start, min(start + batch_size, len(texts)))
        batch = model.tokenize(texts[rows])
        prompt_width = batch.input_ids.shape[1]
        new_tokens = generated[rows]
        new_width = max((len(ids) for ids in new_tokens), default=0)
        new_ids = torch.full((len(batch), new_width), model.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros((len(batch), new_width), dtype=torch.long)
        for row, ids in enumerate(new_tokens):
            new_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            new_mask[row, : len(ids)] = 1
        input_ids = torch.cat([batch.input_ids, new_ids], dim=1).to(model.device)
        mask = torch.cat([batch.attention_mask, new_mask], dim=1).to(model.device)
        state = PositionState(prompt_length=prompt_width, rows=rows)
        with bridge.hooks(fwd_hooks=bridge_hooks(model, *interventions, state=state)):
            _, cache = bridge.run_with_cache(
                input_ids,
                attention_mask=mask,
                names_filter=lambda name: name in names,
                return_type=None,
            )
        projected = (
            torch.stack([cache[name].to(torch.float64) @ unit_on_device for name in names], dim=-1)
            .float()
            .cpu()
        )  # batch x seq x layers
        mask_cpu = mask.cpu().bool()
        first = prompt_width - prompt_positions
        for row in range(len(batch)):
            for column in range(width):
                source = first + column
                if 0 <= source < input_ids.shape[1] and mask_cpu[row, source]:
                    values[start + row, column] = projected[row, source]
    return GenerationProjections(
        values=values,
        positions=tuple(range(-prompt_positions, max_new_tokens)),
        layers=tuple(range(n_layers)),
        completions=tuple(completions),
    )


@renamed_keywords(direction_layer="layer", direction_position="token")
def compare_generation_projections(
    model: HookedModel,
    prompts: Sequence[str],
    directions: DirectionSet | Tensor,
    *,
    interventions: Sequence[Intervention],
    layer: int | None = None,
    token: str | int | None = None,
    max_new_tokens: int = 16,
    prompt_positions: int = 8,
    batch_size: int = 16,
    labels: tuple[str, str] = ("unsteered", "steered"),
) -> dict[str, GenerationProjections]:
    """:func:`generation_projections` without and with the interventions, keyed by ``labels``."""

    def run(chosen: Sequence[Intervention]) -> GenerationProjections:
        return generation_projections(
            model,
            prompts,
            directions,
            layer=layer,
            token=token,
            interventions=chosen,
            max_new_tokens=max_new_tokens,
            prompt_positions=prompt_positions,
            batch_size=batch_size,
        )

    return {labels[0]: run(()), labels[1]: run(interventions)}


def generation_heatmap_figure(
    panels: GenerationProjections | Mapping[str, GenerationProjections],
    *,
    difference: bool = False,
    title: str = "Projection on the direction during generation",
) -> go.Figure:
    """Heatmaps (layer x position) of the mean projection, one panel per entry, shared colours.

    ``difference=True`` adds a panel of the second entry minus the first (e.g. steered minus
    unsteered) on a diverging scale. The dotted line marks the start of generation.
    """
    named = {"": panels} if isinstance(panels, GenerationProjections) else dict(panels)
    if not named:
        raise ConfigError("no projections to plot")
    if difference and len(named) != 2:
        raise ConfigError("difference=True needs exactly two panels")
    means = {name: projection.mean() for name, projection in named.items()}
    finite = torch.cat([mean[torch.isfinite(mean)] for mean in means.values()])
    low = float(finite.min()) if finite.numel() else 0.0
    high = float(finite.max()) if finite.numel() else 1.0
    titles = list(named)
    if difference:
        titles.append(f"{titles[1]} - {titles[0]}")
    figure = make_subplots(
        rows=1,
        cols=len(titles),
        subplot_titles=[t or "projection" for t in titles],
        horizontal_spacing=0.06,
    )
    for column, (name, mean) in enumerate(means.items(), start=1):
        figure.add_trace(_heatmap(named[name], mean, "coloraxis", name), row=1, col=column)
    layout: dict[str, object] = {
        "coloraxis": {
            "colorscale": "Viridis",
            "cmin": low,
            "cmax": high,
            "colorbar": {"title": "projection", "x": 1.02, "len": 0.9, "thickness": 12},
        }
    }
    if difference:
        first, second = list(named.values())
        if first.positions != second.positions:
            raise ConfigError("the two panels have different positions: use equal settings")
        delta = means[titles[1]] - means[titles[0]]
        finite_delta = delta[torch.isfinite(delta)]
        bound = float(finite_delta.abs().max()) if finite_delta.numel() else 0.0
        figure.add_trace(_heatmap(first, delta, "coloraxis2", titles[-1]), row=1, col=len(titles))
        layout["coloraxis2"] = {
            "colorscale": "RdBu_r",
            "cmin": -(bound or 1.0),
            "cmax": bound or 1.0,
            "colorbar": {"title": "difference", "x": 1.12, "len": 0.9, "thickness": 12},
        }
    n_layers = max(len(projection.layers) for projection in named.values())
    for column in range(1, len(titles) + 1):
        figure.add_vline(
            x=-0.5, line={"dash": "dot", "color": "white", "width": 2}, row=1, col=column
        )
        figure.update_xaxes(title_text="position (0 = first generated)", row=1, col=column)
        figure.update_yaxes(row=1, col=column, **integer_ticks(n_layers))
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_layout(title=title, template=TEMPLATE, height=460, **layout)
    return figure


def _heatmap(
    projection: GenerationProjections, mean: Tensor, coloraxis: str, name: str
) -> go.Heatmap:
    z = [[None if value != value else value for value in row] for row in mean.T.tolist()]
    return go.Heatmap(
        z=z,
        x=list(projection.positions),
        y=list(projection.layers),
        coloraxis=coloraxis,
        name=name,
        hovertemplate="position %{x}<br>layer %{y}<br>%{z:.3f}<extra></extra>",
    )
