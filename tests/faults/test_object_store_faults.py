"""The object store failing, on a real S3 endpoint (SeaweedFS) behind a real fault-injecting HTTP
proxy, with a real local Ray cluster: a job through a store that drops connections, cuts replies,
answers 500/503 and stalls writes the dictionary a healthy store gives; a key that always fails,
and a bucket that fills up, stop the job with the key named, leave only whole verified shards
visible, and a rerun resumes without redoing what was committed."""

from __future__ import annotations

import logging
import re
import time

import pytest
from s3_fault_proxy import FAULT_KINDS, Faults, S3FaultProxy, fault_proxy
from tiny_job import CONTEXT, PER_SHARD, SEQUENCES, assert_same_weights, check_tiny_cache, tiny_job

from activation_cache.manifest import load_manifest
from activation_cache.reader import read_shard
from activation_cache.s3 import S3Store
from activation_cache.schema import decode_shard
from activation_cache.store import StoreError, open_store
from cluster.driver import absolute_uri, build_caches, plan_caches, run_job
from cluster.errors import ProducerFailed

pytestmark = pytest.mark.integration

UNITS = SEQUENCES // PER_SHARD
# About one request in six goes wrong. 503 SlowDown is rarer: botocore backs off from throttling
# with a 1 s base, from other errors with 50 ms. The seed draws every kind within the first 19
# requests (a job makes about 90) and never more than 2 faults in a row in the first 300.
FLAKY = Faults(drop=0.03, lost_reply=0.03, truncate=0.03, error_500=0.03, error_503=0.01, delay=0.03,
               delay_s=0.1, seed=1459)
# The failing runs stop before training; one producer starts faster on 2 cores.
CACHE_ONLY = ("eval=off", "logging.wandb_mode=disabled", "cluster.num_producers=1", "cluster.unit_max_attempts=2",
              "cache.s3_max_attempts=3")


def _job(uri: str, endpoint_url: str, tmp_path, model_dir, corpus_dir, *extra: str):
    return tiny_job(uri, tmp_path, model_dir, corpus_dir, f"cache.s3_endpoint_url={endpoint_url}", *extra)


def _checksums(cache_uri: str) -> list[tuple[str, str]]:
    return [(entry.name, entry.sha256) for entry in load_manifest(open_store(cache_uri)).shards]


def _shard_paths(proxy: S3FaultProxy, method: str) -> set[str]:
    return {path for (m, path) in proxy.served if m == method and "/shards/" in path}


def _operations(store: S3Store) -> dict:
    return {
        "put": lambda: store.put_bytes("objects/k", b"v" * 5000),
        "get": lambda: store.get_bytes("objects/k"),
        "exists": lambda: store.exists("objects/k"),
        "list": lambda: store.list("objects"),
        "delete": lambda: store.delete("objects/absent"),
    }


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_every_store_operation_rides_out_a_fault_and_names_the_key_once_its_attempts_are_spent(
    s3_server, s3_bucket_uri, kind
):
    expected = {"put": None, "get": b"v" * 5000, "exists": True, "list": ["objects/k"], "delete": None}
    # 503 SlowDown is a throttling reply: botocore waits up to 1 s, 2 s... before trying again.
    n_faults = 1 if kind == "error_503" else 2
    with fault_proxy(s3_server.endpoint_url) as proxy:
        patient = S3Store(s3_bucket_uri, endpoint_url=proxy.url, max_attempts=n_faults + 1)
        for name, operation in _operations(patient).items():
            proxy.configure(Faults(**{kind: 1.0}, max_faults=n_faults, delay_s=0.05))
            proxy.reset_counters()
            assert operation() == expected[name], name
            # A delayed reply still arrives: one request, delayed once.
            assert proxy.faults[kind] == (1 if kind == "delay" else n_faults), f"{name}: {dict(proxy.faults)}"
        if kind == "delay":
            return  # a slow reply is no failure
        impatient = S3Store(s3_bucket_uri, endpoint_url=proxy.url, max_attempts=2)
        proxy.configure(Faults(**{kind: 1.0}))
        for name, operation in _operations(impatient).items():
            with pytest.raises(StoreError) as failed:
                operation()
            message = str(failed.value)
            logging.getLogger(__name__).info("%s", message)
            assert "\n" not in message and f"{name} failed after 2 attempts: " in message, message
            assert f"{s3_bucket_uri}/objects/" in message, message


