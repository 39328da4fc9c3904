"""The spliced evaluation on a real (tiny, briefly trained) model: dictionaries whose answers are
known (an exact one, a zero one, a partial one), through ``saeforge eval`` and the Ray task."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from dictionary_folders import fit_transcoder, train_topk_transcoder
from ray.util.placement_group import placement_group, remove_placement_group
from ray_processes import descendants_titled
from safetensors.torch import load as load_safetensors
from tiny_job import tiny_job

from activation_cache.config import DataConfig, ModelConfig
from activation_cache.eval_text import text_source
from activation_cache.hooking import (
    ActivationHarvester,
    load_model,
    load_tokenizer,
    resolve_model_source,
    spliced,
    spliced_pair,
    spliced_pairs,
)
from activation_cache.store import open_store
from activation_cache.text import excluded_token_ids, pack_sequences
from activation_cache.unembedding import unembedding_of
from cluster.cli import main as saeforge
from cluster.config import EvalConfig, to_dict
from cluster.errors import EvaluationFailed
from cluster.evaluation import EvaluationTimes, evaluate_in_ray, evaluate_uris, held_out_text
from cluster.pull import pull
from cluster.report_cards import FeatureCard, FeatureSample
from trainer.clt import CrossLayerTranscoder
from trainer.dictionary import dictionary_files
from trainer.layout import (
    FEATURES_FILE,
    REPORT_FILE,
    WEIGHTS_FILE,
    dictionary_folder_name,
    split_dictionary_uri,
    write_dictionary,
)
from trainer.sae import TopKSAE

HOOKPOINT = "model.layers.1"
MLP_IN, MLP_OUT = "model.layers.1.mlp:input", "model.layers.1.mlp"
"""A transcoder's two ends: layer 1's MLP input and output."""
RECONSTRUCTION = {"fvu": 0.25, "l0": 3.0, "dead_fraction": 0.0}
"""Stand-ins for the figures training writes: ``saeforge eval`` must keep them."""



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tiny_corpus_dir, tmp_path_factory) -> Path:
    """The tiny Llama after 60 steps on the corpus: it predicts the text well (CE about 1.5
    against log 300 = 5.7), so ablating a layer costs something to recover."""
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_model_dir)))
    model, tokenizer = load_model(source).train(), load_tokenizer(source)
    ids = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=None), tokenizer))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = ids[torch.randint(0, len(ids), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("trained-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _identity_sae(d_model: int, k: int) -> TopKSAE:
    """Latents +e_i and -e_i: with k = d_model the reconstruction is exact; a smaller k keeps
    only each token's k largest coordinates."""
    sae = TopKSAE(d_model, 2 * d_model, k, unit_norm_decoder=False, kernel="dense")
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d_model: int) -> TopKSAE:
    sae = _identity_sae(d_model, 1)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def _save(folder: Path, sae: TopKSAE, model_dir: Path) -> str:
    files = dictionary_files(sae, hookpoint=HOOKPOINT, model_name=str(model_dir), scale=1.0,
                             extra_metadata={"run_name": "tiny"}, sparsity=None, eval_metrics=RECONSTRUCTION)
    write_dictionary(open_store(str(folder)), files)
    return str(folder)


def _eval_json(folder: str) -> dict:
    return json.loads((Path(folder) / "eval.json").read_text())


def test_spliced_replaces_the_hookpoint_for_the_whole_forward_then_unhooks(model_dir):
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(model_dir))))
    ids = torch.randint(3, 200, (2, 10))
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with spliced(model, "resid_post.1", lambda acts: acts.clone()) as canonical:
            same = model(input_ids=ids).logits
        # A zero residual stream stays zero through the later layers and the final norm: logits 0.
        with spliced(model, "resid_post.3", torch.zeros_like):
            zeroed = model(input_ids=ids).logits
        # Zeroing the MLP's input (a pre-hook) is zeroing its output: a bias-free SwiGLU maps 0 to 0.
        with spliced(model, "mlp_in.1", torch.zeros_like) as mlp_in:
            no_mlp_input = model(input_ids=ids).logits
        handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        no_mlp_output = model(input_ids=ids).logits
        handle.remove()
        with pytest.raises(ValueError, match=r"replacement shape \(2, 10, 1\)"):
            with spliced(model, HOOKPOINT, lambda acts: acts[..., :1]):
                model(input_ids=ids)
        after = model(input_ids=ids).logits
    assert (canonical, mlp_in) == (HOOKPOINT, "model.layers.1.mlp:input")
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert torch.count_nonzero(zeroed) == 0
    torch.testing.assert_close(no_mlp_input, no_mlp_output)
    assert not torch.allclose(no_mlp_input, clean)
    torch.testing.assert_close(after, clean, rtol=0, atol=0)  # the hook left with the error


