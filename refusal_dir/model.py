"""Load a chat model as a hooked model, and format and tokenize prompts for it.

A :class:`HookedModel` holds two views of one set of weights:

* ``bridge``: a TransformerLens ``TransformerBridge`` (the successor of ``HookedTransformer``),
  for users who want hook names, ``run_with_cache``, ``hooks(...)`` and the analysis tools of
  ``transformer_lens.tools.analysis``; booted on first use of ``model.bridge``;
* ``hf``: the plain ``transformers`` model, sharing every parameter with the bridge (no copy),
  which this package's own caching and generation drive through PyTorch hooks placed at exactly
  the bridge's hook points (tested equal). It skips the bridge's per-component Python overhead
  and, when caching, stops the forward pass after the last layer it needs, so it never computes
  the unembedding.

Never call ``bridge.enable_compatibility_mode()`` or ``bridge.process_weights()`` on a
HookedModel: they fold weights in place, and ``hf`` shares those weights.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from refusal_dir import offline, placement
from refusal_dir.architectures import Architecture, architecture_of
from refusal_dir.chat import (
    PLAIN_CHAT_TEMPLATE,
    ChatFormat,
    FormattedPrompt,
)
from refusal_dir.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "google/gemma-2-2b-it"
OFFLINE_MODEL = "gemma-3-270m-offline"
"""The small offline base model the tests use."""
OFFLINE_INSTRUCT_MODEL = "qwen2.5-coder-0.5b-instruct-offline"
"""The offline instruction model (refuses; the main job's default)."""

_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def cache_root() -> Path:
    """Where converted models are cached: ``$REFUSAL_DIR_CACHE`` or the user cache dir."""
    env = os.environ.get("REFUSAL_DIR_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("refusal_dir"))


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Turn ``"bfloat16"``/``"float32"``/``"float16"``/``None``/a dtype into a torch dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def offline_model_dir(cache: Path | None = None, name: str = OFFLINE_MODEL) -> Path:
    """Directory that holds (or will hold) the converted offline model ``name``."""
    return offline.offline_model_dir(name, cache or cache_root())


def ensure_offline_model(cache: Path | None = None, name: str = OFFLINE_MODEL) -> Path:
    """Convert the packaged GGUF of offline model ``name`` to safetensors, once (:mod:`offline`)."""
    return offline.ensure_offline_model(name, cache or cache_root())


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def names_local_path(name_or_path: str) -> bool:
    """Whether :func:`resolve_model_source` takes ``name_or_path`` as a local directory rather
    than a hub id or an offline model's name (which wins over a folder of the same name)."""
    if name_or_path in offline.OFFLINE_MODELS:
        return False
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))


def resolve_model_source(name_or_path: str, *, cache: Path | None = None) -> str:
    """Map a model id to what ``from_pretrained`` takes, checking local directories."""
    if name_or_path in offline.OFFLINE_MODELS:
        return str(ensure_offline_model(cache, name_or_path))
    path = Path(name_or_path).expanduser()
    if names_local_path(name_or_path):
        if not path.is_dir():
            raise ModelLoadError(
                f"{name_or_path!r} is not a directory: pass a model directory holding "
                f"config.json, a hub id such as {DEFAULT_MODEL!r}, or {OFFLINE_MODEL!r}"
            )
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{name_or_path!r} is not a model directory (no config.json): pass a directory "
                f"written by save_pretrained, a hub id, or {OFFLINE_MODEL!r}"
            )
        return str(path)
    return name_or_path


def _load_hf_model(
    source: str,
    *,
    dtype: torch.dtype,
    device: str,
    revision: str | None,
    placement: dict[str, Any] | None = None,
    quantization_config: Any | None = None,
) -> tuple[Any, Any]:
    """Tokenizer and model. ``placement`` (:func:`placement.check_placement`) and
    ``quantization_config`` go to ``from_pretrained``, which then places the modules itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = dict(placement or {})
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
        extra.setdefault("device_map", {"": device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=revision, **extra)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ModelLoadError(
            f"cannot load model {source!r} ({first_line[:200]}): check the id or path; without "
            f"hub access use a local model directory or {OFFLINE_MODEL!r}"
        ) from error
    if "device_map" not in extra:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


@dataclass(frozen=True)
class TokenBatch:
    """Left-padded token ids with their attention mask."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


