"""What refusal_dir knows about model architectures, declared once per family.

Each supported family is one :class:`Architecture` entry in :data:`ARCHITECTURES`, keyed by the
``model_type`` of its ``transformers`` config (in the spirit of TransformerLens'
``supported_architectures/``). An entry says where the decoder blocks are; which module of a
block writes the attention output and which the MLP output into the residual stream, and which
weights ("writers") produce those writes (for a mixture-of-experts MLP: every expert's down
projection and the shared expert's); which norms are applied to those writes before they reach
the stream (post-norms); and how a norm's stored weight becomes its gain. The rest of the package
asks :func:`architecture_of` and never inspects module structure itself.

Two conventions an entry must get right, because the same names mean different things:

* Post-norms. Gemma-2/3 normalize what each sub-block writes (``post_attention_layernorm``,
  ``post_feedforward_layernorm``) before adding it to the stream. In Llama, Mistral, Qwen and
  Phi-3, ``post_attention_layernorm`` is the norm of the MLP's *input* (a pre-norm): it is not
  a post-norm and must not be declared as one.
* Norm gain. Gemma's RMSNorm multiplies by ``1 + w`` (``norm_gain_offset=1``); the others by
  ``w`` (``norm_gain_offset=0``).

There is no structural fallback for an unregistered family: guessing from module names would
read Llama's pre-MLP norm as a post-norm, and weight orthogonalization would then silently bake
in the wrong edit. A model of an unknown family is refused by :func:`architecture_of` with an
error that names its ``model_type`` and says how to add it.

Adding a family: write its entry (copy the closest one) and pass it to
:func:`register_architecture` (or add it to :data:`ARCHITECTURES` here), then add a tiny config
to ``refusal_dir.testing.make_tiny_model`` so that ``tests/unit/test_families.py`` checks it:
planted-direction recovery, zero projection after ablation, runtime ablation == orthogonalized
weights, bridge hooks == fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from refusal_dir.errors import UnsupportedArchitectureError
from refusal_dir.placement import onloaded

WriteKind = Literal["attn", "mlp"]
#: The two writes of a block into the residual stream, in the order the block makes them.
WRITE_KINDS: tuple[WriteKind, ...] = ("attn", "mlp")

_HOW_TO_ADD = (
    "add an Architecture entry for it with refusal_dir.architectures.register_architecture "
    "(see the module docstring and the README section 'Supported model families')"
)


@dataclass(frozen=True)
class Writer:
    """A weight whose output is (part of) one write of a block into the residual stream.

    ``weight`` has the ``d_model`` output axis second to last: ``d_model x d_in`` for an
    ``nn.Linear``, ``n_experts x d_model x d_expert`` for the stacked experts of a sparse MLP.
    ``path`` is where it lives inside the block (for error messages).
    """

    path: str
    weight: Tensor
    bias: Tensor | None = None


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its blocks, writers and norms.

    Paths are dotted attribute paths: ``layers_path`` and ``final_norm_path`` from the
    ``transformers`` causal LM, every other path from one decoder block.

    * ``attention``/``mlp``: the modules whose outputs are the block's two writes *before* any
      post-norm; each output must be a sum of its writers' outputs, each scaled by at most a
      per-token number (the router weight of an expert, the sigmoid gate of a shared expert).
    * ``attention_writers``/``mlp_writers``: those writers (an ``nn.Linear`` or a stacked
      experts parameter). ``mlp_writers`` are a dense block's; in a family with ``experts``, a
      block that has that module is sparse and its MLP writers are ``expert_writers``.
    * ``post_attention_norm``/``post_mlp_norm``: norms applied to the writes before they reach
      the stream (Gemma-2/3 only), or ``None``.
    * ``norm_class``/``norm_gain_offset``: the family's RMSNorm class name, and the gain
      convention: ``gain = norm_gain_offset + weight``.
    """

    model_type: str
    family: str
    norm_class: str
    norm_gain_offset: float = 0.0
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_writers: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_writers: tuple[str, ...] = ("mlp.down_proj",)
    experts: str | None = None
    expert_writers: tuple[str, ...] = ()
    post_attention_norm: str | None = None
    post_mlp_norm: str | None = None

    def __post_init__(self) -> None:
        if (self.post_attention_norm is None) != (self.post_mlp_norm is None):
            raise ValueError(
                f"{self.model_type}: declare both post_attention_norm and post_mlp_norm, or neither"
            )
        if (self.experts is None) != (not self.expert_writers):
            raise ValueError(
                f"{self.model_type}: a sparse family declares both experts and expert_writers"
            )
        if not self.attention_writers or not self.mlp_writers:
            raise ValueError(f"{self.model_type}: declare the attention and MLP writers")
        if self.norm_gain_offset not in (0.0, 1.0):
            raise ValueError(f"{self.model_type}: norm_gain_offset must be 0.0 or 1.0")

    # -- the whole model -----------------------------------------------------------------
    @property
    def has_post_norms(self) -> bool:
        """Whether blocks normalize their writes before adding them to the stream (Gemma-2/3)."""
        return self.post_attention_norm is not None

    @property
    def is_mixture_of_experts(self) -> bool:
        return self.experts is not None

    def layers(self, hf_model: nn.Module) -> nn.ModuleList:
        """The list of decoder blocks."""
        layers = self._module(hf_model, self.layers_path, "the decoder-layer list")
        if not isinstance(layers, nn.ModuleList):
            raise self._mismatch(self.layers_path, "the decoder-layer list", layers)
        return layers

    def final_norm(self, hf_model: nn.Module) -> nn.Module:
        """The norm between the last block and the unembedding."""
        return self._module(hf_model, self.final_norm_path, "the final norm")

    def embedding(self, hf_model: Any) -> nn.Embedding:
        """The token embedding (what writes the stream before the first block)."""
        embedding = hf_model.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding):
            raise self._mismatch("get_input_embeddings()", "an nn.Embedding", embedding)
        return embedding

    def embeddings_tied(self, hf_model: Any) -> bool:
        """Whether the unembedding is the same parameter as the embedding (per checkpoint)."""
        output = hf_model.get_output_embeddings()
        return output is not None and output.weight is self.embedding(hf_model).weight

    # -- one block -------------------------------------------------------------------------
    def block_output(self, block: nn.Module, kind: WriteKind) -> nn.Module:
        """The module whose output is the block's ``kind`` write before any post-norm."""
        path = self.attention if _check_kind(kind) == "attn" else self.mlp
        return self._module(block, path, f"the {kind} module")

    def post_norm(self, block: nn.Module, kind: WriteKind) -> nn.Module | None:
        """The norm applied to the ``kind`` write before it reaches the stream, or ``None``."""
        path = self.post_attention_norm if _check_kind(kind) == "attn" else self.post_mlp_norm
        return None if path is None else self._module(block, path, f"the {kind} post-norm")

    def stream_write(self, block: nn.Module, kind: WriteKind) -> nn.Module:
        """The module whose output is added to the stream: TransformerLens' ``attn_out``/``mlp_out``."""
        post_norm = self.post_norm(block, kind)
        return self.block_output(block, kind) if post_norm is None else post_norm

    def is_sparse(self, block: nn.Module) -> bool:
        """Whether this block's MLP is a mixture of experts (MoE families may mix in dense ones)."""
        return self.experts is not None and _find(block, self.experts) is not None

    def writers(self, block: nn.Module, kind: WriteKind) -> tuple[Writer, ...]:
        """Every weight that produces the block's ``kind`` write (all experts of a sparse MLP)."""
        if _check_kind(kind) == "attn":
            paths = self.attention_writers
        else:
            paths = self.expert_writers if self.is_sparse(block) else self.mlp_writers
        return tuple(self._writer(block, path) for path in paths)

    def norm_gain(self, norm: nn.Module) -> Tensor:
        """The elementwise gain of one of this family's RMSNorms, as float32."""
        if type(norm).__name__ != self.norm_class:
            raise UnsupportedArchitectureError(
                f"{type(norm).__name__} is not {self.family}'s norm ({self.norm_class}), so its "
                f"gain convention is unknown: fix the {self.model_type!r} entry in "
                "refusal_dir.architectures"
            )
        with onloaded(norm):  # an offloaded norm keeps its weight on "meta" between passes
            weight = norm.get_parameter("weight").detach().float().clone()
        return self.norm_gain_offset + weight if self.norm_gain_offset else weight

    # -- lookups -----------------------------------------------------------------------------
    def _module(self, root: nn.Module, path: str, what: str) -> nn.Module:
        found = _find(root, path)
        if not isinstance(found, nn.Module):
            raise self._mismatch(path, what, found, root)
        return found

    def _writer(self, block: nn.Module, path: str) -> Writer:
        found = _find(block, path)
        if isinstance(found, nn.Linear):
            return Writer(path, found.weight, found.bias)
        if isinstance(found, nn.Parameter) and found.ndim == 3:
            return Writer(path, found)
        raise self._mismatch(path, "an output writer (nn.Linear or stacked experts)", found, block)

    def _mismatch(
        self, path: str, what: str, found: Any, root: nn.Module | None = None
    ) -> UnsupportedArchitectureError:
        where = f" in {type(root).__name__}" if root is not None else ""
        got = "nothing" if found is None else type(found).__name__
        return UnsupportedArchitectureError(
            f"the {self.family} ({self.model_type!r}) entry declares {what} at {path!r}, but "
            f"found {got}{where}: this model's structure differs from the registered one; fix "
            "or replace its entry with refusal_dir.architectures.register_architecture"
        )


