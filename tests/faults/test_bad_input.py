"""Bad input is refused through the command line a user meets, in one line that quotes the
offending value and names what was expected, before any model weights load, before Ray starts
and before any object is written.

No weights load: every job here points at a model directory whose config and tokenizer are valid
but whose weights file is garbage, so a weight load would fail with a safetensors error instead
of the refusal asserted (``test_the_guard_model_cannot_load``). Nothing starts: Ray is not
initialised and no Ray process is a child of this one afterwards. Nothing is written: the cache
root, the run and the logging folder stay absent (an S3 bucket stays empty).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ranks import free_port
from tiny_job import CONTEXT, PER_SHARD, SEQUENCES

from activation_cache.config import ModelConfig
from activation_cache.hooking import load_model, resolve_model_source
from activation_cache.manifest import Manifest, commit_manifest
from activation_cache.store import StoreError, open_store
from cluster.cli import main as saeforge
from cluster.config import compose_job
from cluster.driver import absolute_uri, plan_caches
from trainer.dictionary import dictionary_files
from trainer.layout import write_dictionary
from trainer.sae import TopKSAE


@pytest.fixture(scope="module")
def guard_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights replaced by garbage: config and tokenizer load, weights do not."""
    model = tmp_path_factory.mktemp("guard") / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not safetensors " * 64)
    return model


@pytest.fixture(scope="module")
def bad_files(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-files")
    (root / "latin1").mkdir()
    (root / "latin1" / "plays.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    (root / "no-text").mkdir()
    (root / "no-text" / "notes.md").write_text("not a text source suffix")
    (root / "blank").mkdir()
    (root / "blank" / "empty.txt").write_text("")
    pq.write_table(pa.table({"body": ["To be, or not to be"] * 50}), root / "body.parquet")
    (root / "records.jsonl").write_text(json.dumps({"body": "To be, or not to be"}) + "\n")
    (root / "broken.jsonl").write_text("{'text': 'single quotes are not JSON'}\n")
    (root / "table.csv").write_text("text\nTo be\n")
    (root / "tokenizer-only").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, root / "tokenizer-only" / name)
    (root / "t5").mkdir()
    (root / "t5" / "config.json").write_text(json.dumps(
        {"model_type": "t5", "d_model": 32, "num_layers": 2, "num_heads": 2, "d_kv": 8, "d_ff": 64, "vocab_size": 300}))
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text('{"model_type": "llama",')
    return root


def _base(tmp_path: Path, model: Path, corpus: Path) -> list[str]:
    """The tiny job's overrides (tests/tiny_job.py), on the guard model."""
    return [
        "model=local", f"model.name_or_path={model}", "model.hookpoint=resid_post.2", "model.batch_size=4",
        "data=text_files", f"data.source={corpus}", f"data.context_length={CONTEXT}",
        f"data.max_tokens={CONTEXT * SEQUENCES}", f"cache.uri={tmp_path / 'store'}",
        f"cache.sequences_per_shard={PER_SHARD}", "sae.n_latents=128", "sae.k=8", "train.batch_size=64",
        f"logging.dir={tmp_path / 'outputs'}", "cluster.object_store_memory_bytes=209715200",
    ]


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]
    """Added to the tiny job's; ``{files}`` is the folder of bad files, ``{tmp}`` the test's folder."""
    value: str
    """The offending value, as the message must quote it."""
    expected: str
    """What the message must say was expected."""


