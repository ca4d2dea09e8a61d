"""Settings as frozen dataclasses, read from ``configs/default.yaml`` and validated.

Each setting is declared once, here: its default, its help text and, when the command line
exposes it, its flag (:func:`setting`). The CLI builds its flags from these fields, and
``configs/default.yaml`` is generated from them (``python -m refusal_dir.config
--write-defaults``; a test checks the file is up to date). Invalid values raise
:class:`ConfigError` naming the field and the allowed values.

Renamed keys (:data:`RENAMED_KEYS`, docs/glossary.md) still load for one release with a
:class:`DeprecationWarning`; a stored ``config.resolved.yaml`` written before a rename is read
under the new names (:func:`upgrade_stored_config`) and hashed under the old ones
(:meth:`Config.key_dict`), so that its output directory still resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import textwrap
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from refusal_dir.errors import ConfigError
from refusal_dir.placement import DEVICE_MAPS, QUANTIZATIONS, parse_max_memory
from refusal_dir.sites import RESIDUAL_SITES

TOKEN_RULES = ("last", "mean", "post_instruction")
POSITIONS = TOKEN_RULES  # the old name (docs/glossary.md)
APPLY_TO = ("all", "prompt", "generated")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STEERING_METHODS = ("addition", "ablation")
ALL_STEERING_METHODS = ("addition", "ablation", "conditional", "prompt")
PROMPT_PLACES = ("user", "system")
DIRECTION_METHODS = ("mean_diff", "pca", "probe")
SELECTION_RULES = ("effect", "separation", "cosine")


def setting(default: Any, help: str, *, flag: str | None = None, old_flag: str | None = None, **cli: Any) -> Any:
    """A config field declared once: its default, its help (the CLI's help and the comment in
    ``default.yaml``; a newline starts a new comment line there) and, when the command line
    exposes it, its ``flag``, the flag's deprecated ``old_flag`` and its argparse details
    (``type``, ``nargs``, ``choices``; ``const`` for a switch that sets this value)."""
    return field(default=default, metadata={"help": help, "flag": flag, "old_flag": old_flag, "cli": cli})


def _fail(field_name: str, message: str) -> None:
    raise ConfigError(f"config field {field_name}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "int | None": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "float": (_is_number, "a number"),
    "tuple[str, ...]": (
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
        "a list of strings",
    ),
    "tuple[float, ...]": (
        lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) for x in v),
        "a list of numbers",
    ),
}


def _check_types(section: str, settings: Any) -> None:
    """Reject values of the wrong type (YAML reads ``no`` as a bool but ``"no"`` as text)."""
    for item in fields(settings):
        check, expected = _CHECKS[str(item.type)]
        value = getattr(settings, item.name)
        if check(value):
            continue
        hint = ""
        if isinstance(value, str) and expected.startswith("a number"):
            try:
                float(value)
                hint = " (YAML reads 1e-2 as text: write 1.0e-2)"
            except ValueError:
                pass
        _fail(f"{section}.{item.name}", f"must be {expected}, got {value!r} ({type(value).__name__}){hint}")


@dataclass(frozen=True)
class ModelSettings:
    name: str = setting(
        "google/gemma-2-2b-it",
        "hub id, local model directory, qwen2.5-coder-0.5b-instruct-offline or gemma-3-270m-offline (no hub needed)",
        flag="--model",
    )
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...", flag="--device")
    dtype: str = setting(
        "auto", "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16", flag="--dtype", choices=DTYPES
    )
    revision: str | None = setting(None, "hub revision (branch, tag or commit) to pin")
    device_map: str | None = setting(
        None,
        "split the model over devices with accelerate: auto, balanced, balanced_low_0 or sequential "
        "(null: all on model.device; docs/scaling.md)",
        flag="--device-map",
        choices=DEVICE_MAPS,
    )
    max_memory: str | None = setting(
        None, "with device_map: memory per device, like 0=20GiB,1=20GiB,cpu=60GiB", flag="--max-memory"
    )
    offload_folder: str | None = setting(
        None, "with device_map: directory for the weights offloaded to disk", flag="--offload-folder"
    )
    quantization: str | None = setting(
        None, "load the weights in 8bit or 4bit with bitsandbytes (null: full precision)",
        flag="--quantization", choices=QUANTIZATIONS,
    )

    def __post_init__(self) -> None:
        _check_types("model", self)
        if not self.name:
            _fail("model.name", "must be a hub id, a local directory or an offline model name")
        if self.dtype not in DTYPES:
            _fail("model.dtype", f"{self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            _fail("model.device_map", f"{self.device_map!r} is not one of {', '.join(DEVICE_MAPS)} or null")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            _fail("model.quantization", f"{self.quantization!r} is not one of {', '.join(QUANTIZATIONS)} or null")
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and self.device_map is None:
                _fail(f"model.{name}", "needs model.device_map (auto, ...): set both or neither")
        if self.device_map is not None and self.device != "auto":
            _fail("model.device", "must be auto when model.device_map places the model")
        try:
            parse_max_memory(self.max_memory)
        except ConfigError as error:
            _fail("model.max_memory", str(error))

    def load_options(self) -> dict[str, Any]:
        """The keywords of :func:`refusal_dir.model.load_model` these settings give."""
        return {
            "device": None if self.device == "auto" else self.device,
            "dtype": self.dtype,
            "revision": self.revision,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
            "quantization": self.quantization,
        }


@dataclass(frozen=True)
class DataSettings:
    refusal_pairs: str = setting(
        "shipped", "refusal pairs: shipped, or a .json/.jsonl/.csv file with harmful/harmless fields", flag="--pairs-file"
    )
    harmful_eval: str = setting(
        "shipped", "harmful evaluation instructions: shipped, hub:advbench, hub:jailbreakbench, or a file (field: instruction)", flag="--harmful-file"
    )
    benign_eval: str = setting("shipped", "benign evaluation instructions: shipped, hub:alpaca, or a file (field: instruction)", flag="--benign-file")
    mmlu: str = setting("shipped", "four-choice questions: shipped, hub:mmlu, or a file (question, choices/A-D, answer)", flag="--mmlu-file")
    honesty_pairs: str = setting("shipped", "shipped or a file with truthful/sycophantic fields")
    true_false_claims: str = setting("shipped", "shipped only (honesty evaluation)")
    harmless_answers: str = setting(
        "shipped",
        "requests with answers for the cross-entropy: shipped (60 answered requests) or a file with "
        "instruction/answer fields (optional topic)",
        flag="--harmless-answers-file",
    )
    heldout_fraction: float = setting(0.25, "share of the extraction pairs held out to score layers")
    max_eval_prompts: int | None = setting(
        None,
        "evaluate a seeded sample of this many items of each set, stratified by category (null: all)",
        flag="--max-eval-prompts",
        type=int,
    )
    seed: int = setting(0, "seed of the train/held-out split and of the max_eval_prompts sample")

    def __post_init__(self) -> None:
        _check_types("data", self)
        if not 0 < self.heldout_fraction < 1:
            _fail("data.heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        if self.max_eval_prompts is not None and self.max_eval_prompts < 1:
            _fail("data.max_eval_prompts", f"must be null or >= 1, got {self.max_eval_prompts}")
        if self.harmless_answers.startswith("hub:"):
            _fail("data.harmless_answers", f"{self.harmless_answers!r}: hub sets have no answers; use shipped or a file with instruction/answer fields")


@dataclass(frozen=True)
class ExtractionSettings:
    sites: tuple[str, ...] = setting(RESIDUAL_SITES, "residual-stream sites cached at every layer")
    token: str = setting(
        "last",
        "which prompt token directions are read at: last, mean, or post_instruction (every template token "
        "after the instruction, Arditi et al.)",
        flag="--token",
        old_flag="--position",
        choices=TOKEN_RULES,
    )
    methods: tuple[str, ...] = setting(
        DIRECTION_METHODS,
        "direction methods computed; scored side by side",
        flag="--directions-methods",
        nargs="+",
        choices=DIRECTION_METHODS,
    )
    method: str = setting("mean_diff", "the direction method whose direction is steered with")
    site: str = setting("resid_pre", "the site whose direction is steered with")
    batch_size: int = setting(16, "prompts per forward pass", flag="--extract-batch-size", type=int)
    max_layer_fraction: float = setting(0.8, "layer selection ignores the last 20% of layers")
    selection: str = setting(
        "effect",
        "layer selection rule: effect (Arditi-style: ablation KL, bypass, induce on held-out pairs), separation, "
        "or cosine (COSMIC-style: activation cosines after ablation and addition on held-out pairs; no logits)",
        flag="--selection",
        choices=SELECTION_RULES,
    )
    max_kl: float = setting(
        0.1,
        "effect selection: KL budget (ablation KL on harmless prompts); doubled, and recorded, when no layer "
        "that steers fits within it",
    )
    selection_candidates: int | None = setting(
        None, "effect and cosine selection try every layer (null) or the best-separating N"
    )
    selection_prompts: int = setting(
        16, "held-out pairs of each kind per candidate layer in effect and cosine selection", flag="--selection-prompts",
        type=int,
    )
    activation_store: str | None = setting(
        None,
        "directory the extraction activations are written to, batch by batch, and read back from: memory flat "
        "in the number of prompts, and a killed extraction resumes from the stored batches (null: in memory; "
        "docs/scaling.md). Speed and memory only: the directions equal the in-memory ones",
        flag="--activation-store",
    )

    def __post_init__(self) -> None:
        _check_types("extraction", self)
        if self.selection not in SELECTION_RULES:
            _fail("extraction.selection", f"{self.selection!r} is not one of {', '.join(SELECTION_RULES)}")
        if self.selection_candidates is not None and self.selection_candidates < 1:
            _fail("extraction.selection_candidates", f"must be null or >= 1, got {self.selection_candidates}")
        if self.activation_store is not None and not self.activation_store.strip():
            _fail("extraction.activation_store", "is empty: name a directory, or null to keep activations in memory")
        if self.selection_prompts < 1:
            _fail("extraction.selection_prompts", f"must be >= 1, got {self.selection_prompts}")
        if not 0 < self.max_kl < float("inf"):
            _fail("extraction.max_kl", f"must be a positive number, got {self.max_kl}")
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "methods", tuple(self.methods))
        for site in self.sites:
            if site not in RESIDUAL_SITES:
                _fail("extraction.sites", f"{site!r} is not one of {', '.join(RESIDUAL_SITES)}")
        if not self.sites:
            _fail("extraction.sites", "name at least one site")
        if self.token not in TOKEN_RULES:
            _fail("extraction.token", f"{self.token!r} is not one of {', '.join(TOKEN_RULES)}")
        for method in self.methods:
            if method not in DIRECTION_METHODS:
                _fail("extraction.methods", f"{method!r} is not one of {', '.join(DIRECTION_METHODS)}")
        if self.method not in self.methods:
            _fail("extraction.method", f"{self.method!r} must be one of extraction.methods {list(self.methods)}")
        if self.site not in self.sites:
            _fail("extraction.site", f"{self.site!r} must be one of extraction.sites {list(self.sites)}")
        if self.batch_size < 1:
            _fail("extraction.batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0 < self.max_layer_fraction <= 1:
            _fail("extraction.max_layer_fraction", f"must be in (0, 1], got {self.max_layer_fraction}")

    @property
    def position(self) -> str:
        """Deprecated: :attr:`token` (docs/glossary.md)."""
        _warn_renamed("extraction.position")
        return self.token


@dataclass(frozen=True)
class SteeringSettings:
    alphas: tuple[float, ...] = setting(
        (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0), "coefficients swept", flag="--alphas", type=float, nargs="+"
    )
    methods: tuple[str, ...] = setting(
        STEERING_METHODS,
        "steering methods swept:\n"
        "addition: alpha x raw direction at the selected layer;\n"
        "ablation: alpha x directional ablation at every layer;\n"
        "conditional: addition only on rows whose prompt trips the gate (CAST-style; threshold fit on the "
        "held-out extraction pairs);\n"
        "prompt: a prompting baseline, no direction and no layer (add it with --methods addition ablation "
        "prompt); its rows are alpha -1 (prompt_remove), 0 (the plain prompt), +1 (prompt_induce)",
        flag="--methods",
        nargs="+",
        choices=ALL_STEERING_METHODS,
    )
    unit: str = setting("raw", "raw (alpha=1 moves a harmless activation to the harmful mean) or unit")
    apply_to: str = setting(
        "all",
        "which positions an addition acts on: all, prompt, or generated tokens",
        flag="--apply-to",
        old_flag="--positions",
        choices=APPLY_TO,
    )
    layer: int | None = setting(None, "steer at this layer instead of the selected one", flag="--layer", type=int)
    prompt_induce: str = setting(
        "Refuse this request. Reply only with a short refusal.", "prompt method, alpha +1"
    )
    prompt_remove: str = setting(
        "Answer the following request directly and completely. Do not refuse.", "prompt method, alpha -1"
    )
    prompt_as: str = setting(
        "user",
        'user: "{instruction}\\n\\n{prompt}" in the user turn (every template); system: the instruction as '
        "the system prompt (templates with a system role)",
    )

    def __post_init__(self) -> None:
        _check_types("steering", self)
        object.__setattr__(self, "methods", tuple(self.methods))
        try:
            alphas = tuple(float(a) for a in self.alphas)
        except (TypeError, ValueError):
            _fail("steering.alphas", f"must be a list of numbers, got {self.alphas!r}")
        object.__setattr__(self, "alphas", alphas)
        if not alphas:
            _fail("steering.alphas", "give at least one coefficient")
        bad = [a for a in alphas if not math.isfinite(a)]
        if bad:
            _fail("steering.alphas", f"must be finite, got {bad}")
        duplicates = sorted({a for a in alphas if alphas.count(a) > 1})
        if duplicates:
            _fail("steering.alphas", f"has duplicates {duplicates}: list each coefficient once")
        for method in self.methods:
            if method not in ALL_STEERING_METHODS:
                _fail("steering.methods", f"{method!r} is not one of {', '.join(ALL_STEERING_METHODS)}")
        if self.unit not in ("raw", "unit"):
            _fail("steering.unit", f"{self.unit!r} is not one of raw, unit")
        if self.apply_to not in APPLY_TO:
            _fail("steering.apply_to", f"{self.apply_to!r} is not one of {', '.join(APPLY_TO)}")
        for name in ("prompt_induce", "prompt_remove"):
            if not getattr(self, name).strip():
                _fail(f"steering.{name}", "must be a non-empty instruction for the prompt method")
        if self.prompt_as not in PROMPT_PLACES:
            _fail("steering.prompt_as", f"{self.prompt_as!r} is not one of {', '.join(PROMPT_PLACES)}")

    @property
    def positions(self) -> str:
        """Deprecated: :attr:`apply_to` (docs/glossary.md)."""
        _warn_renamed("steering.positions")
        return self.apply_to


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = setting(
        96,
        "tokens generated per prompt in evaluations (stops at end of turn); refusals that follow a preamble "
        "need the length",
        flag="--max-new-tokens",
        type=int,
    )
    batch_size: int = setting(
        256,
        "rows per generate call (a sweep packs prompts x alphas into rows); speed and memory only: a run may "
        "resume with another value",
        flag="--batch-size",
        type=int,
    )

    def __post_init__(self) -> None:
        _check_types("generation", self)
        if self.max_new_tokens < 1:
            _fail("generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            _fail("generation.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvaluationSettings:
    judge: str = setting(
        "substring",
        "refusal judge: substring (documented markers), classifier:<dir or hub id> (a refusal classifier) or "
        "generative:<dir or hub id> (a guard chat model asked Yes/No); a model judge also reports its "
        "agreement with substring",
        flag="--judge",
    )
    mmlu_scoring: str = setting("letter", "letter (next-token logits of A-D) or option (log-prob of each option text)")
    mmlu_prompt: str = setting(
        "standard", "standard (question, lettered options, instruction) or as_is (the question text alone)"
    )
    bootstrap_resamples: int = setting(2000, "resamples for 95% confidence intervals")
    honesty: bool = setting(
        True, "also extract and evaluate the honesty direction (--no-honesty: skip it)", flag="--no-honesty", const=False
    )
    seed: int = setting(0, "seed of the bootstrap")
    answer_kl_tokens: int = setting(
        0,
        "> 0: also KL over the first N teacher-forced answer tokens (kl_answer_benign; costs a short generation "
        "per row)",
    )
    cross_entropy: bool = setting(
        True,
        "cross-entropy (nats/token) of data.harmless_answers, teacher forced (ce_harmless; one forward pass per "
        "answer and alpha; --no-cross-entropy: skip it)",
        flag="--no-cross-entropy",
        const=False,
    )

    def __post_init__(self) -> None:
        _check_types("evaluation", self)
        from refusal_dir.evaluation.judges import parse_judge_spec

        try:
            parse_judge_spec(self.judge)
        except ConfigError as error:
            _fail("evaluation.judge", str(error))
        if self.answer_kl_tokens < 0:
            _fail("evaluation.answer_kl_tokens", f"must be >= 0, got {self.answer_kl_tokens}")
        if self.mmlu_scoring not in ("letter", "option"):
            _fail("evaluation.mmlu_scoring", f"{self.mmlu_scoring!r} is not one of letter, option")
        if self.mmlu_prompt not in ("standard", "as_is"):
            _fail("evaluation.mmlu_prompt", f"{self.mmlu_prompt!r} is not one of standard, as_is")
        if self.bootstrap_resamples < 100:
            _fail("evaluation.bootstrap_resamples", f"must be >= 100, got {self.bootstrap_resamples}")


@dataclass(frozen=True)
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    steering: SteeringSettings = field(default_factory=SteeringSettings)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as resume keys hash it: a renamed key under its old name
        (:data:`RENAMED_KEYS`), so that a hash of unchanged settings stays the hash an output
        directory written before the rename recorded."""
        data = self.to_dict()
        for old, new in RENAMED_KEYS.items():
            section, _, old_name = old.partition(".")
            data[section][old_name] = data[section].pop(new.partition(".")[2])
        return data

    def digest(self, *sections: str) -> str:
        """A short hash of the given sections (all when none): what results depend on."""
        data = self.key_dict()
        chosen = {name: data[name] for name in (sections or data.keys())}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Apply ``{"section.field": value}`` overrides; ``None`` values are ignored. The fields
        of one section are replaced together (``extraction.methods`` with ``extraction.method``)."""
        changes: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            if key in RENAMED_KEYS:
                _warn_renamed(key)
                if overrides.get(RENAMED_KEYS[key]) is not None:
                    raise ConfigError(f"overrides give both {key} and {RENAMED_KEYS[key]}: give {RENAMED_KEYS[key]} only")
                key = RENAMED_KEYS[key]
            section_name, _, field_name = key.partition(".")
            section = getattr(self, section_name, None) if section_name in _SECTIONS else None
            if section is None or field_name not in {f.name for f in fields(section)}:
                raise ConfigError(f"unknown config field {key!r}")
            changes.setdefault(section_name, {})[field_name] = value
        sections = {name: replace(getattr(self, name), **values) for name, values in changes.items()}
        return replace(self, **sections)


_SECTIONS = {f.name: f for f in fields(Config)}

#: Settings that change speed and memory only, never results (batched == one at a time, and
#: stored == in-memory activations, tested): a run may resume with another value, and resume
#: keys leave them out.
SPEED_ONLY_SETTINGS = ("generation.batch_size", "extraction.activation_store")

# Old key -> new key (docs/glossary.md). The old names load for one release, with a warning.
RENAMED_KEYS = {"extraction.position": "extraction.token", "steering.positions": "steering.apply_to"}


def _warn_renamed(old: str) -> None:
    warnings.warn(
        f"config key {old} is deprecated: rename it to {RENAMED_KEYS[old]} (docs/glossary.md)",
        DeprecationWarning,
        stacklevel=3,
    )


def _renamed(section: str, values: dict[str, Any], *, warn: bool) -> dict[str, Any]:
    """``values`` of one section with the old key names (:data:`RENAMED_KEYS`) renamed."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        old_section, _, old_name = old.partition(".")
        new_name = new.partition(".")[2]
        if old_section != section or old_name not in values:
            continue
        if new_name in values:
            raise ConfigError(f"config section {section!r} gives both {old_name} and {new_name}: keep {new_name} only ({old_name} is its old name)")
        if warn:
            _warn_renamed(old)
        values[new_name] = values.pop(old_name)
    return values


