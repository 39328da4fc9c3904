"""Both object stores through the same tests: a local directory and S3 (a real SeaweedFS)."""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable

import pytest

from activation_cache.s3 import S3Store
from activation_cache.store import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    join_uri,
    open_store,
)

MiB = 2**20


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path) -> Callable[..., ObjectStore]:
    """Builds the store under test; S3 options (e.g. the multipart threshold) apply to S3 only."""
    if request.param == "local":
        return lambda **s3_options: LocalStore(tmp_path / "store")
    uri = request.getfixturevalue("s3_bucket_uri")
    return lambda **s3_options: S3Store(uri, **s3_options)


@pytest.fixture
def store(make_store) -> ObjectStore:
    return make_store()


def test_put_get_round_trip(store):
    assert isinstance(store, ObjectStore)
    store.put_bytes("manifest.json", b'{"complete": false}')
    store.put_bytes("shards/p0-000000.arrow", bytes(range(256)) * 1000)
    store.put_bytes("empty", b"")
    assert store.get_bytes("manifest.json") == b'{"complete": false}'
    assert store.get_bytes("shards/p0-000000.arrow") == bytes(range(256)) * 1000
    assert store.get_bytes("empty") == b""


def test_large_object_round_trip_takes_multipart_path_on_s3(make_store):
    store = make_store(multipart_threshold_bytes=8 * MiB)
    big = os.urandom(20 * MiB)
    just_below = os.urandom(8 * MiB - 1)
    store.put_bytes("big.arrow", big)
    store.put_bytes("small.arrow", just_below)
    assert store.get_bytes("big.arrow") == big
    assert store.get_bytes("small.arrow") == just_below
    if isinstance(store, S3Store):
        # A multipart object's ETag ends in -<number of parts>; a single PUT's has no dash.
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/big.arrow")
        assert head["ETag"].strip('"').endswith("-3")
        assert head["ContentLength"] == len(big)
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/small.arrow")
        assert "-" not in head["ETag"]


def test_overwrite_replaces_whole_object(store):
    store.put_bytes("manifest.json", b"version 1, the longer one")
    store.put_bytes("manifest.json", b"version 2")
    assert store.get_bytes("manifest.json") == b"version 2"
    assert store.list() == ["manifest.json"]


def test_list_is_sorted_recursive_and_scoped_to_prefix(store):
    for key in ["c", "b/2", "a/sub/deep/3", "ab/4", "a/1"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/sub/deep/3", "ab/4", "b/2", "c"]
    assert store.list("a") == ["a/1", "a/sub/deep/3"]  # a directory: not "ab/4"
    assert store.list("a/") == ["a/1", "a/sub/deep/3"]
    assert store.list("a/sub") == ["a/sub/deep/3"]
    assert store.list("missing") == []


def test_exists_and_delete(store):
    assert not store.exists("shards/x.arrow")
    store.put_bytes("shards/x.arrow", b"x")
    assert store.exists("shards/x.arrow")
    assert not store.exists("shards")  # a prefix is not an object
    store.delete("shards/x.arrow")
    assert not store.exists("shards/x.arrow")
    assert store.list() == []
    store.delete("shards/x.arrow")  # deleting a missing key is not an error


def test_missing_key_raises_object_not_found_naming_it(store):
    with pytest.raises(ObjectNotFound, match="checkpoints/step-7/state.pt") as info:
        store.get_bytes("checkpoints/step-7/state.pt")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, StoreError)
    assert store.uri in str(info.value)


@pytest.mark.parametrize("bad_key", ["", "/", "../escape", "a/../b", "a//b", "./a"])
def test_bad_keys_are_rejected(store, bad_key):
    with pytest.raises(ValueError, match="relative path"):
        store.put_bytes(bad_key, b"x")


def test_child_is_scoped_to_its_prefix(store):
    run = store.child("runs/r1")
    assert run.uri == join_uri(store.uri, "runs/r1")
    run.put_bytes("dictionary/cfg.json", b"{}")
    store.put_bytes("runs/r2/other", b"o")
    assert run.list() == ["dictionary/cfg.json"]
    assert run.get_bytes("dictionary/cfg.json") == b"{}"
    assert store.get_bytes("runs/r1/dictionary/cfg.json") == b"{}"
    assert store.list("runs") == ["runs/r1/dictionary/cfg.json", "runs/r2/other"]
    assert run.child("dictionary").get_bytes("cfg.json") == b"{}"
    with pytest.raises(ObjectNotFound):
        run.get_bytes("other")