CASES = {
    # config values out of range or inconsistent
    "n_latents_zero": Case(("sae.n_latents=0",), "sae.n_latents=0", "must be positive"),
    "k_above_n_latents": Case(("sae.k=200",), "sae.k=200", "must be in [1, sae.n_latents=128]"),
    "unknown_architecture": Case(("sae.architecture=relu",), "sae.architecture='relu'", "expected one of ['topk'"),
    "negative_learning_rate": Case(("train.lr=-0.1",), "train.lr=-0.1", "must be positive"),
    "batch_not_divisible_by_ranks": Case(("train.batch_size=63",), "train.batch_size=63",
                                         "must be divisible by cluster.num_train_workers=2"),
    "feature_parallel_not_dividing_n_latents": Case(
        ("cluster.num_train_workers=4", "deepspeed.feature_parallel=2", "sae.auxk_coefficient=0", "sae.n_latents=129"),
        "sae.n_latents=129", "deepspeed.feature_parallel=2 must divide"),
    "feature_parallel_not_dividing_workers": Case(("deepspeed.feature_parallel=3", "sae.auxk_coefficient=0"),
                                                  "deepspeed.feature_parallel=3", "must divide cluster.num_train_workers=2"),
    "hookpoint_layer_out_of_range": Case(("model.hookpoint=resid_post.9",), "'resid_post.9'", "model has 4 layers (0..3)"),
    "hookpoint_unknown_module": Case(("model.hookpoint=model.nope",), "'model.nope'", "expected a module path"),
    "transcoder_target_layer_out_of_range": Case(("model.hookpoint=mlp_in.1", "model.target_hookpoint=mlp_out.9"),
                                                 "'mlp_out.9'", "model has 4 layers (0..3)"),
    "transcoder_target_unknown_module": Case(("model.hookpoint=mlp_in.1", "model.target_hookpoint=model.layers.1.mlp.nope"),
                                             "'model.layers.1.mlp.nope'", "expected a module path"),
    "transcoder_architecture_that_cannot_be_one": Case(
        ("model.hookpoint=mlp_in.1", "model.target_hookpoint=mlp_out.1", "sae=matryoshka"),
        "sae.architecture='matryoshka_batchtopk'", "cannot be a transcoder"),
    "transcoder_with_hookpoints_list": Case(
        ("model.target_hookpoint=mlp_out.1", "model.hookpoints=[mlp_in.1,resid_post.1]"),
        "model.target_hookpoint='mlp_out.1'", "give one or the other"),
    "skip_connection_without_a_target": Case(("sae.skip_connection=true",), "sae.skip_connection=true",
                                             "it needs model.target_hookpoint"),
    "transcoder_feature_parallel": Case(
        ("model.hookpoint=mlp_in.1", "model.target_hookpoint=mlp_out.1", "deepspeed.feature_parallel=2",
         "sae.auxk_coefficient=0"), "deepspeed.feature_parallel=2", "trains data-parallel only"),
    "clt_layers_out_of_order": Case(("model.clt_layers=[3,1]",), "model.clt_layers=[3, 1]", "expected [first, last] with first <= last"),
    "clt_layers_beyond_the_model": Case(("model.clt_layers=[2,7]",), "'mlp_in.4'", "model has 4 layers (0..3)"),
    "clt_layers_not_a_range": Case(("model.clt_layers=[1]",), "model.clt_layers=[1]", "expected [first, last]"),
    "clt_latents_not_splitting_over_the_ranks": Case(
        ("model.clt_layers=[0,3]", "sae=jumprelu", "sae.n_latents=100", "deepspeed.feature_parallel=8",
         "cluster.num_train_workers=8", "train.batch_size=64"),
        "deepspeed.feature_parallel=8 must divide sae.n_latents=100", "latents per layer"),
    "clt_architecture": Case(("model.clt_layers=[0,3]", "sae=relu_l1"), "sae.architecture='relu_l1'",
                             "cannot be a cross-layer transcoder"),
    "hookpoints_naming_one_place_twice": Case(("model.hookpoints=[resid_post.1,model.layers.1]",),
                                              "'resid_post.1' and 'model.layers.1'", "both name model.layers.1"),
    "zero_stage": Case(("deepspeed.zero_stage=4",), "deepspeed.zero_stage=4", "must be 0, 1, 2 or 3"),
    "encoder_gemm": Case(("sae.encoder_gemm=fp16",), "sae.encoder_gemm='fp16'", "expected one of ['param', 'bf16', 'auto']"),
    "encoder_gemm_without_topk": Case(("sae=jumprelu", "sae.encoder_gemm=bf16"), "sae.architecture='jumprelu'",
                                      "only topk has a separate encoder GEMM dtype"),
    "encoder_gemm_clt": Case(("model.clt_layers=[0,3]", "sae.encoder_gemm=bf16"), "sae.encoder_gemm='bf16'",
                             "cross-layer transcoder's GEMMs run in the parameters' dtype"),
    "fp16_precision": Case(("deepspeed.precision=fp16",), "deepspeed.precision='fp16'", "expected 'fp32' or 'bf16'"),
    "cache_dtype": Case(("cache.dtype=int8",), "cache.dtype='int8'", "expected one of ['float32'"),
    "model_dtype": Case(("model.dtype=float16",), "model.dtype='float16'", "expected one of ['auto', 'float32', 'bfloat16']"),
    "context_length": Case(("data.context_length=1",), "data.context_length=1", "must be at least 2"),
    "holdout_fraction": Case(("train.holdout_fraction=1.5",), "train.holdout_fraction=1.5", "must be in (0, 1)"),
    "not_an_integer": Case(("sae.n_latents=many",), "'many'", "could not be converted to Integer"),
    "misspelt_setting": Case(("sae.n_latent=128",), "sae.n_latent", "expected one of ['architecture', 'n_latents'"),
    "added_setting_nothing_reads": Case(("+train.learning_rate=0.1",), "train.learning_rate",
                                        "expected one of ['batch_size', 'lr'"),
    "unknown_preset": Case(("experiment=laptp",), "experiment=laptp", "expected one of ['gpu_node', 'laptop', 'multi_node']"),
    "too_few_shards_for_the_ranks": Case(("data.max_tokens=256",), "data.max_tokens=256", "needs one training shard each"),
    "excluded_token_outside_vocabulary": Case(("data.exclude_token_ids=[100000]",), "100000",
                                              "outside the tokenizer's vocabulary (0..299)"),
    "resume_without_checkpoint": Case(("resume=ghost",), "resume='ghost'", "no complete checkpoint under"),
    # URIs that need no server
    "unknown_scheme": Case(("cache.uri=gs://bucket/x",), "cache.uri='gs://bucket/x'", "expected s3://, file:// or a path"),
    "uri_without_bucket": Case(("cache.uri=s3:///x",), "cache.uri='s3:///x'", "expected s3://bucket/prefix"),
    # files
    "text_not_utf8": Case(("data.source={files}/latin1",), "latin1/plays.txt", "not UTF-8 text"),
    "folder_without_text": Case(("data.source={files}/no-text",), "no-text'", "holds no .txt, .jsonl, .parquet files"),
    "empty_dataset": Case(("data.source={files}/blank",), "blank'", "fewer than one sequence of data.context_length=32"),
    "parquet_without_column": Case(("data.source={files}/body.parquet",), "no column 'text'", "it has ['body']"),
    "jsonl_without_field": Case(("data.source={files}/records.jsonl",), "records.jsonl line 1", "no string field 'text'"),
    "jsonl_not_json": Case(("data.source={files}/broken.jsonl",), "broken.jsonl line 1", "not JSON"),
    "unsupported_file_type": Case(("data.source={files}/table.csv",), "table.csv'", "expected a .txt, .jsonl, .parquet file"),
    "missing_text": Case(("data.source={tmp}/nowhere",), "nowhere'", "no such file or folder"),
    "missing_model_directory": Case(("model.name_or_path={tmp}/no-model",), "no-model'", "no such model directory"),
    "model_directory_without_config": Case(("model.name_or_path={files}/tokenizer-only",), "tokenizer-only'",
                                           "no config.json (not a Hugging Face model directory)"),
    "model_not_a_causal_lm": Case(("model.name_or_path={files}/t5",), "model_type 't5'", "is not a causal LM"),
    "model_config_not_json": Case(("model.name_or_path={files}/bad-config",), "bad-config'", "is not a valid JSON file"),
    "unknown_packaged_model": Case(("model.name_or_path=packaged:gpt5",), "'packaged:gpt5'",
                                   "expected ['packaged:smollm2-135m']"),
    "missing_gguf_file": Case(("model.gguf_file=model.gguf",), "model.gguf", "no such file"),
}