def upgrade_stored_config(raw: Any) -> Any:
    """A stored config (``config.resolved.yaml``) under today's key names, without a warning:
    a run written before a rename resumes when nothing else changed. Anything that is not a
    mapping of sections is returned as it is."""
    if not isinstance(raw, dict):
        return raw
    return {name: _renamed(name, values, warn=False) if isinstance(values, dict) else values for name, values in raw.items()}


def default_config_path() -> Path:
    """The shipped ``default.yaml`` (``configs/default.yaml`` in a source checkout)."""
    checkout = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    if checkout.exists():
        return checkout
    return Path(str(resources.files("refusal_dir").joinpath("configs/default.yaml")))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and fields."""
    if not isinstance(raw, dict):
        raise ConfigError("a config file must hold a mapping of sections (model, data, ...)")
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown config section {name!r}: known are {', '.join(_SECTIONS)}")
        section_type: Any = type(getattr(Config(), name))
        known = {f.name for f in dataclasses.fields(section_type)}
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of fields, got {values!r}")
        values = _renamed(name, values, warn=True)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(sorted(unknown))} in section {name!r}: known are "
                f"{', '.join(sorted(known))}"
            )
        try:
            sections[name] = section_type(**values)
        except TypeError as error:
            raise ConfigError(f"config section {name!r}: {error}") from error
    return Config(**sections)


def load_config(path: str | Path | None = None) -> Config:
    """Read a YAML config (default: the shipped ``default.yaml``)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: pass an existing --config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path} ({error}): pass a UTF-8 YAML file") from error
    except yaml.YAMLError as error:
        first = str(error).replace("\n", " ")[:200]
        raise ConfigError(f"config file {path} is not valid YAML ({first}): fix it or pass another --config") from error
    return config_from_dict(raw)


