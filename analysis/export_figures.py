"""Export the main figures as HTML (always) and PNG (when ``kaleido`` is installed).

    python -m analysis.export_figures --model gemma-3-270m-offline --output-dir docs/figures

Extracts refusal directions (mean difference at the last prompt token, ``resid_pre``) from the
shipped refusal pairs, scores and selects a layer, and writes one file per figure: layer
separation, PCA scatter, projection histograms, cosines across layers and methods, refusal vs
honesty, the direction's logit lens, the generation heatmap (steered against unsteered),
frozen attention patterns, sparsified vectors, top-coordinate overlap and per-head attribution.

HTML files load plotly.js from its CDN unless ``--self-contained`` (about 4.5 MB each).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
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
from analysis.heatmap import compare_generation_projections, generation_heatmap_figure
from analysis.layers import separation_figure
from analysis.mechanistic import (
    coordinate_overlap_figure,
    frozen_attention_effect,
    frozen_attention_figure,
    head_attribution,
    head_attribution_figure,
    important_coordinate_overlap,
    sparsification_figure,
    sparsified_effect,
)
from analysis.pca import pca_projections, pca_scatter_figure, projection_histogram_figure
from refusal_dir import (
    DEFAULT_MODEL,
    OFFLINE_MODEL,
    Activations,
    HookedModel,
    ablation,
    addition,
    collect_activations,
    compute_directions,
    load_model,
    score_layers,
    select_layer,
)
from refusal_dir.errors import OutputDirError, RefusalDirError
from refusal_dir.prompts import honesty_pairs, refusal_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSettings:
    """How many prompts and tokens the figures use, and the steering coefficient."""

    n_prompts: int = 32
    max_new_tokens: int = 16
    alpha: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_prompts < 4:
            raise ValueError(f"n_prompts must be >= 4, got {self.n_prompts}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _spread(n_layers: int, selected: int, count: int = 4) -> list[int]:
    """About ``count`` layers spread over layers 1..n-1 (layer 0 is often degenerate), plus
    ``selected``."""
    top = max(n_layers - 1, 0)
    return sorted({round(index * top / count) for index in range(1, count + 1)} | {selected})


def build_figures(
    model: HookedModel, settings: ExportSettings | None = None
) -> dict[str, go.Figure]:
    """Compute everything and return the figures by file stem."""
    settings = settings or ExportSettings()
    train, held_out = refusal_pairs().split(0.7, seed=settings.seed)
    n = settings.n_prompts
    harmful, harmless = train.positives[:n], train.negatives[:n]
    held_harmful, held_harmless = held_out.positives[:n], held_out.negatives[:n]

    def collect(prompts: list[str]) -> Activations:
        return collect_activations(model, prompts, batch_size=settings.batch_size, progress=False)

    acts_harmful, acts_harmless = collect(harmful), collect(harmless)
    held_pos, held_neg = collect(held_harmful), collect(held_harmless)
    methods = {
        method: compute_directions(acts_harmful, acts_harmless, method=method, model=model)
        for method in ("mean_diff", "pca", "probe")
    }
    directions = methods["mean_diff"]
    scores = {
        site: score_layers(
            compute_directions(acts_harmful, acts_harmless, site=site, model=model),
            held_pos,
            held_neg,
        )
        for site in ("resid_pre", "resid_post")
    }
    best = select_layer(scores["resid_pre"], n_layers=model.n_layers)
    layer = best.layer
    logger.info("selected layer %d (separation %.3f)", layer, best.separation_accuracy)
    shown = _spread(model.n_layers, layer)

    honest = honesty_pairs()
    honest_pos, honest_neg = collect(honest.positives[:n]), collect(honest.negatives[:n])
    honesty = compute_directions(honest_pos, honest_neg, model=model, name="honesty")

    steer = addition(directions, layer=layer, alpha=settings.alpha, apply_to="prompt")
    figures: dict[str, go.Figure] = {
        "separation": separation_figure(scores, selected=best),
        "pca_scatter": pca_scatter_figure(
            pca_projections(acts_harmful, acts_harmless, layers=shown, site="resid_pre"),
            labels=("harmful", "harmless"),
        ),
        "projection_histograms": projection_histogram_figure(
            directions,
            held_pos,
            held_neg,
            layers=shown,
            site="resid_pre",
            labels=("harmful", "harmless"),
        ),
        "cosine_layers": cosine_layers_figure(cosine_across_layers(directions)),
        "cosine_methods": cosine_methods_figure(
            cosine_across_methods(methods, layer), title=f"Cosine between methods, layer {layer}"
        ),
        "refusal_vs_honesty": cosine_between_figure(
            {"refusal vs honesty": cosine_between(directions, honesty)}
        ),
        "logit_lens": logit_lens_figure(
            direction_logit_lens(model, directions.unit(layer), k=10),
            title=f"Tokens promoted and suppressed by the layer-{layer} refusal direction",
        ),
        "generation_heatmap": generation_heatmap_figure(
            compare_generation_projections(
                model,
                held_harmless[: max(4, n // 2)],
                directions,
                layer=layer,
                interventions=[steer],
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
            ),
            difference=True,
            title=f"Projection on the layer-{layer} direction, harmless prompts",
        ),
        "frozen_attention": frozen_attention_figure(
            {
                f"add on harmless (x{settings.alpha:g})": frozen_attention_effect(
                    model, held_harmless, steer, batch_size=settings.batch_size
                ),
                "ablate on harmful": frozen_attention_effect(
                    model,
                    held_harmful,
                    ablation(directions, layer=layer),
                    batch_size=settings.batch_size,
                ),
            }
        ),
        "sparsification": sparsification_figure(
            sparsified_effect(
                model,
                held_harmless,
                directions.vector(layer) * settings.alpha,
                layer=layer,
                apply_to="prompt",
                batch_size=settings.batch_size,
            )
        ),
        "coordinate_overlap": coordinate_overlap_figure(
            important_coordinate_overlap(
                {name: found.unit(layer) for name, found in methods.items()},
                k=max(1, model.d_model // 20),
            )
        ),
        "head_attribution": head_attribution_figure(
            head_attribution(
                model, held_harmful, directions.unit(layer), batch_size=settings.batch_size
            )
        ),
    }
    return figures


def kaleido_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def write_figures(
    figures: dict[str, go.Figure],
    output_dir: str | Path,
    *,
    png: bool | None = None,
    self_contained: bool = False,
) -> list[Path]:
    """Write ``<stem>.html`` for every figure (and ``<stem>.png`` when kaleido is there).

    ``png=None`` writes PNGs only if kaleido is installed; a PNG that fails to render is logged
    and skipped. Each file is written to a temporary name and renamed.
    """
    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(
            f"cannot create {directory} ({error.strerror or error}): choose a writable --output-dir"
        ) from error
    want_png = kaleido_available() if png is None else png
    written = []
    for stem, figure in figures.items():
        target = directory / f"{stem}.html"
        _atomic(
            target,
            lambda path, fig=figure: fig.write_html(
                path, include_plotlyjs=True if self_contained else "cdn", full_html=True
            ),
        )
        written.append(target)
        if want_png:
            image = directory / f"{stem}.png"
            try:
                _atomic(
                    image, lambda path, fig=figure: fig.write_image(path, format="png", scale=2)
                )
                written.append(image)
            except Exception as error:  # kaleido needs a browser; no PNG is not fatal
                logger.warning("could not write %s (%s): HTML only", image.name, error)
    return written


def _atomic(target: Path, write: object) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=target.suffix + ".tmp")
    os.close(handle)
    try:
        write(temporary)  # type: ignore[operator]
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; figures are for sharing
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default_model = DEFAULT_MODEL if torch.cuda.is_available() else OFFLINE_MODEL
    parser = argparse.ArgumentParser(
        prog="python -m analysis.export_figures",
        description="Export the main figures as HTML (always) and PNG (when kaleido is installed).",
    )
    parser.add_argument(
        "--model", default=default_model, help=f"hub id, directory or {OFFLINE_MODEL}"
    )
    parser.add_argument("--output-dir", default="docs/figures", help="where to write the files")
    parser.add_argument("--n-prompts", type=int, default=32, help="prompts per set (>= 4)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens for the heatmap")
    parser.add_argument("--alpha", type=float, default=1.0, help="steering coefficient (raw units)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--png",
        choices=("auto", "yes", "no"),
        default="auto",
        help="PNG via kaleido: auto (if installed), yes, no",
    )
    parser.add_argument(
        "--self-contained",
        action="store_true",
        help="embed plotly.js in every HTML file instead of loading it from the CDN",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = ExportSettings(
            n_prompts=arguments.n_prompts,
            max_new_tokens=arguments.max_new_tokens,
            alpha=arguments.alpha,
            batch_size=arguments.batch_size,
        )
        model = load_model(arguments.model, device=arguments.device, dtype=arguments.dtype)
        figures = build_figures(model, settings)
        png = {"auto": None, "yes": True, "no": False}[arguments.png]
        written = write_figures(
            figures, arguments.output_dir, png=png, self_contained=arguments.self_contained
        )
    except (RefusalDirError, ValueError) as error:
        logger.error("error: %s", error)
        return 2
    for path in written:
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
