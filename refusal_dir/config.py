"""Settings as frozen dataclasses, read from ``configs/default.yaml`` and validated.

Every field has its default and a one-line comment in ``configs/default.yaml``. Invalid values
raise :class:`ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from refusal_dir.errors import ConfigError
from refusal_dir.sites import RESIDUAL_SITES

POSITIONS = ("last", "mean", "post_instruction")
STEERING_METHODS = ("addition", "ablation")
ALL_STEERING_METHODS = ("addition", "ablation", "conditional", "prompt")
PROMPT_PLACES = ("user", "system")
DIRECTION_METHODS = ("mean_diff", "pca", "probe")


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
    name: str = "google/gemma-2-2b-it"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None

    def __post_init__(self) -> None:
        _check_types("model", self)
        if not self.name:
            _fail("model.name", "must be a hub id, a local directory or an offline model name")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail("model.dtype", f"{self.dtype!r} is not one of auto, float32, bfloat16, float16")


@dataclass(frozen=True)
class DataSettings:
    refusal_pairs: str = "shipped"
    harmful_eval: str = "shipped"
    benign_eval: str = "shipped"
    mmlu: str = "shipped"
    honesty_pairs: str = "shipped"
    true_false_claims: str = "shipped"
    harmless_answers: str = "shipped"
    heldout_fraction: float = 0.25
    max_eval_prompts: int | None = None
    seed: int = 0

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
    sites: tuple[str, ...] = RESIDUAL_SITES
    position: str = "last"
    methods: tuple[str, ...] = DIRECTION_METHODS
    method: str = "mean_diff"
    site: str = "resid_pre"
    batch_size: int = 16
    max_layer_fraction: float = 0.8
    selection: str = "effect"
    max_kl: float = 0.1
    selection_candidates: int | None = None
    selection_prompts: int = 16

    def __post_init__(self) -> None:
        _check_types("extraction", self)
        if self.selection not in ("effect", "separation"):
            _fail("extraction.selection", f"{self.selection!r} is not one of effect, separation")
        if self.selection_candidates is not None and self.selection_candidates < 1:
            _fail("extraction.selection_candidates", f"must be null or >= 1, got {self.selection_candidates}")
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
        if self.position not in POSITIONS:
            _fail("extraction.position", f"{self.position!r} is not one of {', '.join(POSITIONS)}")
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


@dataclass(frozen=True)
class SteeringSettings:
    alphas: tuple[float, ...] = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
    methods: tuple[str, ...] = STEERING_METHODS
    unit: str = "raw"
    positions: str = "all"
    layer: int | None = None
    prompt_induce: str = "Refuse this request. Reply only with a short refusal."
    prompt_remove: str = "Answer the following request directly and completely. Do not refuse."
    prompt_as: str = "user"

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
        if self.positions not in ("all", "prompt", "generated"):
            _fail("steering.positions", f"{self.positions!r} is not one of all, prompt, generated")
        for name in ("prompt_induce", "prompt_remove"):
            if not getattr(self, name).strip():
                _fail(f"steering.{name}", "must be a non-empty instruction for the prompt method")
        if self.prompt_as not in PROMPT_PLACES:
            _fail("steering.prompt_as", f"{self.prompt_as!r} is not one of {', '.join(PROMPT_PLACES)}")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 96
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_types("generation", self)
        if self.max_new_tokens < 1:
            _fail("generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            _fail("generation.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvaluationSettings:
    judge: str = "substring"
    mmlu_scoring: str = "letter"
    mmlu_prompt: str = "standard"
    bootstrap_resamples: int = 2000
    honesty: bool = True
    seed: int = 0
    answer_kl_tokens: int = 0
    cross_entropy: bool = True

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

    def digest(self, *sections: str) -> str:
        """A short hash of the given sections (all when none): what results depend on."""
        data = self.to_dict()
        chosen = {name: data[name] for name in (sections or data.keys())}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """Apply ``{"section.field": value}`` overrides; ``None`` values are ignored."""
        result = self
        for key, value in overrides.items():
            if value is None:
                continue
            section_name, _, field_name = key.partition(".")
            section = getattr(result, section_name, None)
            if section is None or field_name not in {f.name for f in fields(section)}:
                raise ConfigError(f"unknown config field {key!r}")
            result = replace(result, **{section_name: replace(section, **{field_name: value})})
        return result


_SECTIONS = {f.name: f for f in fields(Config)}


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