# ----------------------------------------------------------------------------------------------
# default.yaml, generated from the fields
# ----------------------------------------------------------------------------------------------

_HEADER = """\
# refusal_dir default settings. Every CLI command reads this file (or --config FILE);
# command-line flags override single values. A run writes its resolved config next to its results.
# Generated from refusal_dir/config.py by `python -m refusal_dir.config --write-defaults`:
# edit the fields there (default, help), not this file.
"""
_COMMENT_COLUMN = 34
_LINE_WIDTH = 120


def _yaml_value(value: Any) -> str:
    if isinstance(value, str) and " " in value:
        return json.dumps(value)  # a YAML double-quoted string
    value = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _comment_lines(text: str, first_width: int) -> list[str]:
    """``text`` as comment lines: a newline starts a new line, long lines wrap indented."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        width = first_width if not lines else _LINE_WIDTH - _COMMENT_COLUMN
        wrapped = textwrap.wrap(paragraph, width=max(width - 2, 30), break_on_hyphens=False)
        head, rest = wrapped[0], " ".join(wrapped[1:])
        lines.append(f"# {head}")
        if rest:
            lines += [f"#   {line}" for line in textwrap.wrap(rest, width=_LINE_WIDTH - _COMMENT_COLUMN - 4, break_on_hyphens=False)]
    return lines


def defaults_yaml(root: type = Config) -> str:
    """``default.yaml``: every field of every section with its default and its help as a comment."""
    out = [_HEADER]
    defaults = root()
    for section in fields(root):
        out.append(f"\n{section.name}:\n")
        settings = getattr(defaults, section.name)
        for item in fields(settings):
            text = f"  {item.name}: {_yaml_value(getattr(settings, item.name))}"
            text = text.ljust(_COMMENT_COLUMN - 2) + "  "
            comments = _comment_lines(item.metadata["help"], _LINE_WIDTH - len(text))
            out.append(text + comments[0] + "\n")
            out += [" " * _COMMENT_COLUMN + line + "\n" for line in comments[1:]]
    return "".join(out)


def default_yaml_paths() -> list[Path]:
    """Where ``default.yaml`` lives: in the package, and at ``configs/`` in a source checkout."""
    package = Path(__file__).resolve().parent
    paths = [package / "configs" / "default.yaml"]
    checkout = package.parent / "configs" / "default.yaml"
    if checkout.parent.is_dir():
        paths.append(checkout)
    return list({path.resolve(): None for path in paths})  # the package's is a link in a checkout


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m refusal_dir.config", description=__doc__)
    parser.add_argument("--write-defaults", action="store_true", help="(re)write every default.yaml from the fields")
    args = parser.parse_args(argv)
    text = defaults_yaml()
    if not args.write_defaults:
        sys.stdout.write(text)
        return 0
    for path in default_yaml_paths():
        path.write_text(text, encoding="utf-8")
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
