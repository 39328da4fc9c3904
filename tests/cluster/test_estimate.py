"""The cost model ``saeforge submit`` prints (``cluster.estimate``): it reproduces the measured
rates it was calibrated on, counts sweeps, hookpoints and reused caches, and sizes the memory per
worker as benchmarks/plan_scale.py does. Pure arithmetic over a given job shape: no cluster, no model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cluster import estimate
from cluster.config import compose_job

ROOT = Path(__file__).resolve().parents[2]

# A SmolLM2-135M-shaped job as benchmarks/bench_producer.py measured it: 16 of 30 layers run.
SMOLLM2 = estimate.JobShape(tokens=131_072, rows=130_558, train_rows=114_239, d_model=576, n_hookpoints=1,
                            layers_run=16, n_layers=30, model_parameters=134_515_008,
                            non_embedding_parameters=30 * 3_540_096)


def _plan_scale():
    spec = importlib.util.spec_from_file_location("plan_scale", ROOT / "benchmarks" / "plan_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimate_reproduces_the_measured_rates_and_counts():
    job = compose_job(["cluster.num_producers=1", "cluster.num_train_workers=2", "train.epochs=1",
                       "sae.n_latents=16384", "deepspeed=zero0"])
    shape = replace(SMOLLM2, d_model=512)
    est = estimate.estimate_cost(job, replace(SMOLLM2, d_model=576))
    # one producer of one CPU forwards the reference model at the rate bench_producer measured
    assert est.producer_seconds == pytest.approx(131_072 / estimate.PRODUCER_MEASURED_TOKENS_PER_S, rel=1e-3)
    assert est.activation_bytes == 130_558 * 576 * 4
    assert est.sae_parameters == 2 * 16384 * 576 + 16384 + 576
    assert est.model_bytes_per_producer == 134_515_008 * 4
    assert est.trained_tokens == 114_239
    assert est.trainer_flops == 6 * 576 * 16384 * 114_239
    # two one-CPU workers train 16,384 latents at d_model 512 at bench_scale's rate
    est = estimate.estimate_cost(job, shape)
    assert est.trainer_seconds == pytest.approx(114_239 / estimate.TRAINER_MEASURED_TOKENS_PER_S)
    bf16 = estimate.estimate_cost(compose_job(["cluster.num_producers=1", "train.epochs=1", "sae.n_latents=16384",
                                           "deepspeed=zero0", "deepspeed.precision=bf16"]), shape)
    assert bf16.trainer_seconds == pytest.approx(est.trainer_seconds / estimate.BF16_TRAINER_SPEEDUP)


def test_estimate_of_a_sweep_over_hookpoints_with_a_reused_cache():
    job = compose_job(["sweep.n_latents=[4096,8192]", "sweep.k=[16,32]", "train.max_tokens=50000"])
    est = estimate.estimate_cost(job, replace(SMOLLM2, n_hookpoints=2, caches_complete=2))
    assert est.dictionaries == 8
    assert est.sae_parameters == 2 * 2 * sum(2 * n * 576 + n + 576 for n in (4096, 8192))
    assert est.trained_tokens == 50_000, "train.max_tokens caps the tokens per dictionary"
    assert est.tokens == 0 and est.producer_flops == 0, "complete caches are reused: no producer runs"
    assert "caches complete" in estimate.format_estimate(job, SMOLLM2, est)
    gpu = estimate.estimate_cost(compose_job(["cluster.producer_num_gpus=1"]), SMOLLM2)
    assert gpu.producer_seconds is None, "no GPU rate was measured: no producer ETA"


def test_estimate_counts_each_hookpoint_at_its_own_width():
    """The MLP neurons (down_proj's input, 1,536 wide in SmolLM2) next to the residual stream."""
    job = compose_job(["sae.n_latents=8192", "train.epochs=1"])
    both = estimate.estimate_cost(job, replace(SMOLLM2, n_hookpoints=2, hookpoint_widths=(576, 1536)))
    residual, neurons = (estimate.estimate_cost(job, replace(SMOLLM2, d_model=w)) for w in (576, 1536))
    assert both.activation_bytes == 130_558 * (576 + 1536) * 4
    assert both.sae_parameters == residual.sae_parameters + neurons.sae_parameters
    assert both.trainer_flops == residual.trainer_flops + neurons.trainer_flops
    # trained one after the other: the wider dictionary is the peak
    assert both.state_bytes_per_worker == neurons.state_bytes_per_worker
    assert both.working_bytes_per_worker == neurons.working_bytes_per_worker
    assert both.producer_flops == residual.producer_flops, "the forward pass runs at the residual width"


@pytest.mark.parametrize(("workers", "feature_parallel", "stage"), [(8, 1, 1), (8, 2, 2), (8, 8, 1), (64, 8, 3), (2, 1, 0), (4, 4, 3)])
def test_memory_per_worker_is_the_plan_scale_model(workers, feature_parallel, stage):
    n, d, k, rank_batch = 65536, 768, 64, 512
    dp = workers // feature_parallel
    job = compose_job([f"cluster.num_train_workers={workers}", f"deepspeed.feature_parallel={feature_parallel}",
                       f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", f"sae.n_latents={n}", f"sae.k={k}",
                       "sae.auxk_coefficient=0", f"train.batch_size={rank_batch * dp}"])
    est = estimate.estimate_cost(job, replace(SMOLLM2, d_model=d))
    expected = _plan_scale().per_gpu_bytes(n, d, gpus=workers, feature_parallel=feature_parallel, zero_stage=stage,
                                           batch=rank_batch, k=k)
    assert est.state_bytes_per_worker + est.working_bytes_per_worker == pytest.approx(expected)


def test_the_cost_model_loads_without_ray_or_torch():
    """``saeforge submit --help`` and the arithmetic need neither: only ``describe_job`` reads a model."""
    code = ("import sys, cluster.estimate; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers', 'deepspeed') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_estimate_of_a_transcoder_counts_one_dictionary_from_its_input_to_its_target():
    """The MLP's neurons (1,536) predicting its output (576), with a skip term: one dictionary of
    n (d_in + d_out) + n + d_out + d_in d_out parameters, two caches, the encoder GEMM at d_in."""
    job = compose_job(["model.hookpoint=model.layers.15.mlp.down_proj:input", "model.target_hookpoint=mlp_out.15",
                       "sae=batchtopk", "sae.skip_connection=true", "sae.n_latents=8192", "train.epochs=1"])
    shape = replace(SMOLLM2, n_hookpoints=2, hookpoint_widths=(1536, 576), transcoder=True, skip_connection=True)
    est = estimate.estimate_cost(job, shape)
    assert est.dictionaries == 1
    assert est.sae_parameters == 8192 * (1536 + 576) + 8192 + 576 + 1536 * 576
    assert est.activation_bytes == 130_558 * (1536 + 576) * 4, "both caches"
    neurons_sae = estimate.estimate_cost(job, replace(SMOLLM2, d_model=1536))
    assert est.trainer_flops == neurons_sae.trainer_flops, "the encoder reads the 1,536-wide input"
    assert neurons_sae.state_bytes_per_worker > est.state_bytes_per_worker > estimate.estimate_cost(job, SMOLLM2).state_bytes_per_worker
    assert "a transcoder 1536 -> 576" in estimate.format_estimate(job, shape, est)


def test_estimate_of_a_cross_layer_transcoder_counts_a_decoder_per_pair_of_layers():
    """6 layers of SmolLM2 at 4,608 latents per layer: 6 encoders, 21 decoder blocks, 12 caches."""
    job = compose_job(["model.clt_layers=[12,17]", "sae=jumprelu", "train.epochs=1"])
    shape = replace(SMOLLM2, n_hookpoints=12, clt_layers=6)
    est = estimate.estimate_cost(job, shape)
    n, d = 4608, 576
    assert est.dictionaries == 1
    assert est.sae_parameters == 6 * n * d + n * d * 21 + 2 * 6 * n + 6 * d
    assert est.activation_bytes == 130_558 * 12 * d * 4, "every covered layer's input and output cached"
    assert est.trainer_flops == est.trained_tokens * (6 * d * 6 * n + 6 * n * d * 21)
    split = estimate.estimate_cost(compose_job(["model.clt_layers=[12,17]", "sae=jumprelu", "deepspeed.feature_parallel=2"]), shape)
    assert split.state_bytes_per_worker < est.state_bytes_per_worker, "feature parallelism splits every layer's latents"
    assert "cross-layer transcoder over 6 layers" in estimate.format_estimate(job, shape, est)
