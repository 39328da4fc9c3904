"""``saeforge cache ls | inspect | verify`` on real caches, local and on a real S3 endpoint."""

from __future__ import annotations

import json

import pytest
import torch
from cache_writer import write_cache

from activation_cache.manifest import (
    Manifest,
)
from activation_cache.s3 import S3Store
from activation_cache.schema import decode_shard
from activation_cache.store import LocalStore, ObjectStore, join_uri
from cluster.cli import main as saeforge

D_MODEL = 8
KEY = "0123456789abcdef0123"
OTHER_KEY = "fedcba9876543210fedc"


def _write_cache(store: ObjectStore, key: str, rows_per_shard: list[int], *, complete: bool = True) -> Manifest:
    """A cache as the driver leaves it: shards first, then the manifest that lists them."""
    return write_cache(store, rows_per_shard, complete=complete, d_model=D_MODEL, cache_key=key,
                       key_inputs={"model": "tiny", "context_length": 16})


def _flip_a_byte(store: ObjectStore, name: str) -> None:
    data = bytearray(store.get_bytes(name))
    data[len(data) // 2] ^= 0xFF  # the middle of the activation values: size unchanged, checksum not
    store.put_bytes(name, bytes(data))


@pytest.fixture
def root(tmp_path) -> LocalStore:
    """A store root with a complete cache, an incomplete one and an orphan shard in the first."""
    store = LocalStore(tmp_path / "store")
    _write_cache(store.child(f"caches/{KEY}"), KEY, [5, 7, 9])
    _write_cache(store.child(f"caches/{OTHER_KEY}"), OTHER_KEY, [4], complete=False)
    store.put_bytes(f"caches/{KEY}/shards/unit-000099.arrow", b"uncommitted")
    return store


@pytest.mark.parametrize("where", ["", "caches", f"caches/{KEY}"])
def test_ls_finds_caches_from_root_caches_folder_or_cache(root, capsys, where):
    code = saeforge(["cache", "ls", join_uri(str(root.root), where)])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(KEY)).split()
    assert line[1:7] == ["tiny", "model.layers.1", "8", "float32", "3", "21"]
    assert line[-2:] == ["complete", "1"], "state, then one orphan shard"
    assert (OTHER_KEY in out) == (where != f"caches/{KEY}")


def test_ls_json_gives_each_cache_with_its_uri(root, capsys):
    assert saeforge(["cache", "ls", "--json", root.uri]) == 0
    records = {r["cache_key"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {KEY, OTHER_KEY}
    assert records[KEY]["uri"] == join_uri(root.uri, "caches", KEY)
    assert (records[KEY]["rows"], records[KEY]["complete"], records[KEY]["orphans"]) == (21, True, 1)
    assert (records[OTHER_KEY]["rows"], records[OTHER_KEY]["state"]) == (4, "incomplete")


def test_inspect_shows_key_inputs_schema_stats_and_orphans(root, capsys):
    uri = join_uri(root.uri, "caches", KEY)
    assert saeforge(["cache", "inspect", uri]) == 0
    out = capsys.readouterr().out
    assert f"cache        {KEY}" in out
    assert "  context_length: 16" in out
    assert "  activation: fixed_size_list<item: float>[8] not null" in out
    assert f"  metadata saeforge.cache_key: {KEY}" in out
    assert "  mean norm  " in out
    assert "shards/unit-000099.arrow" in out
    assert saeforge(["cache", "inspect", "--json", uri]) == 0
    record = json.loads(capsys.readouterr().out)
    shards = [f"shards/unit-{i:06d}.arrow" for i in range(3)]
    acts = torch.cat([decode_shard(root.child(f"caches/{KEY}").get_bytes(name)).activations for name in shards]).double()
    assert record["stats"]["mean_norm"] == pytest.approx(acts.norm(dim=1).mean().item(), rel=1e-5)
    assert record["stats"]["mean_of_dim_means"] == pytest.approx(acts.mean(0).mean().item(), rel=1e-5)
    assert record["stats"]["mean_of_dim_variances"] == pytest.approx(acts.var(0, unbiased=False).mean().item(), rel=1e-5)
    assert [f["name"] for f in record["schema"]["fields"]] == ["activation", "token_id", "sequence_id", "position"]
    assert (record["shards"], record["rows"], record["orphans"]) == (3, 21, ["shards/unit-000099.arrow"])


def test_verify_passes_a_good_cache_and_names_a_corrupt_shard(root, capsys):
    cache = root.child(f"caches/{KEY}")
    assert saeforge(["cache", "verify", cache.uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 shards ok, 0 bad"
    _flip_a_byte(cache, "shards/unit-000001.arrow")
    assert saeforge(["cache", "verify", "--workers", "2", cache.uri]) == 1
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if line.startswith("BAD")]
    assert len(bad) == 1 and "shards/unit-000001.arrow" in bad[0] and "checksum" in bad[0]
    assert out[-1] == "2 shards ok, 1 bad"


def test_verify_and_inspect_name_a_shard_missing_from_the_store(root, capsys):
    cache = root.child(f"caches/{KEY}")
    cache.delete("shards/unit-000000.arrow")
    assert saeforge(["cache", "verify", cache.uri]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("BAD")] == [
        f"BAD shard shards/unit-000000.arrow: listed in the manifest but missing from {cache.uri}"
    ]
    assert out[-1] == "2 shards ok, 1 bad"
    assert saeforge(["cache", "inspect", cache.uri]) == 0, "inspect still describes a damaged cache"
    assert "schema       unavailable: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cache", "ls", "ftp://x"], "saeforge cache ls: error: store uri 'ftp://x': unknown scheme 'ftp'"),
        (["cache", "verify", "ftp://x"], "saeforge cache verify: error: store uri 'ftp://x': unknown scheme 'ftp'"),
        (["cache", "ls", "{tmp}/empty"], "saeforge cache ls: error: file://{tmp}/empty: no cache found"),
        (["cache", "inspect", "{tmp}/store"], "saeforge cache inspect: error: file://{tmp}/store: no manifest.json"),
    ],
)
def test_bad_uri_is_one_line_error(root, tmp_path, capsys, argv, message):
    code = saeforge([arg.format(tmp=tmp_path) for arg in argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith(message.format(tmp=tmp_path))


@pytest.mark.integration
def test_ls_and_verify_on_s3(s3_bucket_uri, s3_server, capsys):
    root = S3Store(s3_bucket_uri)
    cache = root.child(f"caches/{KEY}")
    _write_cache(cache, KEY, [5, 7])
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    assert saeforge(["cache", "ls", *endpoint, s3_bucket_uri]) == 0
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith(KEY)).split()[5:7] == ["2", "12"]
    assert saeforge(["cache", "verify", *endpoint, cache.uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 shards ok, 0 bad"
    _flip_a_byte(cache, "shards/unit-000000.arrow")
    assert saeforge(["cache", "verify", *endpoint, cache.uri]) == 1
    out = capsys.readouterr().out
    assert "BAD shard shards/unit-000000.arrow: checksum" in out
    assert out.splitlines()[-1] == "1 shards ok, 1 bad"
