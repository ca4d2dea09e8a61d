"""refusal_dir: find refusal and honesty directions, steer or ablate them, measure the cost.

Importing this package never imports plotly; plots live in the separate ``analysis`` package.
"""

from __future__ import annotations

__version__ = "0.1.0"

from refusal_dir.activations import Activations, collect_activations
from refusal_dir.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    register_architecture,
)
from refusal_dir.directions import METHODS, DirectionSet, compute_directions
from refusal_dir.errors import (
    ConfigError,
    DataError,
    DirectionMismatchError,
    ModelLoadError,
    OutputDirError,
    RefusalDirError,
    UnsupportedArchitectureError,
)
from refusal_dir.generation import (
    GenerationSettings,
    continuation_logprobs,
    generate,
    generate_tokens,
    next_token_logits,
)
from refusal_dir.interventions import (
    Intervention,
    PositionState,
    ablation,
    addition,
    bridge_hooks,
    clamp,
    steer,
)
from refusal_dir.model import DEFAULT_MODEL, OFFLINE_MODEL, HookedModel, load_model
from refusal_dir.orthogonalize import orthogonalized_copy, save_orthogonalized
from refusal_dir.selection import LayerScore, score_layers, select_layer
from refusal_dir.sites import hook_name
from refusal_dir.steer import PromptInstructions, Steer
from refusal_dir.store import StoredActivations, collect_to_store, read_store
from refusal_dir.subspace import Subspace, build_subspace
from refusal_dir.sweep import SweepOptions, SweepResult, sweep

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "METHODS",
    "OFFLINE_MODEL",
    "Activations",
    "Architecture",
    "ConfigError",
    "DataError",
    "DirectionMismatchError",
    "DirectionSet",
    "GenerationSettings",
    "HookedModel",
    "Intervention",
    "PositionState",
    "PromptInstructions",
    "Steer",
    "Subspace",
    "SweepOptions",
    "SweepResult",
    "LayerScore",
    "ModelLoadError",
    "OutputDirError",
    "RefusalDirError",
    "UnsupportedArchitectureError",
    "__version__",
    "ablation",
    "addition",
    "architecture_of",
    "bridge_hooks",
    "build_subspace",
    "clamp",
    "collect_activations",
    "collect_to_store",
    "read_store",
    "StoredActivations",
    "compute_directions",
    "continuation_logprobs",
    "generate",
    "generate_tokens",
    "hook_name",
    "load_model",
    "next_token_logits",
    "register_architecture",
    "orthogonalized_copy",
    "save_orthogonalized",
    "score_layers",
    "select_layer",
    "steer",
    "sweep",
]
