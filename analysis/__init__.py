"""Plots and mechanistic analyses of refusal and honesty directions.

``analysis`` depends on ``refusal_dir``, never the reverse, and is the only place that imports
plotly. Each module separates computation (numbers and dataclasses, tested) from plotting
(data in, ``plotly.graph_objects.Figure`` out):

* :mod:`analysis.layers`: separation accuracy and AUROC per layer;
* :mod:`analysis.pca`: PCA of activations per layer, projection histograms;
* :mod:`analysis.heatmap`: projection of every position's residual stream onto a direction during
  generation (prompt and generated tokens), steered against unsteered;
* :mod:`analysis.geometry`: cosines across layers, methods and behaviours; a direction's logit lens;
* :mod:`analysis.mechanistic`: the checks of Cheng, Wiegreffe & Manocha (2026): frozen attention
  patterns, sparsified steering vectors, top-coordinate overlap, per-head attribution.
"""

from __future__ import annotations

from analysis.geometry import (
    CosineMatrix,
    LogitLensTokens,
    TokenScore,
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
    GenerationProjections,
    compare_generation_projections,
    generation_heatmap_figure,
    generation_projections,
)
from analysis.layers import ScoreCurve, score_curves, separation_figure
from analysis.mechanistic import (
    CoordinateOverlap,
    FrozenAttentionResult,
    HeadAttribution,
    SparsificationResult,
    coordinate_overlap_figure,
    frozen_attention_effect,
    frozen_attention_figure,
    head_attribution,
    head_attribution_figure,
    important_coordinate_overlap,
    refusal_token_metric,
    sparsification_figure,
    sparsified_effect,
    sparsify,
    token_logprob_metric,
)
from analysis.pca import (
    LayerProjections,
    PCAProjection,
    layer_projections,
    pca_projection,
    pca_projections,
    pca_scatter_figure,
    projection_histogram_figure,
)

__all__ = [
    "CoordinateOverlap",
    "CosineMatrix",
    "FrozenAttentionResult",
    "GenerationProjections",
    "HeadAttribution",
    "LayerProjections",
    "LogitLensTokens",
    "PCAProjection",
    "ScoreCurve",
    "SparsificationResult",
    "TokenScore",
    "compare_generation_projections",
    "coordinate_overlap_figure",
    "cosine_across_layers",
    "cosine_across_methods",
    "cosine_between",
    "cosine_between_figure",
    "cosine_layers_figure",
    "cosine_methods_figure",
    "direction_logit_lens",
    "frozen_attention_effect",
    "frozen_attention_figure",
    "generation_heatmap_figure",
    "generation_projections",
    "head_attribution",
    "head_attribution_figure",
    "important_coordinate_overlap",
    "layer_projections",
    "logit_lens_figure",
    "pca_projection",
    "pca_projections",
    "pca_scatter_figure",
    "projection_histogram_figure",
    "refusal_token_metric",
    "score_curves",
    "separation_figure",
    "sparsification_figure",
    "sparsified_effect",
    "sparsify",
    "token_logprob_metric",
]
