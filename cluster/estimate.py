"""What a training job will cost, worked out before it starts: the cost model ``saeforge submit``
prints (``--dry-run`` prints it alone).

``describe_job`` reads the job's shape the way the driver will plan it (the same tokens, shards and
cache keys) from the text and the model's config, loading no weights; ``estimate_cost`` turns a
shape into sizes, memory per worker, FLOPs and an ETA by arithmetic alone; ``format_estimate``
prints it. Nothing here talks to a cluster: the module imports neither Ray nor torch at load time
(``describe_job`` imports what planning the caches needs when it runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from cluster.sweep import variants

if TYPE_CHECKING:
    from cluster.config import JobConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STATE_BYTES = {"fp32": {"weights": 4, "grads": 4, "optimizer": 8},
               "bf16": {"weights": 2, "grads": 2, "optimizer": 12}}
"""Bytes per SAE parameter in a DeepSpeed engine with Adam, 16 in all: fp32 weights, gradients and
two moments; or bf16 weights and gradients over fp32 master weights and moments."""
ENCODER_CHUNK_LATENTS = 4096
"""Latents whose pre-activations one step holds at once (benchmarks/plan_scale.py's working-memory model)."""


def forward_flops_per_token(*, forward_parameters: float, layers_run: int, context_length: int, d_model: int) -> float:
    """A forward pass to the hookpoint: ``2 N + 2 n_layer n_ctx d`` (Kaplan et al. 2020, table 1),
    N the non-embedding parameters of the layers that run."""
    return 2 * forward_parameters + 2 * layers_run * context_length * d_model


def trainer_flops_per_token(*, d_model: int, n_latents: int) -> float:
    """One training token through one SAE: ``6 d n``, the encoder's (d x n) GEMM forward (2 d n)
    and backward (4 d n) counted dense. The decoder and the top-k work on k latents only and are
    left out; TopK's sparse kernels skip most of the backward, so this overstates their work and
    the measured rate below, taken with the same formula, absorbs the difference."""
    return 6 * d_model * n_latents


# Rates measured on the 2-core reference machine, copied from benchmarks/RESULTS.md (rerun a
# benchmark there, then update its constant here), turned into FLOP/s per CPU by the two formulas
# above so that they carry over to other models and widths. Rough: CPU only (no GPU figure has been
# measured), linear in CPUs, communication and start-up left out.
PRODUCER_MEASURED_TOKENS_PER_S = 699.0
"""benchmarks/RESULTS.md, "Producers" (bench_producer), the producer path's tokens/s: SmolLM2-135M
in fp32 to model.layers.15 (16 of its 30 layers, 56,641,536 non-embedding parameters), context
256, one CPU thread."""
PRODUCER_FLOPS_PER_CPU = PRODUCER_MEASURED_TOKENS_PER_S * forward_flops_per_token(
    forward_parameters=56_641_536, layers_run=16, context_length=256, d_model=576)
TRAINER_MEASURED_TOKENS_PER_S = 4287.0
"""benchmarks/RESULTS.md, "Width" (bench_scale), the 16,384-latent row's tokens/s: TopK at
d_model 512, fp32, in the job's DeepSpeed engine on two ranks of one CPU thread each."""
TRAINER_FLOPS_PER_CPU = TRAINER_MEASURED_TOKENS_PER_S * trainer_flops_per_token(d_model=512, n_latents=16384) / 2
BF16_TRAINER_SPEEDUP = 8685 / 4034
"""benchmarks/RESULTS.md, "TopK training step" (bench_trainer), 16,384 latents: the tokens/s of
the step with bf16 GEMMs over the same step in fp32."""


@dataclass(frozen=True)
class JobShape:
    """What the estimate needs beyond the config, read from the text and the model's config."""

    tokens: int
    """Tokens forwarded by the producers (whole sequences)."""
    rows: int
    """Activation rows per hookpoint (tokens minus excluded ones, such as BOS)."""
    train_rows: int
    """Rows per hookpoint outside the held-out shards."""
    d_model: int
    """The model's residual width (the forward pass's cost)."""
    n_hookpoints: int
    layers_run: int
    """Decoder layers a forward pass runs (up to the deepest hookpoint)."""
    n_layers: int
    model_parameters: int
    non_embedding_parameters: int
    caches_complete: int = 0
    """Hookpoints whose cache is already complete: reused, their producers skipped."""
    hookpoint_widths: tuple[int, ...] = ()
    """What each hookpoint captures (``mlp.down_proj:input``: intermediate_size); empty: d_model each."""
    transcoder: bool = False
    """The job trains one transcoder from the first hookpoint to the second (``model.target_hookpoint``)
    instead of one SAE per hookpoint."""
    skip_connection: bool = False
    """The transcoder has ``W_skip`` (d_in x d_out)."""
    clt_layers: int = 0
    """Layers of the cross-layer transcoder the job trains (``model.clt_layers``; its hookpoints are
    their MLP inputs, then their outputs); 0: none."""

    @property
    def widths(self) -> tuple[int, ...]:
        return self.hookpoint_widths or (self.d_model,) * self.n_hookpoints

    @property
    def dictionary_widths(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of each dictionary a variant trains: one per hookpoint, the transcoder's, or
        a cross-layer transcoder's per layer."""
        if self.clt_layers:
            return [(self.widths[0], self.widths[self.clt_layers])]
        return [(self.widths[0], self.widths[1])] if self.transcoder else [(w, w) for w in self.widths]

    def parameters(self, n_latents: int, d_in: int, d_out: int) -> int:
        """One dictionary's parameters: ``n (d_in + d_out) + n + d_out``, plus a skip's ``d_in d_out``;
        a cross-layer transcoder of L layers (``n``, ``d_in``, ``d_out`` per layer):
        ``L n d_in + n d_out L (L + 1) / 2 + 2 L n + L d_out`` (encoders, a decoder per pair of layers,
        biases and thresholds)."""
        if self.clt_layers:
            layers = self.clt_layers
            return layers * n_latents * d_in + n_latents * d_out * layers * (layers + 1) // 2 + 2 * layers * n_latents + layers * d_out
        skip = d_in * d_out if self.transcoder and self.skip_connection else 0
        return n_latents * (d_in + d_out) + n_latents + d_out + skip

    def encoder_flops_per_token(self, n_latents: int, d_in: int, d_out: int) -> float:
        """Training FLOPs per token (``trainer_flops_per_token``'s dense encoder count); a cross-layer
        transcoder adds its dense decoders (JumpReLU's activations are dense), one per pair of layers."""
        if self.clt_layers:
            layers = self.clt_layers
            return trainer_flops_per_token(d_model=d_in, n_latents=layers * n_latents) + 6 * n_latents * d_out * layers * (layers + 1) // 2
        return trainer_flops_per_token(d_model=d_in, n_latents=n_latents)


class CostEstimate(NamedTuple):
    """The figures ``saeforge submit`` prints before it submits."""

    tokens: int
    """Tokens the producers forward (0 when every cache is reused)."""
    activation_bytes: int
    """Activation values in the caches: rows x d_model x dtype bytes, summed over hookpoints."""
    sae_parameters: int
    """Parameters of every dictionary the job trains (``2 n d + n + d`` each)."""
    dictionaries: int
    """Dictionaries trained: hookpoints x sweep variants."""
    state_bytes_per_worker: float
    """SAE weights, gradients and Adam state on one trainer worker, as ZeRO and feature
    parallelism divide them (all variants of a sweep train at once)."""
    working_bytes_per_worker: float
    """One step's working memory on one trainer worker."""
    model_bytes_per_producer: int
    """The model's weights in one producer."""
    producer_flops: float
    trained_tokens: int
    """Training tokens per dictionary (epochs over the training shards, capped by train.max_tokens)."""
    trainer_flops: float
    producer_seconds: float | None
    """At the measured CPU rate; None where producers run on GPUs (no rate measured)."""
    trainer_seconds: float


def _worker_bytes(job: JobConfig, shape: JobShape, n_latents: int, k: int, d_in: int, d_out: int) -> tuple[float, float]:
    """(state, working) bytes of one variant on one worker: benchmarks/plan_scale.py's model with
    this job's precision and per-rank batch (``d_in == d_out == d`` for an SAE)."""
    f = job.deepspeed.feature_parallel
    dp = job.cluster.num_train_workers // f
    stage = job.deepspeed.zero_stage
    replicated = shape.parameters(0, d_in, d_out)  # b_dec and a skip's W_skip are not split by features
    params = (shape.parameters(n_latents, d_in, d_out) - replicated) / f + replicated
    layers = shape.clt_layers or 1  # a CLT's flat widths: every layer side by side
    n_latents, d_in, d_out = n_latents * layers, d_in * layers, d_out * layers
    divisors = {"weights": dp if stage >= 3 else 1, "grads": dp if stage >= 2 else 1, "optimizer": dp if stage >= 1 else 1}
    per_byte = STATE_BYTES[job.deepspeed.precision]
    state = sum(params * per_byte[part] / divisors[part] for part in per_byte)
    batch = job.train.batch_size // dp
    working = batch * (d_in + d_out) * 4 + batch * ENCODER_CHUNK_LATENTS * 2 + 4 * batch * k * 8
    if stage == 3:  # the forward gathers the slice's whole W_enc and W_dec
        working += per_byte["weights"] * n_latents * (d_in + d_out) / f
    return state, working


def estimate_cost(job: JobConfig, shape: JobShape) -> CostEstimate:
    """The job's size, memory, work and an ETA from the measured rates (pure arithmetic)."""
    d, widths = shape.d_model, shape.widths
    dictionaries = variants(job.sae, job.train.lr, job.sweep)
    produce = shape.caches_complete < shape.n_hookpoints
    tokens = shape.tokens if produce else 0
    producer_flops = tokens * forward_flops_per_token(
        forward_parameters=shape.non_embedding_parameters * shape.layers_run / shape.n_layers,
        layers_run=shape.layers_run, context_length=job.data.context_length, d_model=d)
    trained = shape.train_rows * job.train.epochs
    if job.train.max_tokens is not None:
        trained = min(trained, job.train.max_tokens)
    # The hookpoints train one after another, a sweep's variants at once: the widest hookpoint's
    # variants together are the peak.
    pairs = shape.dictionary_widths
    memory = max(([_worker_bytes(job, shape, v.sae.n_latents, v.sae.k, *pair) for v in dictionaries] for pair in pairs),
                 key=lambda parts: sum(state + working for state, working in parts))
    # The encoder's GEMM reads d_in (a transcoder's input width).
    trainer_flops = sum(trained * shape.encoder_flops_per_token(v.sae.n_latents, *pair)
                        for pair in pairs for v in dictionaries)
    producer_cpus = job.cluster.num_producers * job.cluster.producer_num_cpus
    trainer_rate = job.cluster.num_train_workers * job.cluster.train_worker_num_cpus * TRAINER_FLOPS_PER_CPU
    if job.deepspeed.precision == "bf16":
        trainer_rate *= BF16_TRAINER_SPEEDUP
    return CostEstimate(
        tokens=tokens,
        activation_bytes=shape.rows * sum(widths) * DTYPE_BYTES[job.cache.dtype],
        sae_parameters=sum(shape.parameters(v.sae.n_latents, *pair) for pair in pairs for v in dictionaries),
        dictionaries=len(pairs) * len(dictionaries),
        state_bytes_per_worker=sum(state for state, _ in memory),
        working_bytes_per_worker=sum(working for _, working in memory),
        # auto is decided on the producers' hardware: counted at float32's, the larger
        model_bytes_per_producer=shape.model_parameters * DTYPE_BYTES.get(job.model.dtype, DTYPE_BYTES["float32"]),
        producer_flops=producer_flops,
        trained_tokens=trained,
        trainer_flops=trainer_flops,
        producer_seconds=None if job.cluster.producer_num_gpus > 0 else producer_flops / (producer_cpus * PRODUCER_FLOPS_PER_CPU),
        trainer_seconds=trainer_flops / trainer_rate,
    )


def _bytes(size: float) -> str:
    from cluster.cache_cli import human_bytes

    return human_bytes(int(size))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _eta(job: JobConfig, est: CostEstimate) -> str:
    train = _duration(est.trainer_seconds) + " training"
    if est.tokens == 0:
        return f"{train} (caches complete: no producers)"
    if est.producer_seconds is None:
        return f"{train} + producing on GPUs (no GPU rate measured)"
    produce = _duration(est.producer_seconds) + " producing"
    if job.cluster.train_while_caching:
        return f"{_duration(max(est.producer_seconds, est.trainer_seconds))} ({produce}, {train}, overlapped)"
    return f"{_duration(est.producer_seconds + est.trainer_seconds)} ({produce} + {train})"


def format_estimate(job: JobConfig, shape: JobShape, est: CostEstimate) -> str:
    """The estimate as a small aligned table."""
    hookpoints = shape.n_hookpoints
    per = f" per hookpoint x {hookpoints}" if hookpoints > 1 else ""
    widths = (f"d_model {shape.widths[0]}{per}" if len(set(shape.widths)) == 1
              else "(" + " + ".join(str(w) for w in shape.widths) + ") values, one width per hookpoint")
    f, dp = job.deepspeed.feature_parallel, job.cluster.num_train_workers // job.deepspeed.feature_parallel
    grid = f"ZeRO {job.deepspeed.zero_stage}, {job.deepspeed.precision}, {dp} data-parallel" + (f" x {f} feature-parallel" if f > 1 else "")
    rows = [
        ("tokens", f"{shape.tokens:,} forwarded, {shape.rows:,} activation rows{per}"
                   + ("" if est.tokens else " (cached already)")),
        ("activation cache", f"{_bytes(est.activation_bytes)} ({shape.rows:,} rows x {widths} x {job.cache.dtype})"),
        ("SAE parameters", f"{est.sae_parameters:,} in {est.dictionaries} dictionar{'y' if est.dictionaries == 1 else 'ies'} "
                           + ("(n (d_in + d_out) + n + d_out" + (" + d_in d_out skip" if shape.skip_connection else "")
                              + f" each: a transcoder {shape.widths[0]} -> {shape.widths[1]})"
                              if shape.transcoder else
                              f"(a cross-layer transcoder over {shape.clt_layers} layers: L n d_in + n d_out L (L + 1) / 2 + 2 L n + L d_out)"
                              if shape.clt_layers else "(2 n d + n + d each)")),
        ("memory per worker", f"{_bytes(est.state_bytes_per_worker)} weights, gradients, Adam ({grid}) "
                              f"+ {_bytes(est.working_bytes_per_worker)} per step"),
        ("model per producer", f"{_bytes(est.model_bytes_per_producer)} ({shape.model_parameters:,} parameters, "
                                f"{'auto: at most float32' if job.model.dtype == 'auto' else job.model.dtype})"),
        ("FLOPs", f"{est.producer_flops:.2e} producing (2 N + 2 L ctx d per token, {shape.layers_run} of {shape.n_layers} layers), "
                  f"{est.trainer_flops:.2e} training (6 d n per token, {est.trained_tokens:,} tokens per dictionary)"),
        ("ETA", _eta(job, est)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["cost estimate (rough: CPU rates measured on the 2-core reference machine, benchmarks/RESULTS.md)"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# --- reading the job's shape (tokenizes the text, reads the model's config) --------------

_LAYER_INDEX = re.compile(r"\.(\d+)(?=[.:]|$)")


def _model_parameters(job: JobConfig) -> tuple[int, int, int, int]:
    """(all parameters, non-embedding parameters, decoder layers, residual width) from a
    skeleton built on the meta device: no weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from activation_cache.hooking import resolve_model_source

    source = resolve_model_source(job.model)
    config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    embeddings = skeleton.get_input_embeddings().weight
    head = skeleton.get_output_embeddings()
    embedding = embeddings.numel() + (head.weight.numel() if head is not None and head.weight is not embeddings else 0)
    return total, total - embedding, int(config.num_hidden_layers), int(embeddings.shape[1])


def _cache_complete(job: JobConfig, cache_uri: str) -> bool:
    """Whether the cache exists complete (then the job reuses it); False where the store cannot
    be read from this machine (the estimate then counts the producers' work)."""
    from activation_cache.manifest import load_manifest
    from activation_cache.store import StoreError, open_store

    try:
        manifest = load_manifest(open_store(cache_uri, s3_options=job.cache.s3_options()))
    except StoreError:
        return False
    return manifest is not None and manifest.complete


def describe_job(job: JobConfig) -> JobShape:
    """Plan the job's caches as the driver will (same tokens, same cache keys), without loading
    weights; raises what the driver would raise for bad text, model files or shard counts."""
    from activation_cache.plan import holdout_count
    from activation_cache.store import open_store
    from cluster.driver import absolute_uri, check_shard_count, expected_shards, plan_caches

    plans = plan_caches(job, open_store(absolute_uri(job.cache.uri), s3_options=job.cache.s3_options()))
    check_shard_count(job, plans[0])
    shards = expected_shards(job, plans[0])
    names = sorted(shards)
    held_out = holdout_count(len(names), job.train.holdout_fraction)
    total, non_embedding, n_layers, d_model = _model_parameters(job)
    indices = [_LAYER_INDEX.search(p.hookpoint) for p in plans]
    layers_run = n_layers if any(i is None for i in indices) else max(int(i.group(1)) for i in indices) + 1
    return JobShape(
        tokens=int(plans[0].tokens.size), rows=sum(shards.values()), train_rows=sum(shards[n] for n in names[:-held_out]),
        d_model=d_model, n_hookpoints=len(plans), hookpoint_widths=tuple(p.meta.d_model for p in plans), layers_run=min(layers_run, n_layers), n_layers=n_layers,
        transcoder=job.model.target_hookpoint is not None, skip_connection=job.sae.skip_connection,
        clt_layers=len(job.model.clt_layer_numbers),
        model_parameters=total, non_embedding_parameters=non_embedding,
        caches_complete=sum(_cache_complete(job, p.uri) for p in plans),
    )
