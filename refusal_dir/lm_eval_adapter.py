"""Run EleutherAI ``lm-eval`` tasks on a steered model.

:class:`SteeredLM` is an ``lm_eval.api.model.LM`` built from a
:class:`~refusal_dir.model.HookedModel` and the interventions of one steering setting, which
apply to every request::

    import lm_eval
    from refusal_dir.lm_eval_adapter import SteeredLM

    steered = SteeredLM(model, [addition(directions, layer=12, alpha=-1.0)])
    results = lm_eval.simple_evaluate(model=steered, tasks=["arc_easy"], limit=200)

``lm_eval`` is imported on first use of :class:`SteeredLM` (``pip install
"refusal-dir[lm-eval]"``); without it, the import raises one line naming that command.

Requests are scored through the package's own forward path (left-padded contexts, then the
continuations, under :func:`~refusal_dir.interventions.steer`), so a batch gives the values of
one request at a time. A continuation counts as generated positions for the position rules
(as in :func:`~refusal_dir.evaluation.metrics.answer_cross_entropy`): an addition with
``positions="generated"`` acts on the scored text, not on the context. Texts are tokenized as
written, after the tokenizer's BOS token when it has one (lm-eval's texts carry none; a text
that already starts with it, say from ``apply_chat_template``, gets no second one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from refusal_dir.errors import ConfigError, DataError
from refusal_dir.evaluation.metrics.forcing import answer_logits, forced_batch
from refusal_dir.generation import GenerationSettings, _batches, generate
from refusal_dir.interventions import Intervention, check_rows, repeat_rows
from refusal_dir.model import HookedModel
from refusal_dir.pipeline import context_length

INSTALL_HINT = 'pip install "refusal-dir[lm-eval]"'

_CLASSES: dict[str, type] = {}


def _lm_base() -> type:
    """``lm_eval.api.model.LM``, or a one-line :class:`ConfigError` naming the install."""
    try:
        from lm_eval.api.model import LM
    except ImportError as error:
        raise ConfigError(f"lm-eval is not installed: {INSTALL_HINT}") from error
    return LM


def __getattr__(name: str) -> Any:
    """``SteeredLM`` is built on first access, so that this module imports without lm_eval."""
    if name != "SteeredLM":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        cls = type("SteeredLM", (_SteeredLMMethods, _lm_base()), {"__module__": __name__})
        cls.__doc__ = _SteeredLMMethods.__doc__
        _CLASSES[name] = cls
    return _CLASSES[name]


class _SteeredLMMethods:
    """An ``lm_eval`` model: ``model`` under ``interventions`` (none: the unsteered model).

    One steering setting serves every request: coefficients must be single values (or lists of
    one value); the adapter repeats them for each batch's rows. ``batch_size`` is the number of
    requests per forward pass (each unembeds every scored position), ``max_length`` the
    context window (default: the model's), ``max_gen_toks`` the default generation length,
    ``add_bos_token`` whether texts start with the tokenizer's BOS token (default: when it has
    one).
    """

    def __init__(
        self,
        model: HookedModel,
        interventions: Sequence[Intervention] = (),
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_gen_toks < 1:
            raise ConfigError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        try:
            check_rows(interventions, 1)
        except ConfigError as error:
            raise ConfigError(
                "SteeredLM applies one steering setting to every request: give single "
                "coefficients (alpha=1.5), not one per row"
            ) from error
        self.model = model
        self.interventions = list(interventions)
        self.batch_size = batch_size
        self.max_length = max_length or context_length(model) or 2048
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        self.max_gen_toks = max_gen_toks
        bos = model.tokenizer.bos_token
        self.bos_text: str | None = bos if (add_bos_token is None or add_bos_token) and bos else None
        if add_bos_token and bos is None:
            raise ConfigError("add_bos_token=True but the tokenizer has no BOS token: leave it unset")

    # -- helpers ---------------------------------------------------------------------------
    def _rows(self, n: int) -> list[Intervention]:
        """The interventions with their coefficients repeated for ``n`` rows."""
        return repeat_rows(self.interventions, [n])

    def _text(self, text: str) -> str:
        if self.bos_text is None or text.startswith(self.bos_text):
            return text
        return self.bos_text + text

    def _encode(self, text: str) -> list[int]:
        return self.model._encode(self._text(text))

    def _prefix_ids(self) -> list[int]:
        """What an empty context is: the BOS token, else the end-of-text token."""
        if self.bos_text is not None:
            return self._encode("")
        eos = self.model.tokenizer.eos_token_id
        return [int(eos if eos is not None else self.model.pad_token_id)]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and of the continuation, split from the joined text as
        lm-eval's HF model does (trailing spaces of the context belong to the continuation)."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        if not continuation:
            raise DataError("a loglikelihood request has an empty continuation: remove it")
        if not stripped:
            return self._prefix_ids(), self.model._encode(continuation)
        whole = self._encode(stripped + continuation)
        head = self._encode(stripped)
        return whole[: len(head)], whole[len(head) :]

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether every
        continuation token is the greedy one; contexts cut from the left to ``max_length``."""
        fitted = []
        for context, continuation in pairs:
            if len(continuation) > self.max_length:
                raise DataError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length "
                    f"{self.max_length}: use loglikelihood_rolling, or a shorter continuation"
                )
            keep = self.max_length + 1 - len(continuation)
            fitted.append((context[-keep:] if len(context) > keep else context, continuation))
        order = sorted(range(len(fitted)), key=lambda i: -sum(len(part) for part in fitted[i]))
        ordered = [fitted[i] for i in order]
        interventions = self._rows(len(ordered))
        scored: list[tuple[float, bool]] = []
        for rows in _batches(len(ordered), self.batch_size):
            batch_pairs = ordered[rows]
            longest = max(len(continuation) for _, continuation in batch_pairs)
            batch, width = forced_batch(
                self.model,
                [context for context, _ in batch_pairs],
                [continuation for _, continuation in batch_pairs],
                answer_width=longest,
            )
            targets = batch.input_ids[:, width:]

            def logprob_and_greedy(logits: Tensor, targets: Tensor = targets) -> Tensor:
                logits = logits.float()
                targets = targets.to(logits.device)
                picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                greedy = logits.argmax(dim=-1) == targets
                return torch.stack([picked - torch.logsumexp(logits, dim=-1), greedy.float()], dim=-1)

            values = answer_logits(
                self.model, batch, interventions, rows=rows, prompt_width=width,
                n_tokens=longest, reduce=logprob_and_greedy,
            ).double()
            for row, (_, continuation) in enumerate(batch_pairs):
                kept = values[row, : len(continuation)]
                scored.append((float(kept[:, 0].sum()), bool(kept[:, 1].all())))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(fitted)
        for position, index in enumerate(order):
            results[index] = scored[position]
        return results

    # -- the lm_eval interface -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)``."""
        if not requests:
            return []
        results = self._score([self._pair(*request.args) for request in requests])
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)  # type: ignore[attr-defined]
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (after BOS, or the end-of-text token), scored in
        disjoint windows of ``max_length`` tokens, each with as much preceding context as fits."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            ids = self.model._encode(text)
            if not ids:
                raise DataError(f"rolling request {index} tokenizes to nothing: remove it")
            for window in get_rolling_token_windows(
                token_list=ids, prefix_token=self._prefix_ids()[-1],
                max_seq_len=self.max_length, context_len=1,
            ):
                context, continuation = make_disjoint_window(window)
                windows.append((list(context), list(continuation)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)  # type: ignore[attr-defined]
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions of each context, cut before the first ``until`` string (and at the
        model's end of turn), at most ``max_gen_toks`` tokens."""
        groups: dict[tuple[tuple[str, ...], int, bool, float], list[int]] = {}
        for index, request in enumerate(requests):
            _, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0) or 0.0)
            if temperature == 0.0:
                do_sample, temperature = False, 1.0
            groups.setdefault((until, max_new, do_sample, temperature), []).append(index)
        outputs = [""] * len(requests)
        for (until, max_new, do_sample, temperature), indices in groups.items():
            settings = GenerationSettings(
                max_new_tokens=max_new, batch_size=self.batch_size, do_sample=do_sample,
                temperature=temperature, stop_strings=until,
            )
            contexts = [self._text(requests[index].args[0]) for index in indices]
            texts = generate(
                self.model, contexts, interventions=self._rows(len(contexts)), settings=settings,
                apply_chat_template=False, progress=not disable_tqdm,
            )
            for index, text in zip(indices, texts, strict=True):
                outputs[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)  # type: ignore[attr-defined]
        return outputs

    # -- chat templates (lm_eval's apply_chat_template=True) ---------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.model.model_id).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.model.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to lm-eval's messages (as text)."""
        return self.model.chat.render(chat_history, generation_prompt=add_generation_prompt)
