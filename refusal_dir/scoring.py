"""Deprecated: moved to :mod:`refusal_dir.selection` (this module goes in the next release)."""

from __future__ import annotations

import warnings

from refusal_dir import selection

__all__ = ["LayerScore", "format_score_table", "score_layers", "select_layer", "separation_accuracy"]  # noqa: F822 (read through __getattr__)
warnings.warn(f"{__name__} is deprecated: import from refusal_dir.selection", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(selection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
