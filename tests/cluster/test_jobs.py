"""``saeforge submit | status | logs | stop | list``: the cost estimate, what a job carries to the
cluster, and a tiny job submitted to a real head node on 127.0.0.1 through the Ray Jobs API."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from ranks import free_port
from tiny_job import tiny_overrides

from cluster import jobs
from cluster.cli import main as saeforge
from cluster.config import compose_job

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# A SmolLM2-135M-shaped job as benchmarks/bench_producer.py measured it: 16 of 30 layers run.
SMOLLM2 = jobs.JobShape(tokens=131_072, rows=130_558, train_rows=114_239, d_model=576, n_hookpoints=1,
                        layers_run=16, n_layers=30, model_parameters=134_515_008,
                        non_embedding_parameters=30 * 3_540_096)



def _plan_scale():
    spec = importlib.util.spec_from_file_location("plan_scale", ROOT / "benchmarks" / "plan_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the estimate ---------------------------------------------------------------------------


def test_estimate_reproduces_the_measured_rates_and_counts():
    job = compose_job(["cluster.num_producers=1", "cluster.num_train_workers=2", "train.epochs=1",
                       "sae.n_latents=16384", "deepspeed=zero0"])
    shape = replace(SMOLLM2, d_model=512)
    est = jobs.estimate_cost(job, replace(SMOLLM2, d_model=576))
    # one producer of one CPU forwards the reference model at the rate bench_producer measured
    assert est.producer_seconds == pytest.approx(131_072 / jobs.PRODUCER_MEASURED_TOKENS_PER_S, rel=1e-3)
    assert est.activation_bytes == 130_558 * 576 * 4
    assert est.sae_parameters == 2 * 16384 * 576 + 16384 + 576
    assert est.model_bytes_per_producer == 134_515_008 * 4
    assert est.trained_tokens == 114_239
    assert est.trainer_flops == 6 * 576 * 16384 * 114_239
    # two one-CPU workers train 16,384 latents at d_model 512 at bench_scale's rate
    est = jobs.estimate_cost(job, shape)
    assert est.trainer_seconds == pytest.approx(114_239 / jobs.TRAINER_MEASURED_TOKENS_PER_S)
    bf16 = jobs.estimate_cost(compose_job(["cluster.num_producers=1", "train.epochs=1", "sae.n_latents=16384",
                                           "deepspeed=zero0", "deepspeed.precision=bf16"]), shape)
    assert bf16.trainer_seconds == pytest.approx(est.trainer_seconds / jobs.BF16_TRAINER_SPEEDUP)


def test_estimate_of_a_sweep_over_hookpoints_with_a_reused_cache():
    job = compose_job(["sweep.n_latents=[4096,8192]", "sweep.k=[16,32]", "train.max_tokens=50000"])
    est = jobs.estimate_cost(job, replace(SMOLLM2, n_hookpoints=2, caches_complete=2))
    assert est.dictionaries == 8
    assert est.sae_parameters == 2 * 2 * sum(2 * n * 576 + n + 576 for n in (4096, 8192))
    assert est.trained_tokens == 50_000, "train.max_tokens caps the tokens per dictionary"
    assert est.tokens == 0 and est.producer_flops == 0, "complete caches are reused: no producer runs"
    assert "caches complete" in jobs.format_estimate(job, SMOLLM2, est)
    gpu = jobs.estimate_cost(compose_job(["cluster.producer_num_gpus=1"]), SMOLLM2)
    assert gpu.producer_seconds is None, "no GPU rate was measured: no producer ETA"


def test_estimate_counts_each_hookpoint_at_its_own_width():
    """The MLP neurons (down_proj's input, 1,536 wide in SmolLM2) next to the residual stream."""
    job = compose_job(["sae.n_latents=8192", "train.epochs=1"])
    both = jobs.estimate_cost(job, replace(SMOLLM2, n_hookpoints=2, hookpoint_widths=(576, 1536)))
    residual, neurons = (jobs.estimate_cost(job, replace(SMOLLM2, d_model=w)) for w in (576, 1536))
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
    est = jobs.estimate_cost(job, replace(SMOLLM2, d_model=d))
    expected = _plan_scale().per_gpu_bytes(n, d, gpus=workers, feature_parallel=feature_parallel, zero_stage=stage,
                                           batch=rank_batch, k=k)
    assert est.state_bytes_per_worker + est.working_bytes_per_worker == pytest.approx(expected)


# --- what a submitted job carries -----------------------------------------------------------


def test_runtime_env_ships_the_project_and_no_credentials(monkeypatch):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
               "AWS_SESSION_TOKEN": "session-token-value", "WANDB_API_KEY": "wandb-key-value",
               "RAY_AUTH_TOKEN": "ray-token-value"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    job = compose_job(["cache=s3", "cache.uri=s3://bucket/prefix", "cache.s3_endpoint_url=http://minio:9000"])
    env = jobs.runtime_env(job, jobs.project_root())
    overrides = jobs.job_overrides(job, ["cache=s3", "cache.uri=s3://bucket/prefix"])
    shipped = json.dumps(env) + jobs.entrypoint(overrides)
    assert not [value for value in secrets.values() if value in shipped]
    assert set(env["env_vars"]) <= set(jobs.JOB_ENV_VARIABLES)
    assert env["working_dir"] == str(ROOT) and (ROOT / "pyproject.toml").is_file()
    assert {".venv", ".git", "/store", "/outputs"} <= set(env["excludes"])
    assert overrides[-1] == "cluster.address=auto", "the job's driver must join the cluster it runs on"
    given = ["cluster.address=ray://head:10001", "cache.uri=/shared/store"]
    assert jobs.job_overrides(compose_job(given), given) == given


def test_submit_refuses_a_bad_config_and_a_relative_store_before_contacting_a_cluster(capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    assert saeforge(["submit", "--address", dead, "sae.k=0", "cache.uri=/tmp/x"]) == 2
    assert capsys.readouterr().err.strip() == "saeforge submit: error: sae.k=0 must be in [1, sae.n_latents=4608]"
    assert saeforge(["submit", "--address", dead, "cache.uri=store"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saeforge submit: error: cache.uri='store' is a relative path") and "\n" not in err


def test_an_unreachable_cluster_is_one_line_naming_the_address(capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # --address wins over the environment
    assert saeforge(["status", "--address", dead, "raysubmit_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"saeforge status: error: cannot reach the Ray Jobs API at {dead}")
    monkeypatch.setenv("RAY_ADDRESS", dead)  # ... and the environment over the default
    assert saeforge(["list"]) == 2
    assert dead in capsys.readouterr().err


def _tiny_overrides(tmp_path: Path, model_dir: Path, corpus_dir: Path) -> list[str]:
    # tests/tiny_job.py's job, as command-line overrides, with a local-directory store
    return tiny_overrides(tmp_path / "store", tmp_path, model_dir, corpus_dir, "logging.wandb_mode=disabled")


def test_dry_run_prints_the_estimate_of_the_tiny_job(capsys, tmp_path, tiny_model_dir, tiny_corpus_dir):
    assert saeforge(["submit", "--dry-run", *_tiny_overrides(tmp_path, tiny_model_dir, tiny_corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  tokens +1,536 forwarded, 1,488 activation rows$", out, re.M), out
    assert re.search(r"^  SAE parameters +8,352 in 1 dictionary", out, re.M), out  # 2*128*32 + 128 + 32
    assert re.search(r"^  ETA +", out, re.M)
    assert "cluster.address=auto` with working_dir" in out
    assert not (tmp_path / "store").exists(), "a dry run writes nothing"


# --- a real head node -------------------------------------------------------------------------


class _Head:
    def __init__(self, url: str, temp_dir: str, session_id: int):
        self.url, self.temp_dir, self.session_id = url, temp_dir, session_id


def _stop_head(head: _Head) -> None:
    """Stop this head's processes only. ``ray stop`` would stop every Ray process on the machine
    (other tests' and other users' clusters too), so the processes are found by the session
    ``ray start`` ran in (the daemons stay in it) or a command line naming this head's temp dir,
    and their children (workers, the job's driver); SIGTERM, then SIGKILL after 5 s."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in ours:
                continue
            if os.getsid(proc.pid) == head.session_id or any(head.temp_dir in a for a in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in ours)
        except (psutil.Error, OSError):
            continue
    for proc in found.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head(monkeypatch) -> Iterator[_Head]:
    """``ray start --head`` on 127.0.0.1 (free ports, its own temp dir), started from this venv
    with its ``bin`` on ``PATH`` as an activated venv would be: the job's ``saeforge train`` runs
    with the node's interpreter and the submitted working directory first on ``PYTHONPATH``."""
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes:
    # a short dir in /tmp, not pytest's tmp_path. Its ray_current_cluster file stays in it too,
    # so ray.init() elsewhere never finds this cluster.
    temp_dir = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port")}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Token authentication off on both sides (Ray 2.60 turns it on where a token exists).
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--num-cpus=2", "--object-store-memory=209715200", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *(f"--{name}={port}" for name, port in ports.items())]
    log_path = Path(temp_dir) / "ray-start.log"
    with log_path.open("w") as log:
        start = subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    head = _Head(f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, start.pid)
    try:
        assert start.wait(timeout=120) == 0, log_path.read_text()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{head.url}/api/version", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield head
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_submitted_job_trains_a_dictionary_on_a_head_node(ray_head, capsys, tmp_path, tiny_model_dir, tiny_corpus_dir):
    address = ["--address", ray_head.url]
    assert saeforge(["submit", *address, *_tiny_overrides(tmp_path, tiny_model_dir, tiny_corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert "cost estimate" in out
    job_id = re.search(r"^Job '(\S+)' submitted successfully$", out, re.M).group(1)

    assert saeforge(["logs", *address, "--follow", job_id]) == 0, "the job failed"
    followed = capsys.readouterr().out
    assert f"Running entrypoint for job {job_id}: saeforge train model=local" in followed
    assert followed.rstrip().endswith(f"Job '{job_id}' succeeded")

    dictionary = tmp_path / "store" / "runs" / "tiny" / "dictionary" / "model.layers.2"
    assert {p.name for p in dictionary.iterdir()} >= {"sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "eval.json"}
    assert json.loads((dictionary / "cfg.json").read_text())["d_sae"] == 128

    assert saeforge(["status", *address, job_id]) == 0
    assert capsys.readouterr().out == f"Job '{job_id}' succeeded\n"
    assert saeforge(["logs", *address, job_id]) == 0
    assert f"dictionary       file://{dictionary}" in capsys.readouterr().out
    assert saeforge(["list", *address]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["SUBMISSION", "ID"]
    assert [line.split()[:2] for line in listing[1:]] == [[job_id, "SUCCEEDED"]]
    assert saeforge(["stop", *address, job_id]) == 0  # a finished job: nothing to stop
    assert capsys.readouterr().out.splitlines()[-1] == f"Job '{job_id}' succeeded"
    assert saeforge(["status", *address, "raysubmit_nosuchjob"]) == 2
    assert "Job raysubmit_nosuchjob does not exist" in capsys.readouterr().err

    # The uploaded project is what ran: the packages without the venv, the store or the outputs.
    uploaded = Path(ray_head.temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    package = {p.name: p for p in uploaded if p.is_dir()}
    assert len(package) == 1, sorted(package)
    files = {p.name for p in next(iter(package.values())).iterdir()}
    assert {"cluster", "trainer", "activation_cache", "conf", "pyproject.toml"} <= files, files
    assert not {".venv", ".git", "store", "outputs"} & files

    # A job stopped before it finishes.
    overrides = [*_tiny_overrides(tmp_path, tiny_model_dir, tiny_corpus_dir), "run.name=stopped"]
    assert saeforge(["submit", *address, "--no-estimate", "--submission-id", "saeforge-stop-test", *overrides]) == 0
    assert "cost estimate" not in capsys.readouterr().out
    assert saeforge(["stop", *address, "saeforge-stop-test"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Job 'saeforge-stop-test' was stopped"
    assert saeforge(["list", *address]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == \
        [[job_id, "SUCCEEDED"], ["saeforge-stop-test", "STOPPED"]]
