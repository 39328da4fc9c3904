#!/usr/bin/env python
"""What the steer audit costs: one feature audited on 4,096 held-out tokens, in forward passes
past the hookpoint and in wall time, beside the bare forward over the same tokens.

The packaged model (SmolLM2-135M, GGUF) at the default hookpoint, with a TopK dictionary of the
default width: the newest trained one of the default run (``store/runs/*/dictionary/<hookpoint>``)
that records its feature maxima, or, where there is none (or with ``--dictionary untrained``), the
SAE's own initialisation written as a real dictionary folder with the held-out statistics a
training job records (activation moments and feature maxima, so ``10x`` resolves; taken on the
held-out sequences after the audited ones). The audit's cost does not depend on the weights'
values, but a trained dictionary gives a feature the audit means something for. The text is the
first ``--tokens`` of the default run's held-out sequences (the audit's own default text), the
feature the one ``interp.audit.choose_features`` picks on it (or ``--feature``).

One model load; after a warm-up (the bare forwards, and a one-sequence audit of two tokens per
continuation that runs every code path), ``--repeats`` rounds, the ways in rotating order:

* the bare forward to the hookpoint (the ``ActivationHarvester`` of the same model) and to the
  logits (``model(ids)``), over the same sequences in the audit's batches;
* ``audit`` of an amplification (``--amplify``, a clamp, default 10x) and of a suppression (clamp
  to 0) of the feature, each with its defaults (continuations over 5 seeds, the dose-response for
  the amplification, the leak for the suppression), and each again with ``seeds=0`` (the passes
  over the text alone), which splits the time between the text and the continuations.

Reports median seconds, the audit as a multiple of the bare forward to the logits (the median of
each round's ratio) beside its own count of forward passes (``AuditResult.cost``), and where the
rest goes.

    .venv/bin/python benchmarks/bench_audit.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activation_cache.config import CacheConfig, DataConfig, ModelConfig  # noqa: E402
from activation_cache.eval_text import EvalText, held_out_text  # noqa: E402
from activation_cache.hooking import (  # noqa: E402
    ActivationHarvester,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.text import excluded_token_ids, pack_sequences  # noqa: E402
from benchmarks.common import (  # noqa: E402
    cpu_description,
    median_ratio,
    progress,
    timed,
    write_untrained_dictionary,
)
from benchmarks.results import write_block  # noqa: E402
from interp.audit import AuditResult, Cost, audit, audit_text, choose_features  # noqa: E402
from interp.loading import model_metadata  # noqa: E402
from interp.observe import open_observer  # noqa: E402
from interp.steering import FeatureEdit, Steerer  # noqa: E402
from trainer.activation_stats import ActivationStats, FeatureMaxima  # noqa: E402
from trainer.config import SAEConfig, TrainConfig  # noqa: E402
from trainer.layout import FEATURE_STATS_FILE, RUNS_DIR, dictionary_uri  # noqa: E402
from trainer.sae import TopKSAE  # noqa: E402

BATCH_TOKENS = 1024
"""Tokens per forward over the text, the audit's and the bare forwards' alike (audit's default)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens audited (whole sequences)")
    parser.add_argument("--dictionary", default=None,
                        help="a dictionary folder, or 'untrained' (default: the newest trained one of the default "
                             "run with feature maxima, else untrained)")
    parser.add_argument("--feature", type=int, default=None, help="default: interp.audit.choose_features's pick")
    parser.add_argument("--amplify", default="10x", help="the amplification's clamp value (raw or a multiple)")
    parser.add_argument("--seeds", type=int, default=None, help="continuations per prompt (default: the audit's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the audit's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python", "benchmarks/bench_audit.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    model_cfg, data_cfg = ModelConfig(dtype="float32"), DataConfig()
    source = resolve_model_source(model_cfg)
    (hookpoint,), (d_model,) = describe_model(source, [model_cfg.hookpoint])
    model = load_model(source, dtype=model_cfg.dtype)  # one model: the bare forwards and the audits run it
    harvester = ActivationHarvester(model, hookpoint)

    with tempfile.TemporaryDirectory(prefix="saeforge-bench-audit-") as tmp:
        folder = args.dictionary or trained_dictionary(hookpoint) or "untrained"
        text = None
        if folder == "untrained":
            folder = str(Path(tmp) / "untrained")
            text = write_untrained(Path(folder), harvester, source.model_id, model_cfg, data_cfg, args.tokens)
            described = (f"untrained (the SAE's initial weights, k {SAEConfig().k}, with held-out statistics "
                         "taken on the next held-out sequences)")
        else:
            described = f"trained, `{os.path.relpath(folder, ROOT)}`"
        observer = open_observer(folder, loaded_model=model)
        text = text or audit_text(observer, max_tokens=args.tokens)
        steerer = Steerer(observer)
        tokens = torch.as_tensor(np.asarray(text.tokens), dtype=torch.long)
        feature = args.feature if args.feature is not None else pick_feature(observer, tokens)
        edits = {"amplify": steerer.edit([feature], args.amplify), "suppress": steerer.edit([feature], 0.0)}
        progress(f"dictionary {folder}: feature {feature}, {tokens.shape[0]} x {tokens.shape[1]} tokens")
        options = {name: value for name, value in (("seeds", args.seeds), ("max_new_tokens", args.max_new_tokens))
                   if value is not None}
        load_before = os.getloadavg()[0]

        def write(result: dict) -> None:  # after every round: a run cut short still leaves its rounds
            result["load"] = (load_before, os.getloadavg()[0])
            block = report(result, command=command, started=started, model=source.model_id, dtype=model_cfg.dtype,
                           hookpoint=hookpoint, d_model=d_model, dictionary=described,
                           n_latents=observer.folder.n_latents, feature=feature, amplify=args.amplify, text=text)
            if args.write is not None:
                write_block(args.write, "bench_audit", block)
            result["block"] = block

        result = measure(steerer, harvester, tokens, edits, text_source=text.source, repeats=args.repeats,
                         after_round=write, **options)
    print(result["block"])


# --------------------------------------------------------------------------- the dictionary and the text


def trained_dictionary(hookpoint: str) -> str | None:
    """The newest dictionary at ``hookpoint`` of a default-run folder that records feature maxima
    (the repository's ``store/runs``)."""
    runs = Path(CacheConfig.uri) / RUNS_DIR
    found = [Path(dictionary_uri(str(run), hookpoint)) for run in (ROOT / runs).glob("*") if run.is_dir()]
    found = [f for f in found if (f / FEATURE_STATS_FILE).is_file()]
    if not found:
        return None
    return str(max(found, key=lambda f: (f / FEATURE_STATS_FILE).stat().st_mtime))


def default_held_out(tokenizer, data_cfg: DataConfig, max_tokens: int) -> EvalText:
    """The default run's held-out sequences, as ``audit_text`` reads them from a run config."""
    return held_out_text(
        pack_sequences(data_cfg, tokenizer), sequences_per_shard=CacheConfig.sequences_per_shard,
        holdout_fraction=TrainConfig.holdout_fraction, max_tokens=max_tokens,
        excluded=frozenset(excluded_token_ids(data_cfg, tokenizer)), source=data_cfg.source,
    )


def write_untrained(folder: Path, harvester: ActivationHarvester, model_name: str, model_cfg: ModelConfig,
                    data_cfg: DataConfig, n_tokens: int) -> EvalText:
    """An untrained dictionary folder with held-out statistics taken on the held-out sequences
    after the first ``n_tokens``; those first ones, the text to audit."""
    tokenizer = load_tokenizer(resolve_model_source(model_cfg))
    held = default_held_out(tokenizer, data_cfg, 2 * n_tokens)
    n = max(1, n_tokens // held.tokens.shape[1])
    if len(held.tokens) < 2 * n:
        raise ValueError(f"{held.source}: {len(held.tokens)} held-out sequences, fewer than the {2 * n} needed "
                         f"for {n} audited and {n} for the statistics")
    rest = torch.as_tensor(held.tokens[n: 2 * n], dtype=torch.long)
    with torch.inference_mode():
        acts = torch.cat([harvester(part) for part in rest.split(max(1, BATCH_TOKENS // rest.shape[1]))])
    excluded = torch.tensor(sorted(held.excluded_token_ids), dtype=torch.long)
    rows = acts[~torch.isin(rest, excluded)].float()
    sae = TopKSAE(rows.shape[1], SAEConfig().n_latents, SAEConfig().k, seed=0)
    maxima = FeatureMaxima(SAEConfig().n_latents)
    with torch.inference_mode():
        code = sae.encode(rows)
    maxima.update(code.acts, code.indices)
    write_untrained_dictionary(folder, sae, hookpoint=harvester.hookpoint, model_name=model_name,
                               metadata=model_metadata(model_cfg, data_cfg), stats=ActivationStats.of(rows),
                               feature_stats=maxima.result())
    return EvalText(held.tokens[:n], held.sequence_ids[:n], held.excluded_token_ids, held.source)


def pick_feature(observer, tokens: torch.Tensor) -> int:
    chosen = choose_features(observer, tokens, n=1)
    if not chosen:
        raise ValueError(f"{observer.folder.uri}: no live feature with clear promoted tokens on the audit text; "
                         "name one with --feature")
    return chosen[0]


# --------------------------------------------------------------------------- measuring


def measure(steerer: Steerer, harvester: ActivationHarvester, tokens: torch.Tensor, edits: dict[str, FeatureEdit],
            *, text_source: str, repeats: int, after_round: Callable[[dict], None], **options) -> dict:
    """Seconds of each way per round, and each audit's cost (the same every round: fixed seeds);
    ``options`` go to every full audit, ``after_round`` gets the result so far after each round."""
    model = steerer.model
    batches = tokens.split(max(1, BATCH_TOKENS // tokens.shape[1]))

    def full() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(ids)

    def to_hookpoint() -> None:
        with torch.inference_mode():
            for ids in batches:
                harvester(ids)

    costs: dict[str, Cost] = {}
    results: dict[str, AuditResult] = {}

    def audited(name: str, edit: FeatureEdit, **kwargs) -> Callable[[], None]:
        def run() -> None:
            results[name] = audit(steerer, edit, tokens, batch_tokens=BATCH_TOKENS, text_source=text_source, **kwargs)
            costs[name] = results[name].cost

        return run

    ways: dict[str, Callable[[], None]] = {"full": full, "hookpoint": to_hookpoint}
    for kind, edit in edits.items():
        ways[kind] = audited(kind, edit, **options)
        ways[f"{kind}, text"] = audited(f"{kind}, text", edit, seeds=0)
    full()
    to_hookpoint()
    for edit in edits.values():  # every code path once, on little: one sequence, two tokens per continuation
        audit(steerer, edit, tokens[:1], seeds=1, max_new_tokens=2, batch_tokens=BATCH_TOKENS)
    names = list(ways)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    result = {"seconds": seconds, "costs": costs, "results": results, "tokens": tuple(tokens.shape),
              "batches": len(batches), "rounds": 0}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            seconds[name].append(timed(ways[name]))
            progress(f"  round {i}: {name} {seconds[name][-1]:.1f} s")
        result["rounds"] = i + 1
        after_round(result)
    return result


# --------------------------------------------------------------------------- the report


def report(result: dict, *, command: str, started: str, model: str, dtype: str, hookpoint: str, d_model: int,
           dictionary: str, n_latents: int, feature: int, amplify: str, text: EvalText) -> str:
    s, costs, audits = result["seconds"], result["costs"], result["results"]
    n_sequences, context = result["tokens"]
    n_tokens = n_sequences * context
    med = {name: statistics.median(values) for name, values in s.items()}
    full = med["full"]
    a = audits["amplify"].features[0]
    title = {"amplify": f"audit, amplify (clamp {amplify} = {a.value:.4g})", "suppress": "audit, suppress (clamp 0)"}
    cost_table = [
        "| way | forward passes past the hookpoint | passes over the text | generated tokens | positions past the "
        "hookpoint | text-pass equivalents | median s | x bare forward to the logits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| bare forward to the hookpoint | 0 (stops there) | - | - | - | - | {med['hookpoint']:.2f} | "
        f"{median_ratio(s['hookpoint'], s['full']):.2f} |",
        f"| bare forward to the logits | {result['batches']} | 1 | 0 | {n_tokens:,} | 1.00 | {full:.2f} | 1.00 |",
    ]
    for kind in ("amplify", "suppress"):
        for name, label in ((kind, title[kind]), (f"{kind}, text", f"{title[kind]}, text only (`seeds=0`)")):
            c = costs[name]
            cost_table.append(
                f"| {label} | {c.forward_passes:,} | {c.text_passes} | {c.generated_tokens:,} | "
                f"{c.tokens_past_hookpoint:,} | {c.text_pass_equivalents:.2f} | {med[name]:.1f} | "
                f"{median_ratio(s[name], s['full']):.1f} |")
    split = [
        "| audit | total s | over the text s | its forwards to the logits s | the rest of the text part s | "
        "continuations s | continuations in text-pass equivalents: counted | timed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("amplify", "suppress"):
        total, text_only = s[kind], s[f"{kind}, text"]
        c, ct = costs[kind], costs[f"{kind}, text"]
        forwards = ct.text_passes * full
        rest = statistics.median(t - ct.text_passes * f for t, f in zip(text_only, s["full"], strict=True))
        continuations = statistics.median(t - u for t, u in zip(total, text_only, strict=True))
        counted = (c.tokens_past_hookpoint - ct.tokens_past_hookpoint) / n_tokens
        split.append(f"| {kind} | {med[kind]:.1f} | {med[f'{kind}, text']:.1f} | {forwards:.1f} | {rest:+.1f} | "
                     f"{continuations:.1f} | {counted:.2f} | {continuations / full:.1f} |")
    return "\n".join([
        f"Run {started}, `{command}`: {model} ({dtype}), hookpoint `{hookpoint}` (d_model {d_model}); dictionary "
        f"{dictionary}: {n_latents:,} latents; feature {feature}; text: {n_sequences} x {context} = {n_tokens:,} "
        f"tokens of the {text.source}, forwards of {BATCH_TOKENS:,} tokens. Audit defaults: continuations of "
        f"{len(audits['amplify'].seeds)} seeds x {a.continuations.n_prompts if a.continuations else 0} prompts x "
        f"{a.continuations.max_new_tokens if a.continuations else 0} tokens, the dose-response "
        f"({len(a.dose_response.points) if a.dose_response else 0} doses) for the amplification, the leak for the "
        f"suppression. {torch.get_num_threads()} torch threads on {cpu_description()}; load average "
        f"{result['load'][0]:.1f} before, {result['load'][1]:.1f} after. Median of {result['rounds']} rounds "
        "after a warm-up, the ways interleaved in rotating order; a multiple is the median of each round's ratio.",
        "",
        *cost_table,
        "",
        "Where each audit's time goes (medians over the rounds): over the text is the same audit with `seeds=0`; "
        "its forwards to the logits are its passes over the text times the bare forward; the rest of the text part "
        "is that audit less those forwards, per round (the pre-pass to the hookpoint for the dashboard, the SAE "
        "encodes inside every edited pass, log-softmax, KL and the target sums); continuations is the full audit "
        "less the text-only one (sampling one token at a time with the KV cache, and scoring each continuation), "
        "in text-pass equivalents as the cost counts their positions and as their time is worth in bare forwards.",
        "",
        *split,
        "",
        *(f"Audit summary, {kind}: {audits[kind].features[0].summary}" for kind in ("amplify", "suppress")),
    ])


if __name__ == "__main__":
    main()
