"""Benchmark against the peers: steering-vectors and repeng, same model, prompts and direction.

Optional: when neither package imports, prints how to install them and exits 0.

Extraction (16 contrast pairs = 32 prompts, 16 prompts per forward pass, left padding,
last-token residuals at every layer, then a direction per layer):

(a) ours: ``collect_activations`` on the positives and on the negatives, then
    ``compute_directions(..., method="mean_diff")``;
(b) steering-vectors: ``train_steering_vector(model.hf, tokenizer, pairs, batch_size=16)``
    (mean difference of decoder-block outputs);
(c) repeng: ``ControlVector.train(ControlModel(model.hf, layers), tokenizer, dataset,
    batch_size=16)`` (PCA of pair differences), as its README does;
(d) plain ``transformers`` forward with ``output_hidden_states=True, logits_to_keep=1`` (the
    floor, activations only);
(d2) (d) with the one change ``load_model`` makes to the plain model (a contiguous input to
    the unembedding).

Steered generation (16 prompts x 48 new tokens, greedy, a random direction of norm 150 added to
the residual stream entering layer 6 = the output of block 5):

(a) plain ``transformers`` ``generate``, unsteered; (a2) the same with ``load_model``'s change;
(b) ours ``generate`` + ``addition``;
(c) steering-vectors ``SteeringVector({5: v}).apply(model.hf)`` + ``generate``;
(d) repeng ``ControlModel(model.hf, [5])``, ``set_raw_control({5: v})``, ``generate``.

The peers and the plain ``transformers`` rows (a), (d) run on ``model.hf`` as ``transformers``
ships it: inside ``common.plain_transformers`` our contiguous-unembedding hook is off, so each
tool is timed as its users get it. The peers get the chat-formatted text without its leading ``<bos>`` (their tokenizer call adds
one), so every method sees the same tokens.

Compatibility shims (here only; their code is imported, not copied):

* repeng 0.4.0 uses ``np.float_`` in annotations, removed in NumPy 2: set ``np.float_ =
  np.float64`` before importing it;
* repeng's ``ControlModule`` builds its padding mask from ``position_ids`` assuming shape
  ``batch x seq``; transformers 5 passes ``1 x seq`` to the decoder layers in a plain forward
  (not in ``generate``), so any steered forward with a batch > 1 fails ("shape '[16, 33, 1]' is
  invalid"). A forward pre-hook on each wrapped layer expands ``position_ids`` to the batch.

Install (their pins would downgrade transformers to 4.x and NumPy to 1.x, so without
dependencies, into an ignored folder that this script adds to ``sys.path``)::

    pip install --no-deps --target .cache/peers steering-vectors==0.12.2 repeng==0.4.0

    python bench/bench_peers.py [--parts extraction generation] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PEERS_DIR = common.REPO / ".cache" / "peers"
N_PAIRS = 16
BATCH = 16
N_PROMPTS = 16
NEW_TOKENS = 48
LAYER = 6  # ours: resid_pre of block 6 == output of block 5 (the peers' decoder_block 5)
NORM = 150.0


def import_peers() -> dict[str, object]:
    """The peer modules that import (``{}`` when none)."""
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # shim: repeng 0.4.0 annotations use the NumPy 1 alias
    found: dict[str, object] = {}
    for name in ("steering_vectors", "repeng"):
        try:
            found[name] = __import__(name)
        except ImportError as error:
            print(f"{name}: cannot import ({error})")
    return found


# ----------------------------------------------------------------------------------------------
# repeng shim
# ----------------------------------------------------------------------------------------------


def _expand_position_ids(module, args, kwargs):
    """Give repeng's ControlModule ``position_ids`` of shape ``batch x seq``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    pos = kwargs.get("position_ids")
    if pos is not None and hidden is not None and pos.shape[0] == 1 and hidden.shape[0] > 1:
        kwargs = dict(kwargs)
        kwargs["position_ids"] = pos.expand(hidden.shape[0], -1)
        return args, kwargs
    return None


class RepengControl:
    """``repeng.ControlModel`` over ``model.hf`` with the shim; unwraps on exit."""

    def __init__(self, repeng, hf, layer_ids, *, shim: bool = True):
        self.control = repeng.ControlModel(hf, layer_ids)
        self.handles = []
        if shim:
            layers = hf.model.layers
            for layer_id in self.control.layer_ids:
                self.handles.append(
                    layers[layer_id].register_forward_pre_hook(_expand_position_ids, with_kwargs=True)
                )

    def __enter__(self):
        return self.control

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.control.unwrap()
        return False


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def peer_texts(model, instructions):
    """Chat-formatted texts without the leading BOS (the peers' tokenizer call adds it)."""
    bos = model.tokenizer.bos_token or ""
    return [t.removeprefix(bos) for t in model.format_prompts(instructions)]