# -- open_store -------------------------------------------------------------------------------


def test_open_store_dispatches_local_uris(tmp_path, monkeypatch):
    by_file_uri = open_store(f"file://{tmp_path}/a")
    by_path = open_store(str(tmp_path / "a"))
    monkeypatch.chdir(tmp_path)
    by_relative_path = open_store("a")
    for store in (by_file_uri, by_path, by_relative_path):
        assert isinstance(store, LocalStore)
        assert store.uri == f"file://{tmp_path}/a"
    by_file_uri.put_bytes("k", b"v")
    assert by_relative_path.get_bytes("k") == b"v"


def test_open_store_dispatches_s3(s3_bucket_uri, s3_server, monkeypatch):
    store = open_store(s3_bucket_uri)
    assert isinstance(store, S3Store)
    assert store.uri == s3_bucket_uri
    store.put_bytes("k", b"v")
    # Options reach the store: an explicit endpoint wins over the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    explicit = open_store(s3_bucket_uri, s3_options={"endpoint_url": s3_server.endpoint_url})
    assert explicit.get_bytes("k") == b"v"


def test_open_store_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme 'gs'"):
        open_store("gs://bucket/prefix")


def test_s3_uri_needs_a_bucket():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Store("s3:///prefix")


# -- S3 specifics -----------------------------------------------------------------------------


def test_s3_store_pickles_without_client_or_credentials(s3_bucket_uri, s3_server):
    store = S3Store(s3_bucket_uri, max_attempts=3)
    store.put_bytes("before", b"1")  # makes the client
    blob = pickle.dumps(store)
    assert s3_server.secret_key.encode() not in blob
    assert s3_server.access_key.encode() not in blob
    clone = pickle.loads(blob)
    assert (clone.uri, clone.max_attempts) == (store.uri, 3)
    assert clone.get_bytes("before") == b"1"
    clone.put_bytes("after", b"2")
    assert store.get_bytes("after") == b"2"


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_give_store_error_without_credentials(
    s3_bucket_uri, s3_server, monkeypatch, wrong
):
    wrong_secret = "wrong-" + uuid.uuid4().hex
    wrong_access_key = "wrongkey" + uuid.uuid4().hex[:12]
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        expected_code = "SignatureDoesNotMatch"
        used = (s3_server.access_key, wrong_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_access_key)
        expected_code = "InvalidAccessKeyId"
        used = (wrong_access_key, s3_server.secret_key)
    store = S3Store(s3_bucket_uri, max_attempts=2)
    for operation in (
        lambda: store.get_bytes("manifest.json"),
        lambda: store.put_bytes("manifest.json", b"{}"),
        lambda: store.list(),
    ):
        with pytest.raises(StoreError) as info:
            operation()
        message = str(info.value)
        assert expected_code in message
        assert s3_bucket_uri in message
        for credential in (*used, s3_server.secret_key, s3_server.access_key):
            assert credential not in message
            assert credential not in repr(info.value)


def test_missing_bucket_error_names_the_bucket(s3_bucket_uri):
    bucket = f"saeforge-absent-{uuid.uuid4().hex[:12]}"
    store = S3Store(f"s3://{bucket}/cache", multipart_threshold_bytes=5 * MiB)
    for operation in (
        lambda: store.get_bytes("manifest.json"),
        lambda: store.put_bytes("manifest.json", b"{}"),
        lambda: store.put_bytes("shard.arrow", bytes(6 * MiB)),  # the multipart path
        lambda: store.list(),
        lambda: store.exists("manifest.json"),
        lambda: store.delete("manifest.json"),
    ):
        with pytest.raises(StoreError, match=f"bucket '{bucket}' does not exist"):
            operation()


def test_ensure_bucket_creates_once_and_is_idempotent(s3_bucket_uri):
    bucket = f"saeforge-new-{uuid.uuid4().hex[:12]}"
    store = S3Store(f"s3://{bucket}/cache")
    store.ensure_bucket()
    store.ensure_bucket()
    store.put_bytes("k", b"v")
    assert S3Store(f"s3://{bucket}").list() == ["cache/k"]
