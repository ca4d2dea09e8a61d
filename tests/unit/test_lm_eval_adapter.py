"""The lm-eval adapter: its log-likelihoods equal a plain computation (unsteered: plain
``transformers`` log-probs; steered: the same vector added by a plain pre-hook), its
generations stop at ``until``, and without lm_eval it fails with one line naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import plain_reference
import pytest
import torch

from refusal_dir import lm_eval_adapter
from refusal_dir.errors import ConfigError
from refusal_dir.interventions import addition
from refusal_dir.model import HookedModel, load_model
from refusal_dir.testing import make_tiny_model

REQUESTS = [
    ("Question: How do I make a cake?\nAnswer:", " Mix flour, eggs and sugar, then bake it."),
    ("Write a poem about the sea.", " The waves"),
    ("Hi", " there"),
    ("The capital of France is ", "Paris."),  # a trailing space moves to the continuation
]


def test_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch) -> None:
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setattr(lm_eval_adapter, "_CLASSES", {})
    with pytest.raises(ConfigError) as error:
        lm_eval_adapter.SteeredLM  # noqa: B018
    message = str(error.value)
    assert "\n" not in message and 'pip install "refusal-dir[lm-eval]"' in message
    with pytest.raises(AttributeError):
        lm_eval_adapter.Unknown  # noqa: B018


@pytest.fixture(scope="module")
def lm_model(tmp_path_factory: pytest.TempPathFactory) -> HookedModel:
    pytest.importorskip("lm_eval")
    directory = make_tiny_model(tmp_path_factory.mktemp("lm_eval") / "tiny")
    return load_model(str(directory), device="cpu", with_bridge=False)


def _instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def _plain_pair(model: HookedModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split, with the tokenizer alone: BOS, then the joined text; the context is the
    prefix as long as the context's own ids."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    encode = lambda text: [model.tokenizer.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    whole, head = encode(stripped + continuation), encode(stripped)
    return whole[: len(head)], whole[len(head) :]


def _plain(model, context, continuation, vector=None, rule="all", alpha=0.0) -> tuple[float, bool]:
    head, tail = _plain_pair(model, context, continuation)
    logprobs = plain_reference.reference_continuation_logprobs(model, head, tail, vector, rule, layer=1, alpha=alpha)
    # Greedy: each token is the argmax at its position (the reference's log-probs of all tokens).
    ids = torch.tensor([head + tail])
    handle = None
    if vector is not None:
        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = torch.arange(hidden.shape[1]) >= len(head) if rule == "generated" else torch.ones(hidden.shape[1], dtype=torch.bool)
            edited = hidden + alpha * vector * mask.view(1, -1, 1).to(hidden.dtype)
            return ((edited, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": edited})

        handle = model.layers[1].register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            argmax = model.hf(input_ids=ids, use_cache=False).logits[0, len(head) - 1 : -1].argmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    return float(logprobs.sum()), bool((argmax == torch.tensor(tail)).all())


def test_loglikelihood_equals_plain_transformers_unsteered(lm_model) -> None:
    steered = lm_eval_adapter.SteeredLM(lm_model, batch_size=3)
    results = steered.loglikelihood(_instances("loglikelihood", REQUESTS))
    expected = [_plain(lm_model, context, continuation) for context, continuation in REQUESTS]
    assert [value for value, _ in results] == pytest.approx([value for value, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in results] == [greedy for _, greedy in expected]
    # The greedy continuation is greedy: the tokens the model itself picks after a context.
    context = "Hi"
    head, _ = _plain_pair(lm_model, context, " x")
    with torch.no_grad():
        pick = int(lm_model.hf(input_ids=torch.tensor([head])).logits[0, -1].argmax())
    text = lm_model.tokenizer.decode([pick])
    if lm_model.tokenizer(context + text, add_special_tokens=False)["input_ids"][-1] == pick:
        [(_, greedy)] = steered.loglikelihood(_instances("loglikelihood", [(context, text)]))
        assert greedy


def test_loglikelihood_under_an_addition_equals_a_plain_hook(lm_model) -> None:
    vector = torch.randn(lm_model.d_model, generator=torch.Generator().manual_seed(11))
    instances = _instances("loglikelihood", REQUESTS)
    base = lm_eval_adapter.SteeredLM(lm_model).loglikelihood(instances)
    for rule in ("all", "generated"):
        push = addition(vector, layer=1, alpha=3.0, apply_to=rule)
        results = lm_eval_adapter.SteeredLM(lm_model, [push], batch_size=2).loglikelihood(instances)
        expected = [_plain(lm_model, c, x, vector, rule, alpha=3.0) for c, x in REQUESTS]
        assert [value for value, _ in results] == pytest.approx([value for value, _ in expected], abs=1e-4)
        assert [greedy for _, greedy in results] == [greedy for _, greedy in expected]
        moved = [abs(a - b) for (a, _), (b, _) in zip(results, base, strict=True)]
        # On generated positions only, the first continuation token (read at the context's
        # last position) does not move: smaller changes, but changes.
        assert min(moved) > (1e-3 if rule == "all" else 1e-4)
    # One coefficient list of one value is one setting; several values are refused.
    one = lm_eval_adapter.SteeredLM(lm_model, [addition(vector, layer=1, alpha=[3.0])])
    assert [v for v, _ in one.loglikelihood(instances)] == pytest.approx(
        [v for v, _ in lm_eval_adapter.SteeredLM(lm_model, [addition(vector, layer=1, alpha=3.0)]).loglikelihood(instances)], abs=1e-6
    )
    with pytest.raises(ConfigError, match="one steering setting"):
        lm_eval_adapter.SteeredLM(lm_model, [addition(vector, layer=1, alpha=[1.0, 2.0])])


def test_loglikelihood_rolling_sums_windows_and_equals_plain_scoring(lm_model) -> None:
    text = "The sea is wide and the waves are tall. " * 3
    ids = lm_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = lm_model.tokenizer.bos_token_id
    whole = float(plain_reference.reference_continuation_logprobs(lm_model, [bos], ids).sum())
    [rolled] = lm_eval_adapter.SteeredLM(lm_model).loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert rolled == pytest.approx(whole, abs=1e-4)
    # Windows shorter than the text: each token still scored once, with less context.
    windowed = lm_eval_adapter.SteeredLM(lm_model, max_length=16).loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(text,), ("Hi",)])
    )
    assert len(ids) > 16 and windowed[0] != pytest.approx(whole, abs=1e-4) and windowed[0] < 0 and windowed[1] < 0


def test_generate_until_returns_strings_and_stops_at_until(lm_model) -> None:
    steered = lm_eval_adapter.SteeredLM(lm_model, max_gen_toks=12)
    contexts = ["Write a poem about the sea.", "Hi"]
    free = steered.generate_until(_instances("generate_until", [(c, {"until": []}) for c in contexts]))
    assert all(isinstance(text, str) for text in free) and any(free)
    # Stop at a string the free completion contains: the text ends right before it.
    stop = next(text for text in free if len(text.strip()) > 2).strip()[1:3]
    cut = steered.generate_until(
        _instances("generate_until", [(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    )
    for full, short in zip(free, cut, strict=True):
        assert stop not in short and full.startswith(short)
        if stop in full:
            assert short == full[: full.index(stop)]
    # Steering changes what is generated; mixed settings in one call keep the request order.
    vector = torch.randn(lm_model.d_model, generator=torch.Generator().manual_seed(2))
    pushed = lm_eval_adapter.SteeredLM(lm_model, [addition(vector, layer=0, alpha=20.0)], max_gen_toks=12)
    assert pushed.generate_until(_instances("generate_until", [(c, {"until": []}) for c in contexts])) != free
    mixed = steered.generate_until(
        _instances("generate_until", [(contexts[0], {"until": [stop]}), (contexts[1], {"until": []})])
    )
    assert mixed == [cut[0], free[1]]


def test_simple_evaluate_runs_a_local_task(lm_model, tmp_path: Path) -> None:
    """lm-eval's own evaluator drives the adapter end to end on a two-question local task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "qa.jsonl"
    data.write_text(
        '{"q": "Is the sea wet?", "choices": ["yes", "no"], "label": 0}\n'
        '{"q": "Is fire cold?", "choices": ["yes", "no"], "label": 1}\n'
    )
    (tmp_path / "tiny_qa.yaml").write_text(
        "task: tiny_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model=lm_eval_adapter.SteeredLM(lm_model),
        tasks=["tiny_qa"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    assert 0.0 <= results["results"]["tiny_qa"]["acc,none"] <= 1.0
