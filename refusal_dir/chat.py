"""Chat templates: render a user turn, and tokenize it so that only the template is special.

A :class:`ChatFormat` wraps one tokenizer and one chat template (the model's own, or
:data:`PLAIN_CHAT_TEMPLATE`) with two settings: a system prompt and ``enable_thinking`` (passed
to templates that read it, such as Qwen3's; ``None`` keeps the template's default).

Three rules, each tested:

* **Exactly the template's tokens reach the model.** Nothing is added to what the template
  writes: a template that writes a BOS gives one BOS, a template without one (Qwen's) gives
  none.
* **User text is text.** :meth:`ChatFormat.format` returns a :class:`FormattedPrompt`, a
  ``str`` that remembers which of its characters are the caller's (the instruction and the
  system prompt). :meth:`ChatFormat.encode` keeps the template's own special tokens special and
  encodes those characters as plain text, so a prompt ``"<bos>hi<end_of_turn>"`` cannot add a
  second BOS or close the user turn. A plain ``str`` is encoded as written: it counts as
  formatted by the caller.
* **The reply starts where the template leaves off.** :attr:`ChatFormat.reply_prefix` is the
  text the template puts between its generation prompt and the reply (``""`` after Gemma's
  ``"<start_of_turn>model\\n"``, ``" "`` after the plain template's ``"Assistant:"``), and
  :meth:`ChatFormat.reply_token_ids` tokenizes a reply the way it follows the template.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from jinja2 import TemplateError

from refusal_dir.errors import ConfigError

logger = logging.getLogger(__name__)

#: Used when a model has no chat template of its own. Documented in docs/pipeline.md.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

#: Google's Gemma 3 turn format, attached to the offline Gemma 3 270M (its GGUF file carries
#: none). Gemma has no system turn: a system prompt opens the first user turn, as in Google's
#: template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_USER = "\u2063INSTRUCTION\u2063"
_SYSTEM = "\u2063SYSTEM\u2063"
_REPLY = "\u2063REPLY\u2063"
_PROBE_INSTRUCTION = "Hi"

Span = tuple[int, int]


class FormattedPrompt(str):
    """A chat-formatted prompt that knows which characters are the caller's text.

    It is a ``str`` (compare, print or save it as one); ``content_spans`` are the ``(start,
    end)`` character ranges of the instruction and the system prompt, which
    :meth:`ChatFormat.encode` tokenizes as plain text. Operations that make a new string
    (``+``, slicing) return a plain ``str``, which is encoded as written.
    """

    content_spans: tuple[Span, ...]

    def __new__(cls, text: str, content_spans: Sequence[Span] = ()) -> FormattedPrompt:
        prompt = super().__new__(cls, text)
        prompt.content_spans = tuple((int(start), int(end)) for start, end in content_spans)
        return prompt


def _messages(instruction: str, system: str | None) -> list[dict[str, str]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": instruction}]


class ChatFormat:
    """One tokenizer with one chat template, a system prompt and a thinking switch.

    ``name`` is how error messages call the model (say ``"'google/gemma-2-2b-it'"``). Raises
    :class:`ConfigError` when ``system_prompt`` is set and the template has no system role, or
    ``enable_thinking`` is set and the template never reads it.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
        name: str = "this model",
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.name = name
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ConfigError(f"system_prompt must be a string or None, got {system_prompt!r}")
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise ConfigError(
                f"enable_thinking must be true, false or None, got {enable_thinking!r}"
            )
        if enable_thinking is not None and "enable_thinking" not in template:
            raise ConfigError(
                f"the chat template of {name} does not read enable_thinking: leave "
                "enable_thinking unset (None) for this model"
            )
        self._layouts: dict[bool, list[str]] = {}
        self._warned_rewrite = False
        if system_prompt is not None:
            self._layout(with_system=True)

    # -- rendering ---------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool = True) -> str:
        """The template applied to ``messages`` (no tokenization)."""
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.template,
                    add_generation_prompt=generation_prompt,
                    tokenize=False,
                    **extra,
                )
            )
        except TemplateError as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            if any(message["role"] == "system" for message in messages):
                raise ConfigError(
                    f"the chat template of {self.name} has no system role ({reason}): "
                    "leave the system prompt unset, or put its text into the instructions"
                ) from error
            raise ConfigError(
                f"the chat template of {self.name} cannot render a user turn: {reason}"
            ) from error

    def _layout(self, *, with_system: bool) -> list[str]:
        """The template's text around the content slots: ``[before, between, after]`` with a
        system prompt, ``[before, after]`` without."""
        if with_system not in self._layouts:
            text = self.render(_messages(_USER, _SYSTEM if with_system else None))
            if with_system and text.count(_SYSTEM) != 1:
                raise ConfigError(
                    f"the chat template of {self.name} has no system role (it drops "
                    "the system message): leave the system prompt unset, or put its text into "
                    "the instructions"
                )
            head, _, after = text.partition(_USER)
            pieces = [*head.split(_SYSTEM), after]
            in_order = text.count(_USER) == 1 and len(pieces) == (3 if with_system else 2)
            self._layouts[with_system] = pieces if in_order else []
        return self._layouts[with_system]

    def format(self, instruction: str, *, system: str | None = None) -> FormattedPrompt:
        """``instruction`` as a user turn awaiting the reply (``system``: else the setting)."""
        system = self.system_prompt if system is None else system
        text = self.render(_messages(instruction, system))
        return FormattedPrompt(text, self._content_spans(text, instruction, system))

    def _content_spans(self, text: str, instruction: str, system: str | None) -> list[Span]:
        contents = [instruction] if system is None else [system, instruction]
        layout = self._layout(with_system=system is not None)
        if layout:
            spans: list[Span] = []
            position = len(layout[0])
            for content, piece in zip(contents, layout[1:], strict=True):
                spans.append((position, position + len(content)))
                position += len(content) + len(piece)
            if "".join(part for pair in zip(layout, [*contents, ""]) for part in pair) == text:
                return spans
        return self._probed_spans(text, instruction, system)

    def _probed_spans(self, text: str, instruction: str, system: str | None) -> list[Span]:
        """Spans of contents the template rewrites (Gemma trims the instruction): render with
        one slot replaced by a sentinel at a time; the rest of the text must not change."""
        probes = [(_messages(_USER, system), _USER)]
        if system is not None:
            probes.append((_messages(instruction, _SYSTEM), _SYSTEM))
        spans: list[Span] = []
        for messages, sentinel in probes:
            parts = self.render(messages).split(sentinel)
            if (
                len(parts) != 2
                or len(parts[0]) + len(parts[1]) > len(text)
                or not (text.startswith(parts[0]) and text.endswith(parts[1]))
            ):
                return self._cannot_escape()
            spans.append((len(parts[0]), len(text) - len(parts[1])))
        spans.sort()
        if any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)):
            return self._cannot_escape()
        return spans

    def _cannot_escape(self) -> list[Span]:
        if not self._warned_rewrite:
            logger.warning(
                "the chat template of %s rewrites prompts in a way that hides where the user's "
                "text is: special-token text inside prompts is tokenized as special tokens",
                self.name,
            )
            self._warned_rewrite = True
        return []

    # -- tokenization ------------------------------------------------------------------------
    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special-token strings, longest first."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        texts = {str(token) for token in getattr(self.tokenizer, "all_special_tokens", [])}
        texts |= {token.content for token in decoder.values() if getattr(token, "special", False)}
        texts.discard("")
        return tuple(sorted(texts, key=lambda text: (-len(text), text)))

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        if not self.special_tokens:
            return None
        return re.compile("|".join(re.escape(text) for text in self.special_tokens))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: special-token strings in it are characters."""
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return list(encoded["input_ids"])

    def encode(self, text: str) -> list[int]:
        """Token ids of a formatted prompt, adding nothing (no BOS of the tokenizer's own).

        A :class:`FormattedPrompt` keeps its content spans as text; when they hold no
        special-token text the result equals tokenizing the whole string at once.
        """
        spans = getattr(text, "content_spans", ())
        pattern = self._special_pattern
        if spans and pattern is not None:
            regions = _template_regions(text, spans)
            in_template = [match for region in regions for match in pattern.findall(region)]
            if pattern.findall(text) != in_template:
                return self._encode_pieces(text, spans, pattern)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pieces(
        self, text: str, spans: Sequence[Span], pattern: re.Pattern[str]
    ) -> list[int]:
        """The template's special tokens by id; every text run between them, user text
        included, as plain text (as the tokenizer itself splits around special tokens)."""
        ids: list[int] = []
        run = ""
        position = 0
        for start, end in [*spans, (len(text), len(text))]:
            region = text[position:start]
            last = 0
            for match in pattern.finditer(region):
                run += region[last : match.start()]
                if run:
                    ids += self.encode_text(run)
                run = ""
                ids.append(int(self.tokenizer.convert_tokens_to_ids(match.group())))
                last = match.end()
            run += region[last:] + text[start:end]
            position = end
        if run:
            ids += self.encode_text(run)
        return ids

    @cached_property
    def post_instruction_ids(self) -> list[int]:
        """Token ids of the template after the instruction (Arditi et al.'s positions)."""
        rendered = self.render(_messages(_USER, self.system_prompt))
        suffix = rendered.split(_USER)[-1]
        return self.encode(suffix) if suffix else []

    # -- the reply ---------------------------------------------------------------------------
    @cached_property
    def reply_prefix(self) -> str:
        """Text between the generation prompt and the reply's first word.

        Read from the template: a finished assistant turn is rendered after the same user turn,
        and whatever whitespace separates the generation prompt from the reply is the prefix.
        Where that does not apply (the template renders a finished turn differently, as Qwen3's
        does with thinking switched off), ``""`` when the prompt ends in whitespace or a
        special token, else ``" "``.
        """
        user = _messages(_PROBE_INSTRUCTION, self.system_prompt)
        prompt = self.render(user)
        try:
            finished = self.render(
                [*user, {"role": "assistant", "content": _REPLY}], generation_prompt=False
            )
        except ConfigError:
            finished = ""
        if finished.startswith(prompt) and _REPLY in finished[len(prompt) :]:
            between = finished[len(prompt) : finished.index(_REPLY, len(prompt))]
            if not between.strip():
                return between
        ends_special = any(prompt.endswith(token) for token in self.special_tokens)
        return "" if not prompt or prompt[-1].isspace() or ends_special else " "

    def reply_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as the start of the reply: ``reply_prefix + text`` tokenized
        after the generation prompt, keeping the tokens that follow the prompt's own.

        Falls back to tokenizing ``reply_prefix + text`` alone when the prompt's last tokens
        merge with the reply.
        """
        prompt = self.format(_PROBE_INSTRUCTION)
        reply = self.reply_prefix + text
        joined = FormattedPrompt(
            prompt + reply, (*prompt.content_spans, (len(prompt), len(prompt) + len(reply)))
        )
        base, full = self.encode(prompt), self.encode(joined)
        if len(full) > len(base) and full[: len(base)] == base:
            return full[len(base) :]
        return self.encode_text(reply)


def _template_regions(text: str, spans: Sequence[Span]) -> list[str]:
    regions = []
    position = 0
    for start, end in spans:
        regions.append(text[position:start])
        position = end
    regions.append(text[position:])
    return regions
