"""``saeforge submit | status | logs | stop | list``: what a job carries to the cluster, the
estimate a dry run prints, and a tiny job submitted to a real head node on 127.0.0.1 through the Ray Jobs API."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ranks import free_port
from ray_head import RayHead, started_ray_head
from tiny_job import tiny_overrides

from cluster import jobs
from cluster.cli import main as saeforge
from cluster.config import compose_job

ROOT = Path(__file__).resolve().parents[2]

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


@pytest.fixture
def ray_head(monkeypatch) -> Iterator[RayHead]:
    """A head node of the test's own with the dashboard (the Jobs API), started from this venv with
    its ``bin`` on ``PATH`` as an activated venv would be: the job's ``saeforge train`` runs with
    the node's interpreter and the submitted working directory first on ``PYTHONPATH``."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the client's side; the head's is ray_environment's
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    with started_ray_head(dashboard=True, num_cpus=2, object_store_bytes=200 * 2**20) as head:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield head


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_submitted_job_trains_a_dictionary_on_a_head_node(ray_head, capsys, tmp_path, tiny_model_dir, tiny_corpus_dir):
    address = ["--address", ray_head.dashboard_url]
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
    uploaded = Path(ray_head.temp_root, "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
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
