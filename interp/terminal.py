"""Results as lines for the terminal: observations (a header saying what measured the tokens, then
a row per token) and steered continuations (side by side with the unedited ones)."""

from __future__ import annotations

import textwrap

from interp.observe import Observations, TokenObservation
from interp.steering import SteerResult

_TOKEN_WIDTH = 16


def _token(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= _TOKEN_WIDTH else shown[: _TOKEN_WIDTH - 2] + "…'"


def _baseline_line(obs: Observations) -> str:
    b = obs.baseline
    if b.source == "held-out":
        return f"baseline    held-out mean and variance the training recorded ({b.n_tokens:,} tokens, total variance {b.total_variance:.4g})"
    return (f"baseline    computed on the {b.n_tokens:,} observed tokens (total variance {b.total_variance:.4g}): "
            "the dictionary records no held-out mean and variance")


def _row(token: TokenObservation, feature: int | None) -> str:
    head = f"{token.position:5d}  {_token(token.token):<{_TOKEN_WIDTH}}"
    if not token.encoded:
        return f"{head}  left out, as in training"
    relative = "n/a" if token.relative_error is None else f"{token.relative_error:8.3f}"
    figures = f"{token.error_norm:9.4g}  {relative:>8}  {token.l0:4d}"
    if feature is not None:
        return f"{head}  {token.activation:10.4g}  {figures}"
    features = "  ".join(f"{i}:{a:.3g}" for i, a in token.features)
    return f"{head}  {figures}  {features}"


def format_observations(obs: Observations) -> str:
    """The whole result as text, one row per token."""
    lines = [
        f"dictionary  {obs.dictionary}  ({obs.n_latents:,} features at {obs.hookpoint} of {obs.model})",
        _baseline_line(obs),
    ]
    figures = f"{'err norm':>9}  {'rel err':>8}  {'L0':>4}"
    if obs.feature is not None:
        columns = f"{'pos':>5}  {'token':<{_TOKEN_WIDTH}}  {f'feat {obs.feature}':>10}  {figures}"
    else:
        columns = f"{'pos':>5}  {'token':<{_TOKEN_WIDTH}}  {figures}  top {obs.top} features (id:activation)"
    for number, text in enumerate(obs.texts, start=1):
        preview = text.text if len(text.text) <= 60 else text.text[:59] + "…"
        lines += ["", f"text {number}: {preview!r}", columns]
        lines += [_row(token, obs.feature) for token in text.tokens]
    return "\n".join(lines) + "\n"


def _wrapped(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=False) or [""]
    return lines


def format_steer(result: SteerResult, width: int = 56) -> str:
    """Each prompt's two continuations side by side: unedited, steered."""
    features = ", ".join(f"{f} -> {v:.4g}" if result.mode == "clamp" else f"{f} {result.mode} {v:.4g}"
                         for f, v in zip(result.features, result.values, strict=True))
    decoding = "greedy" if result.seed is None else f"sampled, seed {result.seed}"
    lines = [
        f"dictionary  {result.dictionary}  (at {result.hookpoint})",
        f"edit        {result.mode}: {features}; error term {'kept' if result.error_term == 'keep' else 'dropped'}",
        f"decoding    {decoding}, up to {result.max_new_tokens} new tokens",
    ]
    for number, c in enumerate(result.continuations, start=1):
        left, right = _wrapped(c.unedited, width), _wrapped(c.steered, width)
        left += [""] * (len(right) - len(left))
        right += [""] * (len(left) - len(right))
        lines += ["", f"prompt {number}: {c.prompt!r}", f"{'unedited':<{width}} | steered", f"{'-' * width}-+-{'-' * width}"]
        lines += [f"{a:<{width}} | {b}" for a, b in zip(left, right, strict=True)]
    return "\n".join(lines) + "\n"
