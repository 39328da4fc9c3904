"""What ``saeforge steer`` runs, as a plain function of a request: the command line calls it here,
or ships it as one Ray task to a cluster (``--address``), where the model sits next to the
accelerators. ``prepare`` does everything that can be checked before a model's weights load."""

from __future__ import annotations

from dataclasses import dataclass, field

from activation_cache.text import check_source
from interp.audit import AuditResult, audit, audit_text, logit_lens_refusal, resolve_targets
from interp.observe import open_observer
from interp.steering import ErrorTerm, FeatureEdit, GenerationSettings, Mode, Steerer, SteerResult

__all__ = ["AuditSettings", "SteerOutcome", "SteerRequest", "prepare", "run_steer"]


@dataclass(frozen=True)
class AuditSettings:
    """``--audit``: where and how widely the steer is audited."""

    text: str | None = None
    """A text source (file, folder, ``packaged:...``); None: the run's held-out text."""
    max_tokens: int = 4096
    targets: tuple[str, ...] = ()
    """Target token strings; empty: the tokens each feature's decoder direction promotes most."""
    seeds: int = 5
    """Sampled continuations of each prompt per variant, seeds 0..seeds-1."""


@dataclass(frozen=True)
class SteerRequest:
    """One ``saeforge steer``."""

    uri: str
    features: tuple[int, ...]
    value: str
    """A number (raw activation units) or ``<N>x`` (times each feature's held-out maximum)."""
    prompts: tuple[str, ...]
    mode: Mode = "clamp"
    error_term: ErrorTerm = "keep"
    chat: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    audit: AuditSettings | None = None
    model: str | None = None
    hookpoint: str | None = None
    s3_options: dict | None = None


@dataclass(frozen=True)
class SteerOutcome:
    steer: SteerResult
    audit: AuditResult | None


def prepare(request: SteerRequest) -> tuple[Steerer, FeatureEdit, list[list[int]]]:
    """The steerer, the checked edit and the prompts' token ids: the dictionary, the model's
    files, the features, the value, every prompt, the audit's targets and text source checked;
    the model's weights not loaded."""
    steerer = Steerer(open_observer(request.uri, model=request.model, hookpoint=request.hookpoint,
                                    s3_options=request.s3_options))
    edit = steerer.edit(request.features, request.value, mode=request.mode, error_term=request.error_term)
    prompt_ids = [steerer.observer.token_ids(p, chat=request.chat) for p in request.prompts]
    if request.audit is not None:
        if request.audit.targets:
            resolve_targets(steerer.observer, list(request.audit.targets))
        elif (refusal := logit_lens_refusal(steerer.observer)) is not None:
            raise ValueError(refusal)
        if request.audit.text is not None:
            check_source(request.audit.text)
    return steerer, edit, prompt_ids


def run_steer(request: SteerRequest, prepared: tuple[Steerer, FeatureEdit, list[list[int]]] | None = None) -> SteerOutcome:
    """The prompts continued with and without the edit, and the audit if asked for; ``prepared``
    is ``prepare(request)``'s result where the caller has it already (here, not across Ray)."""
    steerer, edit, prompt_ids = prepared if prepared is not None else prepare(request)
    steered = steerer.steer(list(request.prompts), edit, request.generation, chat=request.chat)
    if request.audit is None:
        return SteerOutcome(steered, None)
    settings = request.audit
    text = audit_text(steerer.observer, text=settings.text, max_tokens=settings.max_tokens)
    result = audit(steerer, edit, text, targets=list(settings.targets) or None, prompts=prompt_ids,
                   seeds=settings.seeds, max_new_tokens=request.generation.max_new_tokens)
    return SteerOutcome(steered, result)
