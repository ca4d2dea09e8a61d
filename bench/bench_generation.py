"""Benchmark: greedy generation, unsteered and steered, and a batched coefficient sweep.

Part ``main`` (16 prompts x 48 new tokens, batch 16, left padding, greedy):

(a) plain ``transformers`` ``model.hf.generate`` (unsteered, ``min_new_tokens=48``), as
    ``transformers`` ships it (``common.plain_transformers``: our one change to the plain model,
    a contiguous unembedding input, is off);
(a2) the same with that change on (what ``load_model`` gives): the unsteered floor for ours;
(b) ours: ``generate(model, prompts, interventions=[addition(direction, layer=6, alpha=1.0)])``
    with a random direction of norm 150 (what a mean difference has on this model);
(c) the TransformerLens bridge: ``model.bridge.generate`` (KV cache) inside
    ``model.bridge.hooks(fwd_hooks=bridge_hooks(...))``, ``stop_at_eos=False``;
(d) a naive loop that re-runs the whole sequence through the bridge with the hook for every new
    token (no KV cache, as FailSpy/abliterator does), on ``--naive-tokens`` tokens (default 16).

``GenerationSettings`` has no ``min_new_tokens``; so that (b) computes the same 16 x 48 token
positions as (a), the benchmark sets ``model.hf.generation_config.min_new_tokens = 48`` around
the timed calls (``transformers`` reads it as the default of every ``generate`` call). Rates are
generated token positions per second (rows x new tokens / seconds).

Part ``sweep``: the evaluation sweep's generation, 9 coefficients x 2 methods (addition with a
per-row ``alpha``, ablation with a per-row ``strength``) x ``--sweep-prompts`` prompts from the
shipped evaluation sets (half harmful, half benign), ``max_new_tokens=48`` with natural
stopping. Batched: per method one ``generate`` call over all 9 x N rows (``--sweep-batch`` rows
per forward pass, default all of them). Sequential: per method nine calls of N rows, one per
coefficient. Reports the speedup and whether the texts are identical.

    python bench/bench_generation.py [--parts main sweep] [--repeats 3] [--naive-tokens 16]
        [--sweep-prompts 16] [--sweep-batch 144]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

N_PROMPTS = 16
NEW_TOKENS = 48
LAYER = 6
NORM = 150.0
ALPHAS = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]


def random_direction(d_model: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(d_model, generator=generator)
    return vector / vector.norm() * NORM


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


def plain_generate(model, prompts, n_new):
    return common.plain_generate(model, prompts, n_new)[0]


def ours_generate(model, prompts, interventions, n_new, batch_size=N_PROMPTS):
    from refusal_dir.generation import GenerationSettings, generate_tokens

    settings = GenerationSettings(max_new_tokens=n_new, batch_size=batch_size)
    return generate_tokens(
        model, prompts, interventions=interventions, settings=settings, progress=False
    )


@torch.no_grad()
def bridge_generate(model, prompts, intervention, n_new):
    from refusal_dir.interventions import bridge_hooks

    batch = model.tokenize(model.format_prompts(prompts))
    with model.bridge.hooks(fwd_hooks=bridge_hooks(model, intervention)):
        out = model.bridge.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            max_new_tokens=n_new,
            use_past_kv_cache=True,
            stop_at_eos=False,
            return_type="tokens",
            verbose=False,
        )
    new = out[:, batch.input_ids.shape[1] :]
    model.tokenizer.batch_decode(new, skip_special_tokens=True)
    return new


@torch.no_grad()
def naive_generate(model, prompts, intervention, n_new):
    """Re-run the whole (growing) sequence through the hooked bridge for every token."""
    from refusal_dir.interventions import bridge_hooks

    batch = model.tokenize(model.format_prompts(prompts))
    tokens, mask = batch.input_ids, batch.attention_mask
    with model.bridge.hooks(fwd_hooks=bridge_hooks(model, intervention)):
        for _ in range(n_new):
            logits = model.bridge(tokens, attention_mask=mask)
            nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    new = tokens[:, batch.input_ids.shape[1] :]
    model.tokenizer.batch_decode(new, skip_special_tokens=True)
    return new


def _agree(a, b) -> str:
    """How many rows of two token tensors/lists agree over their common length."""
    rows = 0
    for x, y in zip(a, b):
        x, y = list(x), list(y)
        k = min(len(x), len(y))
        rows += x[:k] == y[:k]
    return f"{rows}/{len(a)} rows"


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


def run_main(model, prompts, direction, args) -> None:
    from refusal_dir.interventions import addition

    steer_add = addition(direction, layer=LAYER, alpha=1.0)
    n_naive = args.naive_tokens
    print(
        f"main: {len(prompts)} prompts x {NEW_TOKENS} new tokens, greedy; addition at resid_pre "
        f"of layer {LAYER}, random direction of norm {direction.norm():.0f}, alpha 1.0; naive "
        f"loop on {n_naive} tokens\n",
        flush=True,
    )
    with common.forced_length(model, NEW_TOKENS):
        # Sanity: what each method generates.
        plain = plain_generate(model, prompts, NEW_TOKENS)
        _, ours_plain = ours_generate(model, prompts, (), NEW_TOKENS)
        _, ours_steered = ours_generate(model, prompts, [steer_add], NEW_TOKENS)
        bridge = bridge_generate(model, prompts, steer_add, NEW_TOKENS)
        naive = naive_generate(model, prompts, steer_add, n_naive)
        print(f"ours unsteered == transformers generate: {_agree(ours_plain, plain.tolist())}")
        print(f"ours steered == bridge steered: {_agree(ours_steered, bridge.tolist())}")
        print(f"naive loop == bridge steered (first {n_naive} tokens): {_agree(naive.tolist(), bridge.tolist())}")
        print(f"steered differs from unsteered: {sum(a != b[: len(a)] for a, b in zip(ours_steered, plain.tolist()))}/{len(prompts)} rows")
        print(f"new tokens per row: (a) {plain.shape[1]}, (c) {bridge.shape[1]}, (d) {naive.shape[1]}; "
              f"(b) kept before a stop token: {sorted({len(t) for t in ours_steered})}\n", flush=True)
        methods = {
            "(a) transformers generate, unsteered": common.plain(
                model, lambda: plain_generate(model, prompts, NEW_TOKENS)
            ),
            "(a2) = (a) + contiguous lm_head input (load_model's fix)": lambda: plain_generate(
                model, prompts, NEW_TOKENS
            ),
            "(b) ours generate + addition": lambda: ours_generate(model, prompts, [steer_add], NEW_TOKENS),
            "(c) bridge generate + hook (KV cache)": lambda: bridge_generate(model, prompts, steer_add, NEW_TOKENS),
            f"(d) naive loop, bridge + hook, no KV cache ({n_naive} tokens)": lambda: naive_generate(
                model, prompts, steer_add, n_naive
            ),
        }
        timings = common.interleaved(methods, repeats=args.repeats, warmup=0)
    counts = {name: len(prompts) * (n_naive if name.startswith("(d)") else NEW_TOKENS) for name in methods}
    print()
    print(
        common.timing_table(
            timings, clock=args.clock, baseline="(a) transformers generate, unsteered",
            work=counts, unit="tokens",
        )
    )
    print(
        f"\n{args.repeats} interleaved repetitions (the sanity run above is the warm-up); torch threads "
        f"{torch.get_num_threads()}; rates and ratios from {args.clock} time; token positions: "
        f"{counts}.\n",
        flush=True,
    )


def sweep_prompts(n: int) -> list[str]:
    """``n`` prompts from the shipped evaluation sets: half harmful, half benign, interleaved."""
    from refusal_dir.prompts import benign_eval, harmful_eval

    harmful, benign = harmful_eval(), benign_eval()
    picked = [p for pair in zip(harmful[: (n + 1) // 2], benign[: n // 2]) for p in pair]
    return (picked + harmful[len(picked) // 2 : (n + 1) // 2])[:n]


def run_sweep(model, direction, args) -> None:
    from refusal_dir.interventions import ablation, addition

    prompts = sweep_prompts(args.sweep_prompts)
    rows = [p for _ in ALPHAS for p in prompts]
    per_row = [a for a in ALPHAS for _ in prompts]
    methods = {
        "addition": (
            addition(direction, layer=LAYER, alpha=per_row),
            [addition(direction, layer=LAYER, alpha=a) for a in ALPHAS],
        ),
        "ablation": (
            ablation(direction, alpha=per_row),
            [ablation(direction, alpha=a) for a in ALPHAS],
        ),
    }
    batch = args.sweep_batch or len(rows)
    print(
        f"sweep: {len(ALPHAS)} coefficients {ALPHAS} x {len(methods)} methods {list(methods)} x "
        f"{len(prompts)} prompts (shipped harmful_eval/benign_eval, half each), max_new_tokens "
        f"{NEW_TOKENS}, natural stopping; batched: {len(rows)} rows per method, {batch} per forward "
        f"pass; sequential: {len(ALPHAS)} calls of {len(prompts)} rows per method\n",
        flush=True,
    )

    def one_batch():
        out = []
        for batched, _ in methods.values():
            out.append(ours_generate(model, rows, [batched], NEW_TOKENS, batch_size=batch))
        return out

    def sequential():
        out = []
        for _, singles in methods.values():
            texts, tokens = [], []
            for intervention in singles:
                t, k = ours_generate(model, prompts, [intervention], NEW_TOKENS)
                texts += t
                tokens += k
            out.append((texts, tokens))
        return out

    batched_out, sequential_out = one_batch(), sequential()
    same = total = stopped = 0
    for (b_texts, b_tokens), (s_texts, _) in zip(batched_out, sequential_out):
        same += sum(x == y for x, y in zip(b_texts, s_texts))
        total += len(b_texts)
        stopped += sum(len(t) < NEW_TOKENS for t in b_tokens)
    verdict = "IDENTICAL" if same == total else "DIFFERENT"
    print(f"sweep texts: batched vs sequential {verdict}: {same}/{total} rows equal")
    print(f"rows that stopped before {NEW_TOKENS} tokens: {stopped}/{total}\n", flush=True)
    batched_name = f"batched: per method 1 call of {len(rows)} rows, per-row coefficient"
    seq_name = f"sequential: per method {len(ALPHAS)} calls of {len(prompts)} rows"
    timings = common.interleaved(
        {batched_name: one_batch, seq_name: sequential}, repeats=args.repeats, warmup=0
    )
    print()
    print(
        common.timing_table(
            timings, clock=args.clock, baseline=seq_name, work=total, unit="rows"
        )
    )
    chosen = timings.get(args.clock)
    speedup = common.median(chosen[seq_name]) / common.median(chosen[batched_name])
    wall = common.median(timings.wall[seq_name]) / common.median(timings.wall[batched_name])
    print(
        f"\nbatched sweep speedup: {speedup:.2f}x ({args.clock} time; wall {wall:.2f}x); texts "
        f"{verdict.lower()} ({same}/{total} rows)"
    )
    print(
        f"{args.repeats} interleaved repetitions (the sanity run above is the warm-up); torch threads "
        f"{torch.get_num_threads()}.\n",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["main", "sweep"], choices=["main", "sweep"])
    common.add_timing_args(parser)
    parser.add_argument("--naive-tokens", type=int, default=16)
    parser.add_argument("--sweep-prompts", type=int, default=16, help="sweep: prompts per coefficient")
    parser.add_argument("--sweep-batch", type=int, default=0, help="sweep: rows per forward pass (0: all)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    common.set_threads(args.threads)
    common.print_machine()
    model = common.bench_model()
    direction = random_direction(model.d_model)
    if "main" in args.parts:
        prompts = common.instructions(N_PROMPTS)
        print(f"main prompts: {N_PROMPTS} from {common.instruction_source()}\n")
        run_main(model, prompts, direction, args)
    if "sweep" in args.parts:
        run_sweep(model, direction, args)


if __name__ == "__main__":
    main()