def _check_kind(kind: str) -> str:
    if kind not in WRITE_KINDS:
        raise ValueError(f"unknown write {kind!r}: choose one of {', '.join(WRITE_KINDS)}")
    return kind


def _find(root: nn.Module, path: str) -> Any:
    """The attribute at a dotted path, or ``None`` (the one place that looks structure up)."""
    found: Any = root
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Architecture] = {
    spec.model_type: spec
    for spec in (
        Architecture(
            "gemma2",
            "Gemma 2",
            "Gemma2RMSNorm",
            norm_gain_offset=1.0,
            post_attention_norm="post_attention_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        ),
        Architecture(
            "gemma3_text",
            "Gemma 3",
            "Gemma3RMSNorm",
            norm_gain_offset=1.0,
            post_attention_norm="post_attention_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        ),
        Architecture(
            "gemma3",
            "Gemma 3 (image-text)",
            "Gemma3RMSNorm",
            norm_gain_offset=1.0,
            layers_path="model.language_model.layers",
            final_norm_path="model.language_model.norm",
            post_attention_norm="post_attention_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        ),
        Architecture("llama", "Llama", "LlamaRMSNorm"),
        Architecture("mistral", "Mistral", "MistralRMSNorm"),
        Architecture(
            "mixtral",
            "Mixtral",
            "MixtralRMSNorm",
            experts="mlp.experts",
            expert_writers=("mlp.experts.down_proj",),
        ),
        Architecture("phi3", "Phi-3", "Phi3RMSNorm"),
        Architecture("qwen2", "Qwen2", "Qwen2RMSNorm"),
        Architecture(
            "qwen2_moe",
            "Qwen2-MoE",
            "Qwen2MoeRMSNorm",
            experts="mlp.experts",
            # The shared expert's output, scaled by its sigmoid gate, is added to the experts'.
            expert_writers=("mlp.experts.down_proj", "mlp.shared_expert.down_proj"),
        ),
        Architecture("qwen3", "Qwen3", "Qwen3RMSNorm"),
        Architecture(
            "qwen3_moe",
            "Qwen3-MoE",
            "Qwen3MoeRMSNorm",
            experts="mlp.experts",
            expert_writers=("mlp.experts.down_proj",),
        ),
    )
}


def register_architecture(spec: Architecture, *, replace: bool = False) -> Architecture:
    """Add a family to :data:`ARCHITECTURES` (``replace=True`` overrides a registered one)."""
    if spec.model_type in ARCHITECTURES and not replace:
        raise ValueError(
            f"{spec.model_type!r} is already registered: pass replace=True to override it"
        )
    ARCHITECTURES[spec.model_type] = spec
    return spec


def architecture_for(model_type: str) -> Architecture:
    """The registered entry of a ``model_type``; an unknown one raises with how to add it."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not a supported architecture (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}): {_HOW_TO_ADD}"
        )
    return spec


def architecture_of(hf_model: Any) -> Architecture:
    """The entry of a ``transformers`` causal LM, from its config's ``model_type``."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} has no config.model_type: refusal_dir needs a "
            "transformers PreTrainedModel"
        )
    return architecture_for(str(model_type))


def norm_gain(norm: nn.Module) -> Tensor:
    """The gain of a norm module of any registered family, found by the norm's class."""
    for spec in ARCHITECTURES.values():
        if spec.norm_class == type(norm).__name__:
            return spec.norm_gain(norm)
    raise UnsupportedArchitectureError(
        f"{type(norm).__name__} is no registered family's norm, so its gain convention is "
        f"unknown: {_HOW_TO_ADD}"
    )