def random_direction(d_model: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(d_model, generator=generator)
    return vector / vector.norm() * NORM


def check_tokens(model, instructions) -> None:
    ours = model.tokenize(model.format_prompts(instructions))
    theirs = model.tokenizer(peer_texts(model, instructions), padding=True, return_tensors="pt")
    same = torch.equal(ours.input_ids, theirs["input_ids"]) and torch.equal(
        ours.attention_mask, theirs["attention_mask"]
    )
    print(f"peers' tokenization == ours (one BOS, left padding): {same}")


def _cos(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def run_extraction(model, peers, args) -> None:
    from refusal_dir.activations import collect_activations
    from refusal_dir.directions import compute_directions

    items = common.instructions(2 * N_PAIRS)
    positives, negatives = items[0::2], items[1::2]
    pos_texts, neg_texts = peer_texts(model, positives), peer_texts(model, negatives)
    check_tokens(model, positives)

    def ours():
        pos = collect_activations(model, positives, batch_size=BATCH, progress=False)
        neg = collect_activations(model, negatives, batch_size=BATCH, progress=False)
        return compute_directions(
            pos, neg, site="resid_pre", method="mean_diff", model=model, position_rule="last"
        )

    @torch.no_grad()
    def floor():
        out = []
        for instructions in (positives, negatives):
            batch = model.tokenize(model.format_prompts(instructions))
            result = model.hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=1,
            )
            out.append(torch.stack([h[:, -1] for h in result.hidden_states], dim=1))
        return out

    methods = {"(a) ours: collect_activations x2 + compute_directions": ours}
    if "steering_vectors" in peers:
        sv = peers["steering_vectors"]

        def steering_vectors():
            return sv.train_steering_vector(
                model.hf, model.tokenizer, list(zip(pos_texts, neg_texts)), batch_size=BATCH
            )

        methods["(b) steering-vectors: train_steering_vector"] = common.plain(model, steering_vectors)
    if "repeng" in peers:
        repeng = peers["repeng"]
        dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in zip(pos_texts, neg_texts)]

        def repeng_train():
            with RepengControl(repeng, model.hf, list(range(-5, -18, -1))) as control:
                return repeng.ControlVector.train(control, model.tokenizer, dataset, batch_size=BATCH)

        methods["(c) repeng: ControlVector.train (PCA)"] = common.plain(model, repeng_train)
    methods["(d) transformers forward, output_hidden_states + logits_to_keep=1"] = common.plain(model, floor)
    methods["(d2) = (d) + contiguous lm_head input (load_model's fix)"] = floor

    # Sanity: the directions agree (ours at resid_pre[l + 1] == their block l output).
    directions = ours()
    if "steering_vectors" in peers:
        vector = methods["(b) steering-vectors: train_steering_vector"]()
        cos = [_cos(vector.layer_activations[k], directions.vector(k + 1, "last")) for k in range(model.n_layers - 1)]
        print(f"steering-vectors mean diff vs ours, cosine over layers 0..16: min {min(cos):.6f}")
    if "repeng" in peers:
        control_vector = methods["(c) repeng: ControlVector.train (PCA)"]()
        cos = [abs(_cos(control_vector.directions[k], directions.unit(k + 1, "last"))) for k in sorted(control_vector.directions) if k + 1 < model.n_layers]
        print(f"repeng PCA direction vs our mean diff, |cosine| over its layers (1..16): {min(cos):.2f}-{max(cos):.2f} (different method)")
    print(flush=True)
    timings = common.interleaved(methods, repeats=args.repeats, warmup=1)
    print()
    print(
        common.timing_table(
            timings,
            clock=args.clock,
            baseline="(d) transformers forward, output_hidden_states + logits_to_keep=1",
            work=2 * N_PAIRS,
            unit="prompts",
        )
    )
    print()
    ours_name = "(a) ours: collect_activations x2 + compute_directions"
    for name in methods:
        if name != ours_name:
            print(common.paired_rounds(timings, args.clock, ours_name, name))
    print(
        f"\n{N_PAIRS} pairs ({2 * N_PAIRS} prompts); {args.repeats} interleaved repetitions after "
        f"1 warm-up round; torch threads {torch.get_num_threads()}; ratios from {args.clock} time.\n",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# Steered generation
# ----------------------------------------------------------------------------------------------


def run_generation(model, peers, args) -> None:
    from refusal_dir.generation import GenerationSettings, generate_tokens
    from refusal_dir.interventions import addition

    instructions = common.instructions(N_PROMPTS)
    texts = peer_texts(model, instructions)
    direction = random_direction(model.d_model)
    stop_ids = model.stop_token_ids()
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=model.pad_token_id,
        eos_token_id=stop_ids,
    )

    @torch.no_grad()
    def hf_generate(generate_fn):
        batch = model.tokenizer(texts, padding=True, return_tensors="pt")
        out = generate_fn(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        model.tokenizer.batch_decode(new, skip_special_tokens=True)
        return new.tolist()

    def plain():
        return hf_generate(model.hf.generate)

    def ours():
        settings = GenerationSettings(max_new_tokens=NEW_TOKENS, batch_size=N_PROMPTS)
        return generate_tokens(
            model, instructions, interventions=[addition(direction, layer=LAYER, alpha=1.0)],
            settings=settings, progress=False,
        )[1]

    methods = {
        "(a) transformers generate, unsteered": common.plain(model, plain),
        "(a2) = (a) + contiguous lm_head input (load_model's fix)": plain,
        "(b) ours: generate + addition": ours,
    }
    if "steering_vectors" in peers:
        sv = peers["steering_vectors"]
        vector = sv.SteeringVector({LAYER - 1: direction.clone()}, "decoder_block")

        def steering_vectors():
            with vector.apply(model.hf):
                return hf_generate(model.hf.generate)

        methods["(c) steering-vectors: SteeringVector.apply + generate"] = common.plain(model, steering_vectors)
    if "repeng" in peers:
        repeng = peers["repeng"]

        def repeng_generate():
            with RepengControl(repeng, model.hf, [LAYER - 1]) as control:
                control.set_raw_control({LAYER - 1: direction.clone()})
                return hf_generate(control.generate)

        methods["(d) repeng: ControlModel.set_raw_control + generate"] = common.plain(model, repeng_generate)

        # The failure the shim fixes: a steered plain forward with a batch of prompts.
        batch = model.tokenizer(texts, padding=True, return_tensors="pt")
        for shim in (False, True):
            try:
                with RepengControl(repeng, model.hf, [LAYER - 1], shim=shim) as control:
                    control.set_raw_control({LAYER - 1: direction.clone()})
                    with torch.no_grad():
                        control(**batch, logits_to_keep=1)
                print(f"repeng steered forward, batch {N_PROMPTS}, shim={shim}: works")
            except RuntimeError as error:
                print(f"repeng steered forward, batch {N_PROMPTS}, shim={shim}: fails: {str(error)[:90]}")

    original = model.hf.generation_config.min_new_tokens
    model.hf.generation_config.min_new_tokens = NEW_TOKENS  # ours has no min_new_tokens setting
    try:
        results = {name: fn() for name, fn in methods.items()}
        reference = results["(b) ours: generate + addition"]
        for name, tokens in results.items():
            same = sum(list(a)[: len(b)] == list(b) for a, b in zip(tokens, reference))
            print(f"{name}: tokens per row {sorted({len(t) for t in tokens})}; rows equal to ours: {same}/{N_PROMPTS}")
        print(flush=True)
        timings = common.interleaved(methods, repeats=args.repeats, warmup=0)
    finally:
        model.hf.generation_config.min_new_tokens = original
    print()
    print(
        common.timing_table(
            timings,
            clock=args.clock,
            baseline="(a) transformers generate, unsteered",
            work=N_PROMPTS * NEW_TOKENS,
            unit="tokens",
        )
    )
    print()
    for name in methods:
        if name != "(b) ours: generate + addition":
            print(common.paired_rounds(timings, args.clock, "(b) ours: generate + addition", name))
    print(
        f"\n{N_PROMPTS} prompts x {NEW_TOKENS} tokens; {args.repeats} interleaved repetitions (the "
        f"sanity run above is the warm-up); torch threads {torch.get_num_threads()}; ratios from "
        f"{args.clock} time.\n",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", default=["extraction", "generation"], choices=["extraction", "generation"]
    )
    common.add_timing_args(parser)
    args = parser.parse_args()
    peers = import_peers()
    if not peers:
        print("not installed: pip install steering-vectors repeng")
        return
    torch.set_grad_enabled(False)
    common.set_threads(args.threads)
    info = common.print_machine()
    del info
    for name, module in peers.items():
        print(f"{name} {getattr(module, '__version__', common._version(name.replace('_', '-')))}")
    model = common.bench_model(with_bridge=False)
    if "extraction" in args.parts:
        run_extraction(model, peers, args)
    if "generation" in args.parts:
        run_generation(model, peers, args)


if __name__ == "__main__":
    main()
