"""What it takes for activation addition to make a chat model refuse harmless requests.

    python examples/addition_strength.py RUN_DIR [--model qwen2.5-coder-0.5b-instruct-offline]
        [--prompts 16] [--max-new-tokens 48] [--output docs/qwen-addition-strength.txt]

Reads the steering direction and selected layer L of a finished ``refusal-dir run`` (RUN_DIR),
then generates on the first ``--prompts`` ordinary (not look-alike) shipped benign prompts under
several additions, all in one batched pass (one coefficient per row): the selected layer at
growing alpha, earlier and later layers, prompt-only positions, and the same direction added at
several layers at once. Prints and writes the refusal rate of each (substring judge, 95% Wilson
interval) with one sample completion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from refusal_dir import prompts as prompt_sets
from refusal_dir.evaluation import judges
from refusal_dir.evaluation.stats import wilson_interval
from refusal_dir.extraction import load_extraction
from refusal_dir.generation import GenerationSettings, generate
from refusal_dir.interventions import addition
from refusal_dir.model import OFFLINE_INSTRUCT_MODEL, load_model


def conditions(layer: int, n_layers: int) -> list[tuple[str, dict]]:
    """(label, addition keywords) relative to the selected layer: where the selected layer's
    direction is added (``at_layers``), how much, and to which positions."""
    clip = lambda x: max(0, min(n_layers - 1, x))  # noqa: E731
    spread = list(range(clip(layer - 9), clip(layer + 1) + 1))
    return [
        ("none (unsteered)", {"at_layers": [layer], "alpha": 0.0}),
        *[(f"layer {layer}, alpha {a:g}", {"at_layers": [layer], "alpha": a}) for a in (1.0, 2.0, 3.0, 4.0)],
        (f"layer {layer}, alpha 2, prompt positions only", {"at_layers": [layer], "alpha": 2.0, "apply_to": "prompt"}),
        *[(f"layer {clip(layer + d)}, alpha 3", {"at_layers": [clip(layer + d)], "alpha": 3.0}) for d in (-6, -2)],
        (f"layers {clip(layer - 2)}-{layer}, alpha 1 each", {"at_layers": list(range(clip(layer - 2), layer + 1)), "alpha": 1.0}),
        (f"layers {spread[0]}-{spread[-1]}, alpha 0.3 each", {"at_layers": spread, "alpha": 0.3}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--model", default=OFFLINE_INSTRUCT_MODEL)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--output", type=Path, default=Path("docs/qwen-addition-strength.txt"))
    args = parser.parse_args(argv)

    model = load_model(args.model, with_bridge=False)
    extraction = load_extraction(args.run_dir / "directions", model=model)
    directions, selected = extraction.steering_set, extraction.selected
    categories = prompt_sets.benign_eval_categories()
    prompts = [
        text
        for text, category in zip(prompt_sets.benign_eval(), categories, strict=True)
        if category != prompt_sets.LOOKALIKE_CATEGORY
    ]
    prompts = prompts[: args.prompts]
    chosen = conditions(selected.layer, model.n_layers)
    rows = [p for _ in chosen for p in prompts]
    interventions = []
    for index, (_, keywords) in enumerate(chosen):
        keywords = dict(keywords)
        alpha = keywords.pop("alpha")
        per_row = [alpha if i // len(prompts) == index else 0.0 for i in range(len(rows))]
        interventions.append(
            addition(directions, alpha=per_row, layer=selected.layer, token=selected.position, **keywords)
        )
    start = time.time()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=len(rows))
    texts = generate(model, rows, interventions=interventions, settings=settings)
    lines = [
        f"Activation addition of the refusal direction of {args.run_dir} (layer {selected.layer}, "
        f"raw mean difference, norm {directions.norm(selected.layer, selected.position):.1f}) on "
        f"{len(prompts)} ordinary benign prompts, {args.max_new_tokens} new tokens, model {args.model}.",
        f"Command: python examples/addition_strength.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"Generation took {time.time() - start:.0f} s.",
        "",
        f"{'condition':<44} {'refusal':>7}  {'95% Wilson':>13}  sample",
    ]
    for index, (label, _) in enumerate(chosen):
        block = texts[index * len(prompts) : (index + 1) * len(prompts)]
        refused = sum(judges.is_refusal(text) for text in block)
        low, high = wilson_interval(refused, len(block))
        sample = next((t for t in block if judges.is_refusal(t)), block[0]).replace("\n", " ")[:70]
        lines.append(f"{label:<44} {refused / len(block):>7.2f}  [{low:.2f}, {high:.2f}]  {sample!r}")
    report = "\n".join(lines) + "\n"
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
