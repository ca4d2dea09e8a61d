"""Names of the residual-stream sites and their TransformerLens hook points.

One way to name a site: ``hook_name("resid_pre", 12) == "blocks.12.hook_resid_pre"``.
Never build a hook string by hand elsewhere.

Conventions (the same as TransformerLens):

* ``resid_pre[l]`` is the residual stream entering block ``l``; ``resid_pre[0]`` is the
  (scaled) token embedding.
* ``resid_post[l]`` is the residual stream leaving block ``l``, so
  ``resid_post[l] == resid_pre[l + 1]`` for every ``l < n_layers - 1``.
* ``attn_out[l]`` and ``mlp_out[l]`` are what block ``l`` adds to the stream. On Gemma-2/3
  these are the outputs of the post-attention and post-feed-forward norms.
"""

from __future__ import annotations

from typing import Literal

from refusal_dir.errors import ConfigError

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
RESIDUAL_SITES: tuple[str, ...] = ("resid_pre", "resid_post")
ALL_SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def check_site(site: str, *, allowed: tuple[str, ...] = RESIDUAL_SITES) -> str:
    """Return ``site`` if it is one of ``allowed``; otherwise raise a ConfigError listing them."""
    if site not in allowed:
        raise ConfigError(f"unknown site {site!r}: choose one of {', '.join(allowed)}")
    return site


def check_layer(layer: int, n_layers: int) -> int:
    """Return ``layer`` if ``0 <= layer < n_layers``; otherwise raise a ConfigError."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ConfigError(
            f"layer {layer!r} is out of range: this model has layers 0..{n_layers - 1}"
        )
    return layer


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens hook name of ``site`` at ``layer``."""
    check_site(site, allowed=ALL_SITES)
    return f"blocks.{layer}.hook_{site}"