def test_an_exact_dictionary_recovers_all_the_loss_and_a_zero_one_none(model_dir, tiny_corpus_dir, tmp_path, capsys):
    exact = _save(tmp_path / "exact", _identity_sae(32, 32), model_dir)
    zero = _save(tmp_path / "zero", _zero_sae(32), model_dir)
    for folder in (exact, zero):
        assert saeforge(["eval", folder, "--text", str(tiny_corpus_dir), "--max-tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert "CE recovered     1.0000" in out and "CE recovered     0.0000" in out
    exact_eval, zero_eval = _eval_json(exact), _eval_json(zero)
    for evaluation in (exact_eval, zero_eval):
        assert {k: evaluation[k] for k in RECONSTRUCTION} == RECONSTRUCTION  # the training figures stay
        assert evaluation["lm"]["text"] == str(tiny_corpus_dir)
        assert evaluation["lm"]["clean_ce"] < 2.5 < 5.0 < evaluation["lm"]["ablated_ce"]
    lm = exact_eval["lm"]
    assert lm["spliced_ce"] == pytest.approx(lm["clean_ce"], abs=1e-5)
    assert lm["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert lm["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact_eval["unexplained"]["error_norm"]["max"] < 1e-5
    lm = zero_eval["lm"]
    assert lm["spliced_ce"] == pytest.approx(lm["ablated_ce"], abs=1e-6)
    assert lm["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert lm["delta_lm_loss"] == pytest.approx(lm["ablated_ce"] - lm["clean_ce"], abs=1e-6)
    assert lm["kl_divergence"] > 1.0
    # Same text and tokens for both: 4 sequences of 256 (BOS and EOS excluded, last position unscored).
    assert zero_eval["lm"]["n_tokens"] == exact_eval["lm"]["n_tokens"]


def test_the_worst_contexts_are_the_tokens_of_largest_error(model_dir, tiny_corpus_dir, tmp_path):
    """A zero dictionary leaves an error equal to the activation: each listed token's error norm
    must be the norm of the activation at the sequence and position it names."""
    zero = _save(tmp_path / "zero", _zero_sae(32), model_dir)
    assert saeforge(["eval", zero, "--text", str(tiny_corpus_dir), "--max-tokens", "512"]) == 0
    unexplained = _eval_json(zero)["unexplained"]
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    tokenizer = load_tokenizer(source)
    data = DataConfig(source=str(tiny_corpus_dir), max_tokens=512)
    tokens = pack_sequences(data, tokenizer)
    acts = ActivationHarvester(load_model(source), HOOKPOINT)(torch.from_numpy(tokens))
    norms = acts.norm(dim=-1)
    kept = ~np.isin(tokens, list(excluded_token_ids(data, tokenizer)))
    assert unexplained["n_tokens"] == kept.sum() == sum(unexplained["error_norm_histogram"]["tokens"])
    assert unexplained["error_norm"]["max"] == pytest.approx(norms[torch.from_numpy(kept)].max().item(), rel=1e-5)
    worst = unexplained["worst_contexts"]
    assert len(worst) == EvalConfig().worst_contexts
    assert [w["error_norm"] for w in worst] == sorted((w["error_norm"] for w in worst), reverse=True)
    for entry in worst:
        assert entry["error_norm"] == pytest.approx(norms[entry["sequence"], entry["position"]].item(), rel=1e-5)
        assert entry["token"] == tokenizer.decode([int(tokens[entry["sequence"], entry["position"]])])
        assert f"[[{entry['token']}]]" in entry["context"]


def test_eval_reads_the_runs_config_and_evaluates_its_held_out_units(model_dir, tiny_corpus_dir, tmp_path):
    """Without --text: the run's config.json gives the model, the text and its held-out units;
    the rewritten eval.json stays consistent with checksums.json, so the dictionary still pulls."""
    job = tiny_job(str(tmp_path / "store"), tmp_path, model_dir, tiny_corpus_dir)
    run = tmp_path / "runs" / "tiny"
    open_store(str(run)).put_bytes("config.json", json.dumps(to_dict(job)).encode())
    partial = _save(run / "sweep" / "k8" / "dictionary" / HOOKPOINT, _identity_sae(32, 8), model_dir)
    assert saeforge(["eval", partial]) == 0
    evaluation = _eval_json(partial)
    lm = evaluation["lm"]
    assert lm["clean_ce"] < lm["spliced_ce"] < lm["ablated_ce"]
    assert 0.0 < lm["ce_recovered"] < 1.0 and lm["kl_divergence"] > 0
    # 48 sequences in 12 units of 4: the last ceil(0.1 * 12) = 2 units are held out.
    tokenizer = load_tokenizer(resolve_model_source(job.model))
    tokens = pack_sequences(job.data, tokenizer)
    held_out = tokens[40:]
    kept = ~np.isin(held_out, list(excluded_token_ids(job.data, tokenizer)))
    assert lm["n_tokens"] == kept[:, :-1].sum()
    assert lm["text"] == f"held-out units of {tiny_corpus_dir}"
    assert {w["sequence"] for w in evaluation["unexplained"]["worst_contexts"]} <= set(range(40, 48))
    [(_, (_, cfg))] = pull(partial, tmp_path / "pulled").items()
    assert json.loads((tmp_path / "pulled" / "eval.json").read_text()) == evaluation
    assert cfg["metadata"]["hook_name"] == HOOKPOINT


def _clarity(unembedding: torch.Tensor, latent: int, skip: list[int]) -> float:
    """How far latent ``latent`` of the ±e_i dictionary promotes its 5 top tokens, by hand: its
    logits are plus or minus one column of W_U."""
    logits = unembedding[:, latent % 32] * (1 if latent < 32 else -1)
    mean, std = logits.mean(), logits.std()
    logits[skip] = -torch.inf
    return ((logits.topk(5).values.mean() - mean) / std).item()


def test_the_evaluation_audits_the_reports_clearest_live_cards_and_draws_the_figures_on_them(
        model_dir, tiny_corpus_dir, tmp_path):
    """With the model still loaded, the spliced evaluation audits the feature cards that fire on
    the audit's text and whose promoted tokens stand out most (eval.json's ``audit``), and the
    redrawn report shows the figures on those cards. The latents are ±e_i, so zeroing one is projecting its direction out
    where it fires (no leak), and a clamp far above the other coordinates reads back as the clamp
    plus the coordinate the error term kept where the latent did not fire."""
    folder = _save(tmp_path / "partial", _identity_sae(32, 8), model_dir)
    cards = [FeatureCard(i, "random", 0.1, 5, 20.0 + i, []) for i in range(0, 64, 3)]  # +e_0, +e_3, ..., -e_31
    open_store(folder).put_bytes(FEATURES_FILE, FeatureSample(cards, 1024, "", False, 0).to_json())
    assert saeforge(["eval", folder, "--text", str(tiny_corpus_dir), "--max-tokens", "1024"]) == 0
    audit = _eval_json(folder)["audit"]

    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    model, tokenizer = load_model(source), load_tokenizer(source)
    excluded = sorted(excluded_token_ids(DataConfig(), tokenizer) | set(tokenizer.all_special_ids))
    # The audit text: the evaluation's first 256 held-out tokens (its first sequence).
    tokens = torch.from_numpy(pack_sequences(DataConfig(source=str(tiny_corpus_dir), max_tokens=1024), tokenizer))[:1]
    acts = ActivationHarvester(model, HOOKPOINT)(tokens)
    pre = torch.cat([acts, -acts], dim=-1)
    top = pre.topk(8, dim=-1).indices
    kept = ~torch.isin(tokens, torch.tensor(excluded))
    firing = {i: ((top == i).any(dim=-1) & (pre[..., i] > 0) & kept).sum().item() for i in [c.index for c in cards]}
    # Cards qualify firing 3 times or more on at most 30% of the text, the clearest first.
    unembedding, _ = unembedding_of(model)
    qualified = [i for i, n in firing.items() if 3 <= n <= 0.3 * kept.sum().item()]
    expected = sorted(qualified, key=lambda i: -_clarity(unembedding, i, excluded))[:EvalConfig().audit_features]
    assert audit["features"] == expected and len(expected) == 2
    assert audit["units"] == [{"feature": f, "unit": "scanned maximum", "unit_value": 20.0 + f} for f in expected]

    amplify, suppress = audit["amplify"], audit["suppress"]
    assert amplify["n_sequences"] == suppress["n_sequences"] == 1 and suppress["text_source"] == str(tiny_corpus_dir)
    for f, up, down in zip(expected, amplify["features"], suppress["features"], strict=True):
        assert up["feature"] == down["feature"] == f
        assert up["value"] == pytest.approx(10 * (20.0 + f)) and up["dashboard"]["feature_set"] == pytest.approx(up["value"])
        fires = (top == f).any(dim=-1) & (pre[..., f] > 0) & kept
        # The error term keeps the coordinate where the latent did not fire: it reads back on top of the clamp.
        read_back = up["value"] + torch.where(fires, 0.0, pre[..., f])[kept].double().mean().item()
        assert up["dashboard"]["feature_read_back"] == pytest.approx(read_back, rel=1e-5)
        assert (up["n_positions"], down["n_positions"]) == (kept.sum().item(), fires.sum().item())
        assert down["leak"]["zeroed_drop"] == pytest.approx(down["leak"]["projected_drop"], abs=1e-5)
    assert audit["seconds"] > 0

    page = (Path(folder) / REPORT_FILE).read_text()
    articles = dict(re.findall(r'<article class="feature" id="feature-(\d+)">(.*?)</article>', page, re.S))
    assert {int(i) for i, body in articles.items() if f'id="audit-{i}"' in body} == set(expected)
    for f, down in zip(expected, suppress["features"], strict=True):
        block = re.search(rf'<div class="audit" id="audit-{f}">.*?</div>', articles[str(f)], re.S).group(0)
        change = f"{down['steered']['target_logprob_change']:+.3g}"
        assert f"<td>zeroed where it fires</td><td><span class=\"num\">{down['n_positions']:,}</span></td><td>{change}</td>" in block


def test_held_out_text_takes_the_last_units_and_caps_whole_sequences():
    tokens = np.arange(10 * 4).reshape(10, 4)  # 10 sequences of 4 tokens, 3 per unit: units 0-2, 3-5, 6-8, 9
    text = held_out_text(tokens, sequences_per_shard=3, holdout_fraction=0.4, max_tokens=100,
                         excluded=frozenset(), source="s")
    assert text.sequence_ids.tolist() == [6, 7, 8, 9]  # ceil(0.4 * 4) = 2 units
    np.testing.assert_array_equal(text.tokens, tokens[6:])
    capped = held_out_text(tokens, sequences_per_shard=3, holdout_fraction=0.4, max_tokens=9,
                           excluded=frozenset(), source="s")
    assert capped.sequence_ids.tolist() == [6, 7]
    assert held_out_text(tokens, sequences_per_shard=3, holdout_fraction=0.4, max_tokens=1,
                         excluded=frozenset(), source="s").sequence_ids.tolist() == [6]


def test_the_run_folder_is_found_above_a_dictionary_and_a_sweep_variants_dictionary():
    assert split_dictionary_uri("s3://b/runs/r/dictionary/model.layers.1") == ("s3://b/runs/r", "")
    assert split_dictionary_uri("/x/runs/r/sweep/k8/dictionary/model.layers.1:input/") == ("/x/runs/r", "k8")
    assert split_dictionary_uri("/x/pulled/model.layers.1") == (None, "")
    assert split_dictionary_uri("dictionary/model.layers.1") == (None, "")


def test_eval_without_a_run_config_or_text_says_what_to_give(model_dir, tmp_path, capsys):
    folder = _save(tmp_path / "run" / "dictionary" / HOOKPOINT, _zero_sae(32), model_dir)
    assert saeforge(["eval", folder]) == 2
    err = capsys.readouterr().err
    assert f"no run config ({tmp_path / 'run'}/config.json): give the text with --text" in err
    assert saeforge(["eval", str(tmp_path / "nothing")]) == 2
    assert "not a dictionary (needs cfg.json and sae_weights.safetensors)" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_in_ray_evaluates_each_dictionary_in_one_task(ray_cluster, model_dir, tiny_corpus_dir, tmp_path):
    job = tiny_job(str(tmp_path / "store"), tmp_path, model_dir, tiny_corpus_dir, "logging.wandb_mode=disabled")
    run = tmp_path / "runs" / "tiny"
    exact = _save(run / "dictionary" / HOOKPOINT, _identity_sae(32, 32), model_dir)
    zero = _save(run / "sweep" / "zero" / "dictionary" / HOOKPOINT, _zero_sae(32), model_dir)
    partial = _save(run / "sweep" / "k8" / "dictionary" / HOOKPOINT, _identity_sae(32, 8), model_dir)
    cards = [FeatureCard(i, "random", 0.1, 5, 3.0, []) for i in range(0, 64, 3)]
    open_store(partial).put_bytes(FEATURES_FILE, FeatureSample(cards, 128, "", False, 0).to_json())
    tokenizer = load_tokenizer(resolve_model_source(job.model))
    tokens = pack_sequences(job.data, tokenizer)
    evaluations = evaluate_in_ray(job, [exact, zero, partial], tokens=tokens,
                                  excluded_token_ids=excluded_token_ids(job.data, tokenizer), eval_cfg=EvalConfig(max_tokens=128))
    assert evaluations == [_eval_json(exact), _eval_json(zero), _eval_json(partial)]
    assert [e["lm"]["ce_recovered"] for e in evaluations[:2]] == [pytest.approx(1.0, abs=1e-5), pytest.approx(0.0, abs=1e-6)]
    assert evaluations[0]["lm"]["n_tokens"] <= 4 * 31  # 128 tokens: the first 4 held-out sequences
    assert evaluations[0]["fvu"] == RECONSTRUCTION["fvu"]
    # The dictionary with report cards is audited in the same task (two of its cards); those without are not.
    audit = evaluations[2]["audit"]
    assert "audit" not in evaluations[0] and "audit" not in evaluations[1]
    assert len(audit["features"]) == EvalConfig().audit_features and set(audit["features"]) <= set(range(0, 64, 3))
    assert [f["feature"] for f in audit["suppress"]["features"]] == audit["features"]
    # Where the task's time went comes back beside the evaluations, never in eval.json (compared above).
    timings = evaluations.timings.as_dict()
    assert set(timings) == {f.name for f in dataclasses.fields(EvaluationTimes)} | {"total"}
    assert min(timings.values()) >= 0 and all(timings[k] > 0 for k in ("model_load", "spliced", "audit", "task_start"))
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"), abs=0.01)


@pytest.mark.integration
def test_an_evaluation_task_killed_mid_run_is_started_again(ray_cluster, model_dir, tiny_corpus_dir, tmp_path):
    """The evaluation task's process killed while it runs (as a lost node or the OOM killer
    would): a fresh task evaluates the dictionary again, to the same figures, and the fault comes
    back as one line with the time it cost."""
    job = tiny_job(str(tmp_path / "store"), tmp_path, model_dir, tiny_corpus_dir, "logging.wandb_mode=disabled")
    exact = _save(tmp_path / "runs" / "tiny" / "dictionary" / HOOKPOINT, _identity_sae(32, 32), model_dir)
    tokenizer = load_tokenizer(resolve_model_source(job.model))
    killed = []

    def kill_the_task() -> None:
        deadline = time.monotonic() + 120
        while not (pids := descendants_titled(b"ray::_evaluate_task")) and time.monotonic() < deadline:
            time.sleep(0.005)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_the_task)
    killer.start()
    evaluations = evaluate_in_ray(job, [exact], tokens=pack_sequences(job.data, tokenizer),
                                  excluded_token_ids=excluded_token_ids(job.data, tokenizer), eval_cfg=EvalConfig(max_tokens=1024))
    killer.join()
    assert killed, "the evaluation task was never seen running"
    assert evaluations == [_eval_json(exact)]
    assert evaluations[0]["fvu"] == RECONSTRUCTION["fvu"]
    [fault] = evaluations.faults
    assert fault.phase == "evaluation" and fault.what.startswith("evaluation task lost (") and fault.cost_s >= 0


@pytest.mark.integration
def test_an_evaluation_task_with_no_room_stops_the_job_naming_what_it_needed(ray_cluster, model_dir, tiny_corpus_dir, tmp_path):
    """The evaluation task pending with every CPU held (a lost node's, another job's actors) would
    wait for ever: after ``cluster.placement_timeout_s`` it is cancelled and the job stops with one
    line naming what the task needed and what the cluster has."""
    job = tiny_job(str(tmp_path / "store"), tmp_path, model_dir, tiny_corpus_dir, "logging.wandb_mode=disabled",
                   "cluster.placement_timeout_s=3")
    exact = _save(tmp_path / "runs" / "tiny" / "dictionary" / HOOKPOINT, _identity_sae(32, 32), model_dir)
    tokenizer = load_tokenizer(resolve_model_source(job.model))
    before = _eval_json(exact)
    held = placement_group([{"CPU": 2}])  # the local cluster's 2 CPUs, as another job would hold them
    ray.get(held.ready())
    try:
        started = time.monotonic()
        with pytest.raises(EvaluationFailed) as failed:
            evaluate_in_ray(job, [exact], tokens=pack_sequences(job.data, tokenizer),
                            excluded_token_ids=excluded_token_ids(job.data, tokenizer), eval_cfg=EvalConfig(num_cpus=2))
        took = time.monotonic() - started
    finally:
        remove_placement_group(held)
    assert str(failed.value) == ("no room on the cluster for the evaluation task (2 CPUs) in 3 s "
                                 "(cluster.placement_timeout_s=3); the cluster has 0 of 2 CPUs free now")
    assert took < 30, f"stopped after {took:.0f} s"
    assert _eval_json(exact) == before, "nothing was evaluated or written"


def test_a_bfloat16_model_gives_the_float32_models_losses(model_dir, tiny_corpus_dir, tmp_path):
    """The job's driver may resolve ``model.dtype=auto`` to bfloat16: the dictionary still runs in
    float32 on the upcast activations and the losses are computed in float32 from the logits."""
    folder = _save(tmp_path / "partial", _identity_sae(32, 8), model_dir)
    model_cfg = ModelConfig(name_or_path=str(model_dir), dtype="float32")
    cfg = EvalConfig(max_tokens=512, audit_features=0)
    text = text_source(DataConfig(), str(tiny_corpus_dir), cfg.max_tokens, load_tokenizer(resolve_model_source(model_cfg)))
    lm = {dtype: evaluate_uris([folder], model_cfg=dataclasses.replace(model_cfg, dtype=dtype), text=text, cfg=cfg)[0]["lm"]
          for dtype in ("float32", "bfloat16")}
    fp32, bf16 = lm["float32"], lm["bfloat16"]
    assert fp32["ablated_ce"] > fp32["spliced_ce"] + 1 > fp32["clean_ce"] + 1  # a partial recovery: a fair comparison
    for key in ("clean_ce", "spliced_ce", "ablated_ce"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
    assert bf16["ce_recovered"] == pytest.approx(fp32["ce_recovered"], abs=0.02)
    assert bf16["kl_divergence"] == pytest.approx(fp32["kl_divergence"], rel=0.1, abs=0.01)
    assert bf16["n_tokens"] == fp32["n_tokens"]


# --------------------------------------------------------------------------- transcoders


def _mlp_sides(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of layer 1's MLP for ``tokens`` (B, S), read with hooks registered here."""
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("in", args[0])),
               mlp.register_forward_hook(lambda module, args, out: seen.setdefault("out", out))]
    with torch.inference_mode():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return seen["in"], seen["out"]


@pytest.fixture(scope="module")
def transcoders(model_dir, tiny_corpus_dir) -> dict[str, TopKSAE]:
    """TopK transcoders of layer 1's MLP (input -> output), one plain and one with a skip
    connection, each trained for 150 steps on the corpus."""
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 64),
                            load_tokenizer(source))
    x, y = (side.reshape(-1, 32) for side in _mlp_sides(load_model(source), torch.from_numpy(tokens)))
    trained = {}
    for kind, skip in (("transcoder", False), ("skip transcoder", True)):
        trained[kind] = train_topk_transcoder(x, y, 128, 8, steps=150, skip_connection=skip)
    return trained


def _hand_prediction(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The TopK transcoder's output from its weights: the k largest of relu(x W_enc + b_enc),
    decoded with unit-norm rows of W_dec, plus b_dec (no b_dec subtracted from the input), plus
    x W_skip for a skip transcoder."""
    pre = torch.relu(x @ sae.W_enc + sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    sparse = acts @ (sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)) + sae.b_dec
    return sparse if sae.W_skip is None else sparse + x @ sae.W_skip


def _next_token_losses(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return losses[scored[:, :-1]]


@pytest.mark.parametrize("kind", ["transcoder", "skip transcoder"])
def test_a_transcoder_spliced_into_its_mlp_gives_the_losses_of_a_hand_made_splice(
        model_dir, tiny_corpus_dir, transcoders, kind, tmp_path):
    """``saeforge eval`` on a transcoder folder: the MLP's output replaced by the transcoder's
    prediction from the MLP's input (kept positions only; a skip transcoder's skip term
    included), the MLP's output zeroed for the baseline; every figure equals the same splice done
    here with plain torch hooks."""
    transcoder = transcoders[kind]
    if kind == "skip transcoder":
        assert transcoder.W_skip.abs().max() > 0.01, "the skip term was trained"
    folder = tmp_path / "transcoder"
    files = dictionary_files(transcoder, hookpoint=MLP_IN, hookpoint_out=MLP_OUT, model_name=str(model_dir), scale=1.0,
                             extra_metadata={"run_name": "tiny"}, sparsity=None, eval_metrics=RECONSTRUCTION)
    write_dictionary(open_store(str(folder)), files)
    assert saeforge(["eval", str(folder), "--text", str(tiny_corpus_dir), "--max-tokens", "512"]) == 0
    evaluation = _eval_json(str(folder))
    lm, unexplained = evaluation["lm"], evaluation["unexplained"]
    assert (lm["hookpoint"], lm["target_hookpoint"]) == (MLP_IN, MLP_OUT)

    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    model, tokenizer = load_model(source), load_tokenizer(source)
    data = DataConfig(source=str(tiny_corpus_dir), max_tokens=512)
    tokens = torch.from_numpy(pack_sequences(data, tokenizer))
    kept = ~torch.isin(tokens, torch.tensor(sorted(excluded_token_ids(data, tokenizer))))
    mlp = model.model.layers[1].mlp
    x, y = _mlp_sides(model, tokens)
    with torch.no_grad():
        prediction = torch.where(kept[..., None], _hand_prediction(transcoder, x), y)
    logits = {}
    with torch.inference_mode():
        logits["clean"] = model(input_ids=tokens).logits
        for name, output in (("spliced", prediction), ("ablated", torch.where(kept[..., None], 0.0, y))):
            handle = mlp.register_forward_hook(lambda module, args, out, output=output: output)
            logits[name] = model(input_ids=tokens).logits
            handle.remove()
    ce = {name: _next_token_losses(value, tokens, kept) for name, value in logits.items()}
    log_clean, log_spliced = (torch.log_softmax(logits[n][:, :-1].double(), dim=-1)[kept[:, :-1]] for n in ("clean", "spliced"))
    kl = (log_clean.exp() * (log_clean - log_spliced)).sum(dim=-1)
    assert lm["n_tokens"] == len(ce["clean"]) == kept[:, :-1].sum()
    for name in ("clean", "spliced", "ablated"):
        assert lm[f"{name}_ce"] == pytest.approx(ce[name].mean().item(), rel=1e-5)
    assert lm["kl_divergence"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-7)
    clean, spliced_ce, ablated = (ce[n].mean().item() for n in ("clean", "spliced", "ablated"))
    assert lm["ce_recovered"] == pytest.approx((ablated - spliced_ce) / (ablated - clean), rel=1e-4)
    # A useful transcoder: most of the MLP's contribution recovered (the skip one may beat the clean model slightly).
    assert spliced_ce < ablated and lm["ce_recovered"] > 0.5 and lm["kl_divergence"] > 0

    # The unexplained error is the target's: |MLP output - prediction| per kept token.
    norms = (y - prediction).norm(dim=-1)
    assert unexplained["n_tokens"] == kept.sum()
    assert unexplained["error_norm"]["max"] == pytest.approx(norms[kept].max().item(), rel=1e-4)
    for entry in unexplained["worst_contexts"]:
        assert entry["error_norm"] == pytest.approx(norms[entry["sequence"], entry["position"]].item(), rel=1e-4)
    assert {k: evaluation[k] for k in RECONSTRUCTION} == RECONSTRUCTION


def test_a_splice_pair_replaces_the_target_from_the_input_of_the_same_pass_and_refuses_the_reverse_order(model_dir):
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(model_dir))))
    ids = torch.randint(3, 200, (2, 10))
    x, y = _mlp_sides(model, ids)
    seen = []
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with spliced_pair(model, "mlp_in.1", "mlp_out.1", lambda acts, target: seen.append(acts) or target) as names:
            same = model(input_ids=ids).logits
        # The MLP itself (its forward, without the hooks), applied to its input inside the splice: the clean forward again.
        with spliced_pair(model, "mlp_in.1", "mlp_out.1", lambda acts, target: model.model.layers[1].mlp.forward(acts)):
            recomputed = model(input_ids=ids).logits
        with pytest.raises(ValueError, match=r"^target hookpoint model\.layers\.1\.mlp:input runs before input "
                                             r"hookpoint model\.layers\.1\.mlp in the forward pass"):
            with spliced_pair(model, "mlp_out.1", "mlp_in.1", lambda acts, target: target):
                model(input_ids=ids)
        with pytest.raises(ValueError, match="runs before input hookpoint model.layers.2"):
            with spliced_pair(model, "resid_post.2", "mlp_out.1", lambda acts, target: target):
                model(input_ids=ids)
        after = model(input_ids=ids).logits
    assert names == (MLP_IN, MLP_OUT)
    torch.testing.assert_close(seen[0], x, rtol=0, atol=0)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    torch.testing.assert_close(recomputed, clean)
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


def test_eval_on_a_transcoder_runs_dictionary_uses_the_runs_held_out_units_and_audits_its_cards(
        model_dir, tiny_corpus_dir, transcoders, tmp_path):
    """``saeforge eval`` on ``<run>/dictionary/<input>-to-<target>`` of a transcoder job: the run's
    config.json gives the model and the held-out units; the steer audit edits two of its report
    cards' features where it writes (the MLP's output), the error kept, and the page shows it."""
    job = tiny_job(str(tmp_path / "store"), tmp_path, model_dir, tiny_corpus_dir,
                   f"model.hookpoint={MLP_IN}", f"model.target_hookpoint={MLP_OUT}")
    run = tmp_path / "runs" / "tiny"
    open_store(str(run)).put_bytes("config.json", json.dumps(to_dict(job)).encode())
    folder = run / "dictionary" / dictionary_folder_name(MLP_IN, MLP_OUT)
    files = dictionary_files(transcoders["transcoder"], hookpoint=MLP_IN, hookpoint_out=MLP_OUT,
                             model_name=str(model_dir), scale=1.0, extra_metadata={"run_name": "tiny"}, sparsity=None,
                             eval_metrics=RECONSTRUCTION)
    write_dictionary(open_store(str(folder)), files)
    cards = [FeatureCard(i, "random", 0.1, 5, 3.0, []) for i in range(0, 128, 9)]
    open_store(str(folder)).put_bytes(FEATURES_FILE, FeatureSample(cards, 128, "", False, 0).to_json())
    assert saeforge(["eval", str(folder)]) == 0
    evaluation = _eval_json(str(folder))
    lm = evaluation["lm"]
    assert (lm["hookpoint"], lm["target_hookpoint"], lm["text"]) == (MLP_IN, MLP_OUT, f"held-out units of {tiny_corpus_dir}")
    assert lm["spliced_ce"] < lm["ablated_ce"]
    assert {w["sequence"] for w in evaluation["unexplained"]["worst_contexts"]} <= set(range(40, 48))
    audit = evaluation["audit"]
    assert len(audit["features"]) == EvalConfig().audit_features and set(audit["features"]) <= {c.index for c in cards}
    for kind in ("amplify", "suppress"):
        assert [f["feature"] for f in audit[kind]["features"]] == audit["features"]
        assert {f["error_term"] for f in audit[kind]["features"]} == {"keep"}
    page = (folder / REPORT_FILE).read_text()
    assert f"reads {MLP_IN} -&gt; writes {MLP_OUT}" in page and "spliced LM: ce_recovered" in page
    assert all(f'id="audit-{f}"' in page for f in audit["features"])


def test_a_transcoder_into_the_mlps_neurons_is_evaluated_and_its_audit_skipped_without_a_logit_lens(
        model_dir, tiny_corpus_dir, tmp_path, caplog):
    """A transcoder whose target is the MLP's 64 neurons (down_proj's input) splices there, and
    its audit, which targets the tokens a feature promotes through the unembedding, is skipped in
    one line."""
    target = "model.layers.1.mlp.down_proj:input"
    folder = tmp_path / "neurons"
    sae = TopKSAE(32, 128, 8, d_out=64, apply_b_dec_to_input=False, seed=0)
    write_dictionary(open_store(str(folder)), dictionary_files(
        sae, hookpoint=MLP_IN, hookpoint_out=target, model_name=str(model_dir), scale=1.0, extra_metadata={},
        sparsity=None, eval_metrics=RECONSTRUCTION))
    cards = [FeatureCard(i, "random", 0.1, 5, 3.0, []) for i in range(0, 128, 9)]
    open_store(str(folder)).put_bytes(FEATURES_FILE, FeatureSample(cards, 128, "", False, 0).to_json())
    with caplog.at_level("INFO", logger="cluster.evaluation"):
        assert saeforge(["eval", str(folder), "--text", str(tiny_corpus_dir), "--max-tokens", "256"]) == 0
    evaluation = _eval_json(str(folder))
    assert (evaluation["lm"]["target_hookpoint"], evaluation["lm"]["n_tokens"]) == (target, 254)
    assert evaluation["lm"]["ablated_ce"] > evaluation["lm"]["clean_ce"]
    skipped = evaluation["audit"]["skipped"]
    assert "the logit lens does not apply: the dictionary writes d_out=64" in skipped and "\n" not in skipped
    assert f"steer audit skipped: {skipped}" in caplog.text


# --------------------------------------------------------------------------- cross-layer transcoders

N_LAYERS = 4
"""The tiny Llama's layers: the CLTs below cover all of them."""