def pad_ids(
    rows: Sequence[Sequence[int]],
    pad_value: int,
    *,
    width: int | None = None,
    side: Literal["left", "right"] = "left",
) -> tuple[Int[Tensor, "rows width"], Int[Tensor, "rows width"]]:
    """Token id rows padded with ``pad_value`` to ``width`` (default: the longest row), and the
    attention mask (1 on the given ids). Left padding for prompts, so every row ends at the
    same position; right padding for what follows an already padded prompt."""
    width = max((len(ids) for ids in rows), default=0) if width is None else width
    input_ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if len(ids) > width:
            raise ValueError(f"row {row} has {len(ids)} ids, more than the width {width}")
        where = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, where] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, where] = 1
    return input_ids, attention_mask


class HookedModel:
    """A chat model with a TransformerLens bridge and a fast plain-``transformers`` view."""

    def __init__(
        self,
        *,
        hf: Any,
        tokenizer: Any,
        model_id: str,
        revision: str | None,
        bridge: Any | None = None,
        boot_bridge: Callable[[], Any] | None = None,
        device: str,
        dtype: torch.dtype,
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
    ) -> None:
        self.hf = hf
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self._bridge = bridge
        self._bridge_factory = boot_bridge
        #: Where this model's family keeps its blocks, writers and norms.
        self.architecture: Architecture = architecture_of(hf)
        self.layers = self.architecture.layers(hf)
        self.uses_plain_template = not getattr(tokenizer, "chat_template", None)
        self.chat_template: str = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
        self.chat = ChatFormat(
            tokenizer,
            self.chat_template,
            system_prompt=system_prompt,
            enable_thinking=enable_thinking,
            name=repr(model_id),
        )
        self._stop_ids: list[int] | None = None

    # -- shape -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.hf.config.get_text_config().hidden_size)

    @property
    def bridge(self) -> Any:
        """The TransformerLens ``TransformerBridge`` over the same weights.

        Booted on first access (about 280 MiB and a few seconds on Gemma 3 270M), so code that
        only uses the fast path never pays for it.
        """
        if self._bridge is None and self._bridge_factory is not None:
            self._bridge = self._bridge_factory()
            self._bridge_factory = None
        if self._bridge is None:
            raise ConfigError(
                "this HookedModel was loaded with with_bridge=False: reload it with "
                "load_model(..., with_bridge=True) to use TransformerLens hooks"
            )
        return self._bridge

    # -- chat formatting ---------------------------------------------------------------------
    @property
    def system_prompt(self) -> str | None:
        """System prompt of every formatted prompt (``None``: no system message).

        Setting it checks that the chat template has a system role (:class:`ConfigError` if
        not: Gemma 2's template, for one, raises "System role not supported").
        """
        return self.chat.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        self.chat = self._chat_format(system_prompt=value, enable_thinking=self.enable_thinking)

    @property
    def enable_thinking(self) -> bool | None:
        """Passed to chat templates that read it (Qwen3's); ``None`` keeps the template's default.

        Setting it on a template that never reads ``enable_thinking`` raises
        :class:`ConfigError`.
        """
        return self.chat.enable_thinking

    @enable_thinking.setter
    def enable_thinking(self, value: bool | None) -> None:
        self.chat = self._chat_format(system_prompt=self.system_prompt, enable_thinking=value)

    def _chat_format(self, *, system_prompt: str | None, enable_thinking: bool | None) -> ChatFormat:
        return ChatFormat(
            self.tokenizer,
            self.chat_template,
            system_prompt=system_prompt,
            enable_thinking=enable_thinking,
            name=repr(self.model_id),
        )

    def format_prompts(
        self, instructions: Sequence[str], *, system: str | None = None
    ) -> list[str]:
        """Wrap each instruction in the chat template as a user turn awaiting the reply.

        ``system`` (default: :attr:`system_prompt`) becomes the system message. The results
        are strings that remember where the instruction is, so :meth:`tokenize` encodes it as
        text: a ``"<bos>"`` typed in an instruction is five characters, not a BOS token.
        """
        if isinstance(instructions, str):
            raise ConfigError("format_prompts takes a list of instructions, not one string")
        return [self.chat.format(text, system=system) for text in instructions]

    def format_chat(self, instruction: str, response: str) -> FormattedPrompt:
        """A user turn followed by the start of an assistant reply ``response`` (both text)."""
        prompt = self.chat.format(instruction)
        end = len(prompt) + len(response)
        return FormattedPrompt(prompt + response, (*prompt.content_spans, (len(prompt), end)))

    @property
    def reply_prefix(self) -> str:
        """What the template puts before the reply's first word: ``""`` after a template that
        ends a line (Gemma's ``"model\\n"``), ``" "`` after the plain template's ``"Assistant:"``."""
        return self.chat.reply_prefix

    def reply_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` where it starts the reply, as they follow the template."""
        return self.chat.reply_token_ids(text)

    @property
    def _post_instruction_ids(self) -> list[int]:
        return self.chat.post_instruction_ids

    @property
    def n_post_instruction_tokens(self) -> int:
        """Tokens of the template after the instruction (Arditi et al.'s positions)."""
        return len(self._post_instruction_ids)

    # -- tokenization -------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.chat.encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: special-token strings in it stay characters."""
        return self.chat.encode_text(text)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad if pad is not None else 0)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenize already-formatted texts, left padded, adding no special tokens.

        Exactly the template's tokens reach the model: the template writes the BOS token (or,
        like Qwen's, none), and nothing is added. Texts from :meth:`format_prompts` keep the
        instruction as plain text; a plain string is encoded as written, its special-token
        text included (it counts as formatted by the caller).
        """
        return TokenBatch(*pad_ids(self.encode_prompts(texts), self.pad_token_id))

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of already-formatted texts, as :meth:`tokenize` takes them (unpadded);
        no texts, or one of zero tokens, is a one-line ConfigError."""
        if not texts:
            raise ConfigError("no prompts to tokenize: pass at least one prompt")
        encoded = [self._encode(text) for text in texts]
        if any(len(ids) == 0 for ids in encoded):
            raise ConfigError("a prompt tokenized to zero tokens: remove empty prompts")
        return encoded

    def encode_instructions(self, instructions: Sequence[str]) -> TokenBatch:
        """Format instructions with the chat template and tokenize them, left padded."""
        return self.tokenize(self.format_prompts(instructions))

    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn: EOS and the template's end-of-turn token."""
        if self._stop_ids is None:
            self._stop_ids = self._compute_stop_ids()
        return list(self._stop_ids)

    def _compute_stop_ids(self) -> list[int]:
        ids: list[int] = []
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            ids.append(int(eos))
        vocab = self.tokenizer.get_vocab()
        for token in _END_OF_TURN_TOKENS:
            if token in vocab and vocab[token] not in ids:
                ids.append(int(vocab[token]))
        generation_config = getattr(self.hf, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        for token_id in configured if isinstance(configured, list) else [configured]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
        return ids

    def __repr__(self) -> str:
        return (
            f"HookedModel({self.model_id!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"device={self.device!r}, dtype={self.dtype})"
        )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    with_bridge: bool = True,
    cache: Path | None = None,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    device_map: placement.DeviceMap | None = None,
    max_memory: str | placement.MaxMemory | None = None,
    offload_folder: str | Path | None = None,
    quantization: str | None = None,
) -> HookedModel:
    """Load a model by hub id, local directory, or ``"gemma-3-270m-offline"``.

    ``dtype`` defaults to bfloat16 on a GPU and float32 on the CPU. The bridge and the fast
    ``transformers`` view share their parameters; the bridge boots on first use of
    ``model.bridge`` (``with_bridge=False``: never). ``system_prompt`` and ``enable_thinking``
    are the chat settings of :class:`HookedModel` (both ``None``: the template's defaults).

    ``device_map`` (``"auto"``, another accelerate strategy, or a dict from module names to
    devices, ``"disk"`` included), ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}`` or
    ``"0=20GiB,cpu=60GiB"``) and ``offload_folder`` split the model over several devices with
    accelerate, instead of ``device``. ``quantization`` (``"8bit"``/``"4bit"``) loads the
    weights with bitsandbytes. All are checked before anything is loaded (docs/scaling.md).
    """
    where = placement.check_placement(
        device=device, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder
    )
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    quantized = placement.quantization_config(quantization, torch_dtype)
    source = resolve_model_source(name_or_path, cache=cache)
    hf, tokenizer = _load_hf_model(
        source, dtype=torch_dtype, device=device, revision=revision, placement=where,
        quantization_config=quantized,
    )
    if where or quantized is not None:
        device = placement.input_device(hf)
    _contiguous_unembedding_input(hf)

    def boot() -> Any:
        return _boot_bridge(source, hf, tokenizer, device=device, dtype=torch_dtype)

    return HookedModel(
        hf=hf,
        tokenizer=tokenizer,
        model_id=name_or_path if name_or_path in offline.OFFLINE_MODELS else _model_id(name_or_path),
        revision=revision or _commit_hash(hf),
        boot_bridge=boot if with_bridge else None,
        device=device,
        dtype=torch_dtype,
        system_prompt=system_prompt,
        enable_thinking=enable_thinking,
    )


def _contiguous_unembedding_input(hf: Any) -> None:
    """Give the unembedding a contiguous input.

    ``transformers`` slices the hidden states for ``logits_to_keep``, and a Linear on that
    non-contiguous slice is several times slower on the CPU (measured: 0.80 s instead of 0.15 s
    per call on Gemma 3 270M's 262k-token unembedding). Numbers are unchanged up to float
    rounding; see BENCHMARKS.md.
    """
    head = hf.get_output_embeddings()
    if head is None:
        return

    def make_contiguous(module: nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(), *args[1:]) if args else args

    make_contiguous.refusal_dir_contiguous = True  # type: ignore[attr-defined]  # lets bench/ find it
    head.register_forward_pre_hook(make_contiguous)


def _model_id(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _commit_hash(hf: Any) -> str | None:
    value = getattr(hf.config, "_commit_hash", None)
    return str(value) if value else None


@contextmanager
def _no_package_installs() -> Iterator[None]:
    """Keep TransformerLens from installing packages while it boots a bridge.

    TransformerLens 4.3 runs ``pip install torchvision`` when the processor of an image-text
    model (Gemma 3 4B and up) fails to load; pip then replaced the CPU torch of the running
    environment with a CUDA build. Booting a bridge must never change the environment, and this
    package only feeds the bridge text, so that step is made a no-op (the bridge simply has no
    image processor).
    """
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:
        yield
        return
    original = getattr(helpers, "_ensure_torchvision", None)
    if original is None:
        yield
        return
    helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def _boot_bridge(source: str, hf: Any, tokenizer: Any, *, device: str, dtype: torch.dtype) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    # Share every parameter and buffer: the bridge wraps a structural copy of the model. The
    # copy must not inherit hooks that are live on ``hf`` right now (a steer() scope around the
    # first use of the bridge): they would stay on the bridge for good.
    memo: dict[int, Any] = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    skeleton = copy.deepcopy(hf, memo)
    for module in skeleton.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
        ):
            hooks.clear()
    _contiguous_unembedding_input(skeleton)
    try:
        with _no_package_installs():
            return TransformerBridge.boot_transformers(
                source, device=device, dtype=dtype, hf_model=skeleton, tokenizer=tokenizer
            )
    except (ValueError, NotImplementedError, KeyError) as error:
        raise ModelLoadError(
            f"TransformerLens cannot bridge {source!r} ({str(error).splitlines()[0][:200]}): "
            "load it with with_bridge=False to use the fast path only"
        ) from error
