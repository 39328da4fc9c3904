"""``saeforge pull``: every dictionary of a run, checksum-verified, all or nothing, never outside
the target directory; on a local store and on a real S3 endpoint."""

from __future__ import annotations

import json

import pytest
import torch

from activation_cache.store import open_store
from cluster.cli import main as saeforge
from cluster.pull import pull, safe_relative_path
from trainer.dictionary import dictionary_files
from trainer.layout import write_dictionary
from trainer.sae import TopKSAE

FOLDERS = ("dictionary/model.layers.1", "dictionary/model.layers.2.mlp", "sweep/k4/dictionary/model.layers.1")


def _files(seed: int) -> dict[str, bytes]:
    sae = TopKSAE(16, 64, 4, seed=seed)
    return dictionary_files(sae, hookpoint="model.layers.1", model_name="tiny", scale=2.0, extra_metadata={},
                            sparsity=torch.rand(64), eval_metrics={"fvu": 0.5})


def _run(uri: str, **s3) -> None:
    for seed, folder in enumerate(FOLDERS):
        write_dictionary(open_store(f"{uri}/runs/r/{folder}", s3_options=s3), _files(seed))


def test_a_run_pulls_every_dictionary_and_they_load(tmp_path):
    store = f"file://{tmp_path / 'store'}"
    _run(store)
    target = tmp_path / "pulled"
    loaded = pull(f"{store}/runs/r", target)
    assert sorted(loaded) == sorted(FOLDERS)
    for seed, folder in enumerate(FOLDERS):
        sae, cfg = loaded[folder]
        assert cfg["d_sae"] == 64
        assert (target / folder / "sae_weights.safetensors").read_bytes() == _files(seed)["sae_weights.safetensors"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")], "no staging folder is left behind"
    # One dictionary pulls into the folder itself, from the command line too.
    assert saeforge(["pull", f"{store}/runs/r/{FOLDERS[1]}", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "cfg.json").read_text())["d_sae"] == 64


def test_a_corrupt_file_fails_by_name_and_leaves_the_target_as_it_was(tmp_path):
    store = f"file://{tmp_path / 'store'}"
    _run(store)
    weights = tmp_path / "store" / "runs" / "r" / FOLDERS[2] / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    target = tmp_path / "pulled"
    target.mkdir()
    (target / "mine.txt").write_text("kept")
    with pytest.raises(ValueError, match=r"sweep/k4/dictionary/model.layers.1/sae_weights.safetensors: \d+ bytes "
                                         r"with sha256 .* checksums.json says"):
        pull(f"{store}/runs/r", target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"], "nothing half-written"


def test_a_dictionary_without_checksums_is_not_pulled(tmp_path):
    folder = open_store(f"file://{tmp_path}/runs/r/dictionary/h")
    for name, data in _files(0).items():
        folder.put_bytes(name, data)
    assert saeforge(["pull", f"file://{tmp_path}/runs/r", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "dictionary").exists()


@pytest.mark.parametrize("key", ["../cfg.json", "dictionary/../../x/cfg.json", "/etc/cfg.json", "a//cfg.json",
                                 "a/./cfg.json", "a\\..\\cfg.json", "a/\x00/cfg.json"])
def test_object_keys_that_would_escape_the_target_are_refused(key):
    # S3 allows such keys (SeaweedFS refuses to store them, so the check is shown on the keys).
    with pytest.raises(ValueError, match=r"would escape the target directory: refused"):
        safe_relative_path(key, "s3://bucket/runs/r")


def test_ordinary_keys_are_kept_as_they_are():
    assert str(safe_relative_path("sweep/k4/dictionary/model.layers.2.mlp:input/cfg.json", "s3://b")) == (
        "sweep/k4/dictionary/model.layers.2.mlp:input/cfg.json")


def test_pull_from_s3_matches_the_local_files(tmp_path, s3_bucket_uri, s3_server):
    options = {"endpoint_url": s3_server.endpoint_url}
    _run(s3_bucket_uri, **options)
    assert saeforge(["pull", f"{s3_bucket_uri}/runs/r", str(tmp_path / "pulled"),
                     "--endpoint-url", s3_server.endpoint_url]) == 0
    for seed, folder in enumerate(FOLDERS):
        assert (tmp_path / "pulled" / folder / "cfg.json").read_bytes() == _files(seed)["cfg.json"]