def test_a_full_bucket_refuses_a_put_at_once_in_one_line_naming_the_key(s3_server, s3_bucket_uri):
    bucket = s3_bucket_uri.removeprefix("s3://").split("/")[0]
    with fault_proxy(s3_server.endpoint_url, Faults(full_after_bytes=0)) as proxy:
        store = S3Store(s3_bucket_uri, endpoint_url=proxy.url, max_attempts=8)
        store.put_bytes("objects/first", b"fits")
        with pytest.raises(StoreError) as refused:
            store.put_bytes("objects/second", b"does not")
        message = str(refused.value)
        assert message.startswith(f"{s3_bucket_uri}/objects/second: put refused: bucket '{bucket}' is full "
                                  "(free space, then run again): XMinioStorageFull (HTTP 507)"), message
        assert "\n" not in message
        assert proxy.faults["storage_full"] == 1, "a full bucket is no reason to try 8 times"
        assert store.get_bytes("objects/first") == b"fits" and not store.exists("objects/second")


def test_a_job_through_a_failing_store_trains_the_dictionary_of_a_healthy_one(
    ray_cluster, s3_server, s3_bucket_uri, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    """Every kind of fault on about one request in six, in producers, trainers and the driver:
    the job completes, its cache holds every token once in shards identical to a healthy run's,
    and its dictionary equals the healthy run's bit for bit."""
    common = ("eval=off", "logging.wandb_mode=disabled", "train.epochs=2", "cluster.num_producers=1")
    [healthy] = run_job(_job(s3_bucket_uri, s3_server.endpoint_url, tmp_path, tiny_model_dir, tiny_corpus_dir,
                             "run.name=healthy", *common)).hookpoints
    with fault_proxy(s3_server.endpoint_url, FLAKY) as proxy:
        [flaky] = run_job(_job(f"{s3_bucket_uri}-flaky", proxy.url, tmp_path, tiny_model_dir, tiny_corpus_dir,
                               "run.name=flaky", *common)).hookpoints
    injected = {kind: proxy.faults[kind] for kind in FAULT_KINDS}
    logging.getLogger(__name__).info("faults injected %s in %s requests", injected, dict(proxy.requests))
    assert all(injected.values()), f"every kind of fault was injected: {injected} of {dict(proxy.requests)}"
    # cache.s3_endpoint_url reached every process: producers wrote and trainers read each shard,
    # and a trainer wrote the dictionary, through the proxy (AWS_ENDPOINT_URL names the store itself).
    cache_path = "/" + flaky.cache_uri.removeprefix("s3://")
    every_shard = {f"{cache_path}/shards/unit-{i:06d}.arrow" for i in range(UNITS)}
    assert _shard_paths(proxy, "PUT") == every_shard and _shard_paths(proxy, "GET") == every_shard
    assert ("PUT", "/" + flaky.dictionary_uri.removeprefix("s3://") + "/sae_weights.safetensors") in proxy.served

    check_tiny_cache(flaky.cache_uri, {})
    assert _checksums(flaky.cache_uri) == _checksums(healthy.cache_uri), "the same shards, byte for byte"
    assert flaky.eval["train_steps"] == healthy.eval["train_steps"] > 0
    assert_same_weights(flaky.dictionary_uri, healthy.dictionary_uri)


def _assert_only_whole_verified_shards_visible(cache_uri: str) -> set[str]:
    """The manifest of a stopped fill parses, is not complete, and lists only shards that exist
    and match their checksums; shards written but not committed are whole Arrow files. Returns
    the names of the committed shards."""
    store = open_store(cache_uri)
    manifest = load_manifest(store)
    assert manifest is not None and not manifest.complete
    listed = {entry.name for entry in manifest.shards}
    for entry in manifest.shards:
        read_shard(store, entry)  # raises CorruptShardError on a checksum mismatch
    for name in set(store.list("shards/")) - listed:
        assert decode_shard(store.get_bytes(name), name=name).token_ids.size == PER_SHARD * (CONTEXT - 1)
    return listed


def _resume_through(proxy: S3FaultProxy, job, committed: set[str]) -> None:
    """Fill the rest of the cache through a healthy proxy: exactly the uncommitted units are
    produced again, and the cache ends complete, every token once."""
    proxy.configure(Faults())
    proxy.reset_counters()
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri), s3_options=job.cache.s3_options()))
    report = build_caches(job, [plan])
    assert report.manifests[plan.hookpoint].complete
    cache_path = "/" + plan.uri.removeprefix("s3://")
    uncommitted = {f"{cache_path}/shards/unit-{i:06d}.arrow" for i in range(UNITS)} - {
        f"{cache_path}/{name}" for name in committed}
    assert _shard_paths(proxy, "PUT") == uncommitted, "a committed unit was produced again"
    check_tiny_cache(plan.uri, {})