def _all_mlp_sides(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of every layer's MLP for ``tokens`` (B, S), each (B, S, L * 32), layers
    side by side in order, read with hooks registered here."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        handles.append(block.mlp.register_forward_pre_hook(lambda m, args, layer=layer: seen.setdefault(("in", layer), args[0])))
        handles.append(block.mlp.register_forward_hook(lambda m, args, out, layer=layer: seen.setdefault(("out", layer), out)))
    with torch.inference_mode():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return tuple(torch.cat([seen[side, layer] for layer in range(N_LAYERS)], dim=-1) for side in ("in", "out"))


CLT_INPUTS = [f"model.layers.{layer}.mlp:input" for layer in range(N_LAYERS)]
CLT_TARGETS = [f"model.layers.{layer}.mlp" for layer in range(N_LAYERS)]


@pytest.fixture(scope="module")
def clt_folders(model_dir, tiny_corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """Folders of a TopK (k per layer) and a JumpReLU CLT over the tiny Llama's 4 layers, 48
    features per layer, each trained for 100 steps on the corpus's MLP inputs and outputs with
    per-layer scales (folded into the saved weights)."""
    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    tokens = pack_sequences(DataConfig(source=str(tiny_corpus_dir), context_length=32, max_tokens=32 * 64),
                            load_tokenizer(source))
    x, y = (side.reshape(-1, N_LAYERS * 32) for side in _all_mlp_sides(load_model(source), torch.from_numpy(tokens)))
    scales = [32**0.5 / side.view(len(side), N_LAYERS, 32).norm(dim=-1).mean(dim=0) for side in (x, y)]
    folders = {}
    for activation, options in (("topk", {"k": 6, "kernel": "dense"}), ("jumprelu", {"sparsity_coefficient": 1e-3})):
        clt = CrossLayerTranscoder(N_LAYERS, 32, 48, activation=activation, seed=0, input_scales=scales[0],
                                   target_scales=scales[1], **options)
        fit_transcoder(clt, x.clone(), y.clone(), 100)
        folder = tmp_path_factory.mktemp(f"clt-{activation}")
        write_dictionary(open_store(str(folder)), dictionary_files(
            clt, hookpoint=CLT_INPUTS[0], hookpoint_out=CLT_TARGETS[0], hookpoints=CLT_INPUTS,
            hookpoints_out=CLT_TARGETS, model_name=str(model_dir), scale=1.0, extra_metadata={"run_name": "tiny"},
            sparsity=None, eval_metrics=RECONSTRUCTION))
        folders[activation] = folder
    return folders


class _HandCLT:
    """A CLT folder's prediction computed from its saved weights (sae_weights.safetensors):
    layer l's features read x_l (JumpReLU: pre-activations above their threshold; TopK: the k
    largest ReLU'd ones), layer l' is b_dec[l'] + sum_{l <= l'} f_l W_dec_l[:, l' - l]."""

    def __init__(self, folder: Path) -> None:
        self.weights = load_safetensors((folder / WEIGHTS_FILE).read_bytes())
        self.k = json.loads((folder / "cfg.json").read_text()).get("k")

    def features(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.weights["W_enc"][layer] + self.weights["b_enc"][layer]
        if self.k is None:
            return pre * (pre > self.weights["threshold"][layer])
        top = torch.relu(pre).topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def predict(self, layer: int, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.weights["b_dec"][layer] + sum(features[source] @ self.weights[f"W_dec_{source}"][:, layer - source]
                                                  for source in range(layer + 1))


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_a_clt_spliced_over_every_layer_gives_the_losses_of_a_hand_made_splice(
        model_dir, tiny_corpus_dir, clt_folders, activation, capsys):
    """``saeforge eval`` on a CLT folder: every MLP output replaced at once by the CLT's
    prediction (layer l's features encoded from its input as the spliced forward computes it,
    layer l' written by the features of layers <= l'), every MLP output zeroed for the baseline;
    CE, KL, the per-layer FVU and the error over all layers equal the same splice done here with
    plain torch hooks on the 4 MLPs and the saved weights."""
    folder = clt_folders[activation]
    cards = [FeatureCard(i, "random", 0.1, 5, 3.0, []) for i in range(0, N_LAYERS * 48, 5)]
    open_store(str(folder)).put_bytes(FEATURES_FILE, FeatureSample(cards, 128, "", False, 0).to_json())
    assert saeforge(["eval", str(folder), "--text", str(tiny_corpus_dir), "--max-tokens", "512"]) == 0
    evaluation = _eval_json(str(folder))
    lm, unexplained = evaluation["lm"], evaluation["unexplained"]
    out = capsys.readouterr().out
    assert f"spliced          4 layers at once: reads {CLT_INPUTS[0]} .. writes {CLT_TARGETS[-1]}" in out
    assert all(f"FVU spliced      {entry['fvu']:.4f}  at {entry['hookpoint_out']}" in out for entry in lm["layers"])

    source = resolve_model_source(ModelConfig(name_or_path=str(model_dir)))
    model, tokenizer = load_model(source), load_tokenizer(source)
    data = DataConfig(source=str(tiny_corpus_dir), max_tokens=512)
    tokens = torch.from_numpy(pack_sequences(data, tokenizer))
    kept = ~torch.isin(tokens, torch.tensor(sorted(excluded_token_ids(data, tokenizer))))
    hand = _HandCLT(folder)
    features: dict[int, torch.Tensor] = {}
    sides: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(layer, x):
        features[layer] = hand.features(layer, x)

    def predict(layer, out):
        sides[layer] = (out, hand.predict(layer, features))
        return torch.where(kept[..., None], sides[layer][1], out)

    logits = {}
    mlps = [block.mlp for block in model.model.layers]
    with torch.inference_mode():
        logits["clean"] = model(input_ids=tokens).logits
        handles = [h for layer, mlp in enumerate(mlps) for h in (
            mlp.register_forward_pre_hook(lambda m, args, layer=layer: encode(layer, args[0])),
            mlp.register_forward_hook(lambda m, args, out, layer=layer: predict(layer, out)))]
        logits["spliced"] = model(input_ids=tokens).logits
        for handle in handles:
            handle.remove()
        handles = [mlp.register_forward_hook(lambda m, args, out: torch.where(kept[..., None], 0.0, out)) for mlp in mlps]
        logits["ablated"] = model(input_ids=tokens).logits
        for handle in handles:
            handle.remove()
    ce = {name: _next_token_losses(value, tokens, kept) for name, value in logits.items()}
    log_clean, log_spliced = (torch.log_softmax(logits[n][:, :-1].double(), dim=-1)[kept[:, :-1]] for n in ("clean", "spliced"))
    kl = (log_clean.exp() * (log_clean - log_spliced)).sum(dim=-1)
    assert lm["n_tokens"] == len(ce["clean"]) == kept[:, :-1].sum()
    for name in ("clean", "spliced", "ablated"):
        assert lm[f"{name}_ce"] == pytest.approx(ce[name].mean().item(), rel=1e-5)
    assert lm["kl_divergence"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-7)
    clean, spliced_ce, ablated = (ce[n].mean().item() for n in ("clean", "spliced", "ablated"))
    assert lm["ce_recovered"] == pytest.approx((ablated - spliced_ce) / (ablated - clean), rel=1e-4)
    assert spliced_ce < ablated and lm["kl_divergence"] > 0

    # Per layer: the MLP's output in the spliced forward against the prediction, pooled FVU.
    errors = []
    for layer, entry in enumerate(lm["layers"]):
        y, prediction = (side[kept].double() for side in sides[layer])
        errors.append(y - prediction)
        fvu = (y - prediction).pow(2).sum() / (y - y.mean(dim=0)).pow(2).sum()
        assert (entry["hookpoint"], entry["hookpoint_out"]) == (CLT_INPUTS[layer], CLT_TARGETS[layer])
        assert entry["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
        assert unexplained["layers"][layer]["hookpoint_out"] == CLT_TARGETS[layer]
        assert unexplained["layers"][layer]["error_norm"]["max"] == pytest.approx(
            (y - prediction).norm(dim=-1).max().item(), rel=1e-4)
    # Over all layers: a token's error is its 4 layers' errors side by side.
    norms = torch.zeros(kept.shape, dtype=torch.float64)
    norms[kept] = torch.cat(errors, dim=-1).norm(dim=-1)
    assert unexplained["n_tokens"] == kept.sum()
    assert unexplained["error_norm"]["max"] == pytest.approx(norms.max().item(), rel=1e-4)
    assert unexplained["error_norm"]["mean"] == pytest.approx(norms[kept].mean().item(), rel=1e-4)
    for entry in unexplained["worst_contexts"]:
        assert entry["error_norm"] == pytest.approx(norms[entry["sequence"], entry["position"]].item(), rel=1e-4)
    assert (lm["hookpoint"], lm["target_hookpoint"]) == (CLT_INPUTS[0], CLT_TARGETS[-1])
    assert {k: evaluation[k] for k in RECONSTRUCTION} == RECONSTRUCTION
    # The steer audit edits two of the cards' features where they write (every later MLP output), the error kept.
    audit = evaluation["audit"]
    assert len(audit["features"]) == EvalConfig().audit_features and set(audit["features"]) <= {c.index for c in cards}
    for kind in ("amplify", "suppress"):
        assert [f["feature"] for f in audit[kind]["features"]] == audit["features"]
        assert {f["error_term"] for f in audit[kind]["features"]} == {"keep"}
    page = (folder / REPORT_FILE).read_text()
    assert "Cross-layer transcoder report: layers 0–3" in page and "spliced LM: ce_recovered" in page
    assert all(f'id="audit-{f}"' in page for f in audit["features"])


def test_a_splice_of_several_pairs_replaces_them_in_order_each_from_its_own_input(model_dir):
    """Each pair's replacement gets that pair's input as the forward computed it after the earlier
    replacements; pairs listed out of their forward order are refused in one line."""
    model = load_model(resolve_model_source(ModelConfig(name_or_path=str(model_dir))))
    ids = torch.randint(3, 200, (2, 10))
    pairs = [(f"mlp_in.{layer}", f"mlp_out.{layer}") for layer in range(N_LAYERS)]
    calls = []

    def halve(i, acts, target):
        calls.append((i, acts))
        return target / 2

    with torch.inference_mode():
        with spliced_pairs(model, pairs, halve) as names:
            halved = model(input_ids=ids).logits
        handles = [block.mlp.register_forward_hook(lambda m, args, out: out / 2) for block in model.model.layers]
        seen = _all_mlp_sides(model, ids)[0]
        expected = model(input_ids=ids).logits
        for handle in handles:
            handle.remove()
        with pytest.raises(ValueError, match=r"^target hookpoint model\.layers\.0\.mlp \(pair 1\) runs out of order in "
                                             r"the forward pass: expected model\.layers\.1\.mlp \(pair 0\) next"):
            with spliced_pairs(model, pairs[1::-1], lambda i, acts, target: target):
                model(input_ids=ids)
    assert names == [(f"model.layers.{layer}.mlp:input", f"model.layers.{layer}.mlp") for layer in range(N_LAYERS)]
    assert [i for i, _ in calls] == list(range(N_LAYERS))
    torch.testing.assert_close(torch.cat([acts for _, acts in calls], dim=-1), seen, rtol=0, atol=0)
    torch.testing.assert_close(halved, expected, rtol=0, atol=0)
