"""``Steer``: one steering spec, turned into interventions at any coefficient.

A :class:`Steer` says what to steer with and how (method, directions, whose layer, which token
label, where, which positions); :meth:`Steer.at` gives the interventions for one coefficient or
one per batch row. It is the only place a method name becomes interventions: the sweep, ``tune``,
the CLI's ``steer`` command and layer selection all build their interventions through it::

    spec = Steer("addition", directions, layer=14)
    with steer(model, *spec.at(2.0)):
        ...
    generate(model, prompts * 3, interventions=spec.at([0.0] * n + [1.0] * n + [2.0] * n))

Methods (the words are those of docs/glossary.md):

* ``addition``: ``alpha`` x the direction of ``layer`` (read at ``token``), added at ``at_layers``
  (default: ``layer``) to the ``apply_to`` positions;
* ``ablation``: directional ablation of that direction at every layer (or ``at_layers``);
  ``alpha`` 1 removes the component, 0 is the unsteered model; given a
  :class:`~refusal_dir.subspace.Subspace`, of that layer's ``k``-dimensional subspace;
* ``conditional``: the addition, only on rows whose prompt trips ``condition`` (fit with
  :func:`refusal_dir.conditional.fit_condition`); :meth:`Steer.at` needs the model and the
  rows' prompts to gate;
* ``prompt``: no direction; an instruction asking for the behaviour, at alpha +1 (refuse) or
  -1 (answer), none at 0. :meth:`Steer.prompted` gives the rows' chat-formatted texts;
  :meth:`Steer.at` gives no intervention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from refusal_dir.conditional import Condition, conditional_addition
from refusal_dir.directions import DirectionSet
from refusal_dir.errors import ConfigError
from refusal_dir.interventions import Alpha, Intervention, ablation, addition
from refusal_dir.subspace import Subspace

if TYPE_CHECKING:
    from refusal_dir.model import HookedModel

STEER_METHODS = ("addition", "ablation", "conditional", "prompt")

PROMPT_ALPHAS = (-1.0, 0.0, 1.0)
"""The coefficients of the ``prompt`` method: -1 asks the model to answer everything, 0 is the
plain prompt, +1 asks it to refuse."""

DEFAULT_INDUCE = "Refuse this request. Reply only with a short refusal."
DEFAULT_REMOVE = "Answer the following request directly and completely. Do not refuse."


@dataclass(frozen=True)
class PromptInstructions:
    """The ``prompt`` method's instructions, and where they go.

    ``placement``: ``user`` puts ``"{instruction}\\n\\n{prompt}"`` in the user turn (every chat
    template has one); ``system`` makes the instruction the system prompt, after the model's own
    if it has one (a template without a system role raises :class:`ConfigError`).
    """

    induce: str = DEFAULT_INDUCE
    remove: str = DEFAULT_REMOVE
    placement: str = "user"

    def __post_init__(self) -> None:
        for name in ("induce", "remove"):
            text = getattr(self, name)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"the prompt method's {name} instruction must be a non-empty string, got {text!r}")
        if self.placement not in ("user", "system"):
            raise ConfigError(f"prompt placement {self.placement!r} is not one of user, system")

    def for_alpha(self, alpha: float) -> str | None:
        """The instruction of a row (None: the plain prompt)."""
        if alpha == 0.0:
            return None
        if alpha == 1.0:
            return self.induce
        if alpha == -1.0:
            return self.remove
        raise ConfigError(f"the prompt method has coefficients -1, 0 and 1 only, got {alpha:g}")


@dataclass(frozen=True)
class Steer:
    """One steering spec (module docstring). Frozen: derive variants with ``dataclasses.replace``."""

    method: str
    directions: DirectionSet | Subspace | Tensor | None = None
    #: Whose direction: the layer it was read at.
    layer: int | None = None
    #: Which direction-set label (the prompt token it was read at); None: the set's last.
    token: str | int | None = None
    #: Where it acts; None: ``(layer,)`` for an addition, every layer for an ablation.
    at_layers: tuple[int, ...] | None = None
    #: Which positions of the sequence it acts on: all, prompt or generated.
    apply_to: str = "all"
    site: str = "resid_pre"
    unit: str = "raw"
    #: The gate of ``conditional``.
    condition: Condition | None = None
    instructions: PromptInstructions = field(default_factory=PromptInstructions)

    def __post_init__(self) -> None:
        if self.method not in STEER_METHODS:
            raise ConfigError(f"unknown steering method {self.method!r}: choose one of {', '.join(STEER_METHODS)}")
        if self.at_layers is not None:
            object.__setattr__(self, "at_layers", tuple(int(x) for x in self.at_layers))
        if self.method == "prompt":
            if self.directions is not None:
                raise ConfigError("the prompt method steers with instructions: give it no directions")
            return
        if self.directions is None:
            raise ConfigError(f"{self.method} needs directions (a DirectionSet or a tensor)")
        if isinstance(self.directions, (DirectionSet, Subspace)) and self.layer is None and not self.at_layers:
            raise ConfigError(f"{self.method} with a {type(self.directions).__name__} needs layer= (whose direction)")
        if isinstance(self.directions, Subspace) and self.method != "ablation":
            raise ConfigError(f"{self.method} adds one direction: steer it with a DirectionSet (a Subspace ablates)")
        if self.method == "conditional" and self.condition is None:
            raise ConfigError("conditional steering needs condition= (refusal_dir.conditional.fit_condition)")

    @property
    def direction_free(self) -> bool:
        """True for the ``prompt`` method: rows differ by their text, not by a hook."""
        return self.method == "prompt"

    def at(
        self,
        alpha: Alpha,
        *,
        model: HookedModel | None = None,
        prompts: Sequence[str] | None = None,
    ) -> list[Intervention]:
        """The interventions at ``alpha`` (one value, or one per batch row).

        ``conditional`` gates each row by its prompt: pass the model and the rows' prompts (the
        texts as given to ``generate``, one per coefficient).
        """
        if self.method == "prompt":
            values = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
            for value in values:
                self.instructions.for_alpha(float(value))
            return []
        if self.method == "ablation":
            return [
                ablation(
                    self.directions,  # type: ignore[arg-type]
                    layer=self.layer, token=self.token, at_layers=self.at_layers,
                    apply_to=self.apply_to, alpha=alpha,
                )
            ]
        keywords = dict(
            layer=self.layer, token=self.token, at_layers=self.at_layers, site=self.site,
            unit=self.unit, apply_to=self.apply_to,
        )
        if self.method == "addition":
            return [addition(self.directions, alpha=alpha, **keywords)]  # type: ignore[arg-type]
        if model is None or prompts is None:
            raise ConfigError("conditional steering gates each row by its prompt: pass model= and prompts=")
        coefficients = [float(alpha)] * len(prompts) if isinstance(alpha, (int, float)) else alpha
        return [
            conditional_addition(
                model, prompts, self.condition, self.directions,  # type: ignore[arg-type]
                alpha=coefficients, **keywords,  # type: ignore[arg-type]
            )
        ]

    def prompted(self, model: HookedModel, prompts: Sequence[str], alphas: Sequence[float]) -> list[str]:
        """The chat-formatted text of each row of the ``prompt`` method: ``prompts[i]`` with the
        instruction of ``alphas[i]`` (:class:`PromptInstructions`)."""
        if self.method != "prompt":
            raise ConfigError(f"{self.method} steers with hooks: format the prompts as usual")
        if len(prompts) != len(alphas):
            raise ConfigError(f"{len(alphas)} coefficients for {len(prompts)} prompts: give one per prompt")
        texts = []
        for prompt, alpha in zip(prompts, alphas, strict=True):
            instruction = self.instructions.for_alpha(float(alpha))
            if instruction is None:
                texts += model.format_prompts([prompt])
            elif self.instructions.placement == "user":
                texts += model.format_prompts([self.prompted_request(prompt, alpha)])
            else:
                own = model.system_prompt
                texts += model.format_prompts([prompt], system=instruction if not own else f"{own}\n\n{instruction}")
        return texts

    def prompted_request(self, prompt: str, alpha: float) -> str:
        """The user turn of a ``prompt`` row with ``placement: user`` (the request alone at 0)."""
        instruction = self.instructions.for_alpha(float(alpha))
        return prompt if instruction is None else f"{instruction}\n\n{prompt}"


def tile(items: Sequence[object], alphas: Sequence[float]) -> tuple[list, list[float]]:
    """Alpha-major rows: every item once per alpha, and each row's coefficient."""
    return [item for _ in alphas for item in items], [float(alpha) for alpha in alphas for _ in items]