def _ray_children() -> list[str]:
    return [p.name() for p in psutil.Process().children(recursive=True) if "ray" in p.name() or "gcs" in p.name()]


def _assert_refused(code: int, captured, command: str, *expected: str) -> str:
    """One line on stderr naming ``expected``; nothing on stdout; Ray never started."""
    err = captured.err
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"saeforge {command}: error: "), err
    for part in expected:
        assert part in err, f"{part!r} not in {err!r}"
    assert "Traceback" not in err and "deserializing header" not in err, "the guard model's weights were loaded"
    assert captured.out == ""
    assert not ray.is_initialized() and not _ray_children(), "Ray started for a refused job"
    return err


def _assert_nothing_written(tmp_path: Path) -> None:
    for name in ("store", "outputs"):
        assert not (tmp_path / name).exists(), f"{name}/ was written for a refused job"


def test_the_guard_model_cannot_load(guard_model):
    """The refusals below happen before the weights load: loading these weights fails."""
    with pytest.raises(Exception) as info:
        load_model(resolve_model_source(ModelConfig(name_or_path=str(guard_model))))
    assert "header" in str(info.value).lower() or "safetensors" in type(info.value).__module__


@pytest.mark.parametrize("name", CASES)
def test_train_refuses_bad_input_before_anything_starts(name, guard_model, tiny_corpus_dir, bad_files, tmp_path,
                                                        capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # `saeforge train` sets it when unset
    case = CASES[name]
    overrides = [o.format(files=bad_files, tmp=tmp_path) for o in case.overrides]
    code = saeforge(["train", *_base(tmp_path, guard_model, tiny_corpus_dir), *overrides])
    _assert_refused(code, capsys.readouterr(), "train", case.value, case.expected)
    _assert_nothing_written(tmp_path)


def test_a_cache_whose_d_model_differs_from_the_model_is_refused(guard_model, tiny_corpus_dir, tmp_path, capsys,
                                                                monkeypatch):
    """A cache at the job's key whose manifest says d_model=64 (the model's is 32) is refused
    before anything is written next to it or Ray starts."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = _base(tmp_path, guard_model, tiny_corpus_dir)
    job = compose_job(base)
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    commit_manifest(open_store(plan.uri), Manifest(
        cache_key=plan.key, key_inputs=plan.key_inputs, model=plan.meta.model, revision=plan.meta.revision,
        hookpoint=plan.hookpoint, d_model=64, dtype=plan.meta.dtype))
    before = sorted(p for p in (tmp_path / "store").rglob("*"))
    code = saeforge(["train", *base])
    _assert_refused(code, capsys.readouterr(), "train", "holds d_model=64", "expects d_model=32")
    assert sorted(p for p in (tmp_path / "store").rglob("*")) == before, "a refused job wrote beside the cache"
    assert not (tmp_path / "outputs").exists()


def test_a_transcoder_whose_target_cache_holds_another_token_stream_is_refused(
    guard_model, tiny_corpus_dir, tmp_path, capsys, monkeypatch
):
    """The input and target caches of a transcoder must hold the same tokens of one model: a target
    cache at the job's key that records another token stream is refused before Ray starts or
    anything is written beside it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = [*_base(tmp_path, guard_model, tiny_corpus_dir), "model.hookpoint=mlp_in.1", "model.target_hookpoint=mlp_out.1"]
    job = compose_job(base)
    plans = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    for plan, tokens in zip(plans, ("", "0" * 64), strict=True):
        inputs = {**plan.key_inputs, **({"tokens_sha256": tokens} if tokens else {})}
        commit_manifest(open_store(plan.uri), Manifest(
            cache_key=plan.key, key_inputs=inputs, model=plan.meta.model, revision=plan.meta.revision,
            hookpoint=plan.hookpoint, d_model=plan.meta.d_model, dtype=plan.meta.dtype))
    before = sorted(p for p in (tmp_path / "store").rglob("*"))
    code = saeforge(["train", *base])
    _assert_refused(code, capsys.readouterr(), "train", "tokens_sha256", "0000000000")
    assert sorted(p for p in (tmp_path / "store").rglob("*")) == before, "a refused job wrote beside the cache"
    assert not (tmp_path / "outputs").exists()


def _mismatched_dictionary(folder: Path, cfg_changes: dict, weights: bytes | None) -> Path:
    """A dictionary whose cfg.json disagrees with its weights, or whose weights are not
    safetensors (its checksums are right)."""
    files = dictionary_files(TopKSAE(16, 64, 4, seed=0), hookpoint="model.layers.2", model_name="tiny", scale=1.0,
                             extra_metadata={}, sparsity=torch.rand(64), eval_metrics={"fvu": 0.5})
    files["cfg.json"] = json.dumps({**json.loads(files["cfg.json"]), **cfg_changes}).encode()
    if weights is not None:
        files["sae_weights.safetensors"] = weights
    write_dictionary(open_store(str(folder)), files)
    return folder


@pytest.mark.parametrize(("cfg_changes", "weights", "expected"), [
    ({"d_sae": 32}, None, ("W_enc shape (16, 64)", "cfg.json d_in=16, d_sae=32 expects (16, 32)")),
    ({"architecture": "gated"}, None, ("architecture='gated'", "expected one of")),
    ({}, b"PK\x03\x04 a zip, not safetensors", ("sae_weights.safetensors", "not a safetensors file")),
], ids=["shape_mismatch", "unknown_architecture", "weights_not_safetensors"])
def test_pull_and_eval_refuse_a_dictionary_whose_cfg_does_not_match(cfg_changes, weights, expected, guard_model,
                                                                    tiny_corpus_dir, tmp_path, capsys):
    source = _mismatched_dictionary(tmp_path / "run" / "dictionary" / "model.layers.2", cfg_changes, weights)
    stored = {p.name: p.read_bytes() for p in source.iterdir()}
    code = saeforge(["pull", str(source), str(tmp_path / "pulled")])
    _assert_refused(code, capsys.readouterr(), "pull", *expected)
    assert not (tmp_path / "pulled").exists(), "pull wrote into its target"
    # eval checks the dictionary before it loads the model (whose weights are garbage here).
    code = saeforge(["eval", str(source), "--model", str(guard_model), "--text", str(tiny_corpus_dir)])
    _assert_refused(code, capsys.readouterr(), "eval", *expected)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == stored, "eval wrote into the dictionary"


# ------------------------------------------------------------------------- on a real S3 endpoint

@pytest.mark.parametrize("name", ["missing_bucket", "unreachable_endpoint", "wrong_secret_key",
                                  "wrong_access_key_with_debug_logs"])
def test_train_refuses_bad_s3_settings_before_anything_starts(name, s3_server, s3_bucket_uri, guard_model,
                                                              tiny_corpus_dir, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    caplog.set_level(logging.DEBUG)
    overrides = [f"cache.uri={s3_bucket_uri}"]
    wrong = "Wrong" + uuid.uuid4().hex + "Key"
    if name == "missing_bucket":
        missing = f"saeforge-missing-{uuid.uuid4().hex[:12]}"
        overrides = [f"cache.uri=s3://{missing}/prefix"]
        expected = (f"bucket {missing!r}", "does not exist")
    elif name == "unreachable_endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        overrides.append(f"cache.s3_endpoint_url={endpoint}")
        expected = (endpoint, "Could not connect to the endpoint URL")
    elif name == "wrong_secret_key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        expected = (s3_bucket_uri, "SignatureDoesNotMatch")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong)
        overrides.append("logging.level=DEBUG")
        expected = (s3_bucket_uri, "InvalidAccessKeyId")
    started = time.monotonic()
    code = saeforge(["train", *_base(tmp_path, guard_model, tiny_corpus_dir), *overrides])
    seconds = time.monotonic() - started
    err = _assert_refused(code, capsys.readouterr(), "train", *expected)
    assert seconds < 20, f"refused after {seconds:.0f} s: retries and timeouts must be bounded"
    for secret in (wrong, s3_server.secret_key, s3_server.access_key):
        assert secret not in err, "a credential is in the error message"
        assert secret not in caplog.text, "a credential is in the logs"
    for name_, value in s3_server.env().items():  # back to the right credentials to look at the bucket
        monkeypatch.setenv(name_, value)
    if name == "missing_bucket":
        with pytest.raises(StoreError, match="does not exist"):
            open_store(overrides[0].split("=", 1)[1]).list()
    else:
        assert open_store(s3_bucket_uri.rsplit("/", 1)[0]).list() == [], "a refused job wrote to the bucket"
    _assert_nothing_written(tmp_path)


# ------------------------------------------------------------------------- saeforge observe

def _observable_dictionary(folder: Path, *, d_in: int = 32, hook_name: str = "model.layers.2") -> Path:
    """A TopK dictionary (random weights) reading ``hook_name``; its model comes from ``--model``."""
    files = dictionary_files(TopKSAE(d_in, 64, 4, seed=0), hookpoint=hook_name, model_name="tiny", scale=1.0,
                             extra_metadata={}, sparsity=torch.rand(64), eval_metrics={"fvu": 0.5})
    write_dictionary(open_store(str(folder)), files)
    return folder


@pytest.mark.parametrize(("case", "expected"), [
    ("unknown_feature", ("feature 64", "features 0..63")),
    ("negative_feature", ("feature -1", "features 0..63")),
    ("width_mismatch", ("dictionary d_in=16", "model.layers.2 has width 32")),
    ("empty_text", ("text ''", "tokenizes to no token the dictionary encodes")),
    ("not_a_dictionary", ("not a dictionary folder", "no cfg.json")),
    ("unknown_hook_name", ("'blocks.2.hook_z'", "--hookpoint")),
    ("bad_hookpoint", ("hookpoint 'resid_post.9'", "model has 4 layers")),
    ("zero_top", ("--top 0", "at least 1")),
    ("missing_prompts_file", ("--prompts-file", "no such file")),
], ids=lambda value: value if isinstance(value, str) else None)
def test_observe_refuses_bad_input_before_the_model_loads(case, expected, guard_model, tmp_path, capsys):
    """Each refusal is one line and comes before the model's weights load (they are garbage here)."""
    folder = tmp_path / "dictionary"
    _observable_dictionary(folder, d_in=16 if case == "width_mismatch" else 32,
                           hook_name="blocks.2.hook_z" if case == "unknown_hook_name" else "model.layers.2")
    args = [str(folder), "--model", str(guard_model), "--text", "To be, or not to be"]
    if case in ("unknown_feature", "negative_feature"):
        args += ["--feature", "64" if case == "unknown_feature" else "-1"]
    elif case == "empty_text":
        args[args.index("--text") + 1] = ""
    elif case == "not_a_dictionary":
        args[0] = str(tmp_path)  # holds the dictionary folder, but is none itself
    elif case == "bad_hookpoint":
        args += ["--hookpoint", "resid_post.9"]
    elif case == "zero_top":
        args += ["--top", "0"]
    elif case == "missing_prompts_file":
        args[-2:] = ["--prompts-file", str(tmp_path / "absent.txt")]
    stored = {p.name: p.read_bytes() for p in folder.iterdir()}
    _assert_refused(saeforge(["observe", *args]), capsys.readouterr(), "observe", *expected)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == stored, "observe wrote into the dictionary"


@pytest.mark.parametrize(("case", "expected"), [
    ("unknown_feature", ("feature 64", "features 0..63")),
    ("feature_not_a_number", ("--feature '3,x'", "expected feature ids")),
    ("value_not_a_number", ("--value 'lots'", "a number", "10x")),
    ("multiple_without_maxima", ("--value 10x", "records no held-out feature maxima")),
    ("empty_prompt", ("text ''", "tokenizes to no token the dictionary encodes")),
    ("zero_new_tokens", ("--max-new-tokens 0", "at least 1")),
    ("target_of_two_tokens", ("--target 'To be'", "tokenizes to 2 tokens", "one token")),
    ("missing_audit_text", ("data.source=", "no such file or folder")),
    ("html_without_audit", ("--html", "add --audit")),
], ids=lambda value: value if isinstance(value, str) else None)
def test_steer_refuses_bad_input_before_the_model_loads(case, expected, guard_model, tmp_path, capsys):
    """Each refusal is one line and comes before the model's weights load (they are garbage here)."""
    folder = _observable_dictionary(tmp_path / "dictionary")  # records no feature maxima
    options = {"--feature": "3", "--value": "2.5", "--prompt": "To be, or not to be", "--max-new-tokens": "5"}
    options.update({
        "unknown_feature": {"--feature": "64"}, "feature_not_a_number": {"--feature": "3,x"},
        "value_not_a_number": {"--value": "lots"}, "multiple_without_maxima": {"--value": "10x"},
        "empty_prompt": {"--prompt": ""}, "zero_new_tokens": {"--max-new-tokens": "0"},
        "target_of_two_tokens": {"--audit": None, "--target": "To be"},
        "missing_audit_text": {"--audit": None, "--text": str(tmp_path / "absent")},
        "html_without_audit": {"--html": str(tmp_path / "audit.html")},
    }[case])
    args = [str(folder), "--model", str(guard_model), *(part for pair in options.items() for part in pair if part is not None)]
    _assert_refused(saeforge(["steer", *args]), capsys.readouterr(), "steer", *expected)
