"""``saeforge submit | status | logs | stop | list``: what a job carries to the cluster, the
estimate a dry run prints, and a tiny job submitted to a real head node on 127.0.0.1 through the Ray Jobs API."""

from __future__ import annotations

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
from pathlib import Path

import pytest
from ranks import free_port
from tiny_job import tiny_overrides

from cluster import jobs
from cluster.cli import main as saeforge
from cluster.config import compose_job

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

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