def test_a_full_bucket_then_a_failing_key_stop_the_job_naming_the_key_and_the_cache_resumes(
    ray_cluster, s3_server, s3_bucket_uri, tmp_path, tiny_model_dir, tiny_corpus_dir
):
    """One cache through three runs: the bucket fills up (PUTs refused with MinIO's 507 after
    100 KB), then, space freed, one shard's key always fails, then the store is healthy. Each
    failing run stops with one line naming the key, leaves only whole verified shards visible,
    and the next run resumes without producing a committed unit again."""
    bucket = s3_bucket_uri.removeprefix("s3://").split("/")[0]
    # Shards are ~20 KB, manifests a few KB: the first shards and manifests fit, 12 shards do not.
    with fault_proxy(s3_server.endpoint_url, Faults(full_after_bytes=100_000)) as proxy:
        job = _job(s3_bucket_uri, proxy.url, tmp_path, tiny_model_dir, tiny_corpus_dir, *CACHE_ONLY)
        [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
        with pytest.raises((ProducerFailed, StoreError)) as stopped:
            run_job(job)
        message = str(stopped.value)
        full = re.search(rf"(s3://\S+): put refused: bucket '{bucket}' is full \(free space, then run again\): "
                         r"XMinioStorageFull \(HTTP 507\): Storage backend has reached its minimum free drive", message)
        assert full and "\n" not in message, message
        # Retried neither by the store (s3_max_attempts=3) nor by the fill (unit_max_attempts=2).
        refused = proxy.faulted["storage_full", "PUT", "/" + full.group(1).removeprefix("s3://")]
        assert refused == 1, dict(proxy.faulted)
        assert "failed 2 times" not in message
        first = _assert_only_whole_verified_shards_visible(plan.uri)
        assert 1 <= len(first) < UNITS

        # Space freed; the shard of unit 10 (not committed yet) now always fails.
        assert "shards/unit-000010.arrow" not in first
        proxy.configure(Faults(fail_key_pattern=r"/shards/unit-000010\.arrow$"))
        proxy.reset_counters()
        started = time.monotonic()
        with pytest.raises(ProducerFailed) as stopped:
            run_job(job)
        seconds = time.monotonic() - started
        message = str(stopped.value)
        assert "\n" not in message
        assert re.search(rf"{re.escape(plan.uri)}/shards/unit-000010\.arrow: put failed after 3 attempts: "
                         r"InternalError \(HTTP 500\)", message), message
        assert proxy.faults["failed_key"] == 2 * 3, f"2 tries of the unit, 3 attempts each: {dict(proxy.faults)}"
        assert seconds < 120, f"stopping took {seconds:.0f} s"
        cache_path = "/" + plan.uri.removeprefix("s3://")
        assert not _shard_paths(proxy, "PUT") & {f"{cache_path}/{name}" for name in first}, "resumed, not redone"
        second = _assert_only_whole_verified_shards_visible(plan.uri)
        assert first < second and "shards/unit-000010.arrow" not in second

        _resume_through(proxy, job, second)
