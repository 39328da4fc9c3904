"""A worker node lost mid-job never stalls it (issue 23), on a real multi-node Ray cluster.

The cluster (``ray_head.started_ray_cluster``, shared by the module) is a head without CPUs, where
this process connects as the driver, and two worker nodes of 2 CPUs on this machine. Losing a node
is its death, not a shutdown: SIGKILL to its raylet, object store, agents and workers at once.

What is proven:

* Filling the cache, one producer per node (``cluster.producer_num_cpus=2``): a node killed after
  two commits, with no room left to restart its producer, never leaves more time between two
  commits than the longest unit of the fault-free fill plus a detection allowance (the fill does
  not wait on the lost producer's restart: the code before issue 23 waited 600 s); the survivor
  finishes the cache, which holds every (sequence_id, position) exactly once and is byte for byte
  the cache of the fault-free fill.
* Training (``cluster.train_max_failures=1``): the node of a trainer worker killed after the
  first checkpoint; the new worker group resumes from the newest complete checkpoint and ends with
  the weights of an uninterrupted run, bit for bit. The restart's recovery time (from the kill to
  the restarted group's first step, as rank 0 records it in ``training-times.json``) is printed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import RayCluster, RayWorkerNode, started_ray_cluster
from tiny_job import assert_same_weights, check_tiny_cache, run_until_checkpoint, tiny_job
from tiny_model import build_tiny_model

from activation_cache.manifest import load_manifest
from activation_cache.reader import read_shard
from activation_cache.store import open_store
from cluster.driver import absolute_uri, build_caches, plan_caches, run_job
from trainer.layout import TRAINING_TIMES_FILE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

WORKER_NODES, NODE_CPUS = 2, 2

DETECTION_ALLOWANCE_S = 5.0
"""What a lost producer may add to the longest time between two commits beyond one unit on the
survivor: noticing the loss (its tasks fail within about a second of the kill, when their
connection closes) and handing its units on."""

# The slow fill: units of ~1-3 s (12 sequences of 128 tokens through a 512-wide model, two
# producers of 2 torch threads each sharing 2 cores; a producer alone is several times faster), so
# that a stall shows between commits; the tiny model's 4-sequence units take milliseconds.
SLOW_CONTEXT, SLOW_SEQUENCES, SLOW_PER_SHARD, SLOW_WIDTH = 128, 144, 12, 512


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[RayCluster]:
    """The module's cluster, with this process connected to its head as the driver."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # the driver's side; the nodes' is ray_environment's
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.delenv(name, raising=False)
        with started_ray_cluster(worker_nodes=WORKER_NODES, worker_cpus=NODE_CPUS) as cluster:
            ray.init(address=cluster.head.gcs_address,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
            try:
                cluster.wait_for_nodes()
                yield cluster
            finally:
                ray.shutdown()


@pytest.fixture
def full_cluster(shared_cluster: RayCluster) -> RayCluster:
    """The module's cluster with its ``WORKER_NODES`` nodes: a fresh one for each an earlier
    scenario killed."""
    while len(shared_cluster.nodes) < WORKER_NODES:
        shared_cluster.add_worker_node()
    return shared_cluster


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama at width 512: ~1 s of forward per slow unit on 2 threads."""
    return build_tiny_model(tmp_path_factory.mktemp("wide-llama"), hidden=SLOW_WIDTH)


def _on_cluster(cluster: RayCluster) -> tuple[str, ...]:
    return ("cluster=existing", f"cluster.address={cluster.head.gcs_address}")


def _slow_fill_job(cluster: RayCluster, store: Path, tmp_path, model_dir, corpus_dir):
    """One producer per worker node (each takes a node's 2 CPUs), 12 units of ~1-2 s."""
    return tiny_job(str(store), tmp_path, model_dir, corpus_dir, *_on_cluster(cluster),
                    f"cluster.num_producers={WORKER_NODES}", f"cluster.producer_num_cpus={NODE_CPUS}",
                    "cluster.units_per_producer=2", f"data.context_length={SLOW_CONTEXT}",
                    f"data.max_tokens={SLOW_CONTEXT * SLOW_SEQUENCES}", f"cache.sequences_per_shard={SLOW_PER_SHARD}")


def _check_every_token_once(cache_uri: str, tokens, excluded: frozenset[int]) -> None:
    """The complete cache holds each planned (sequence_id, position) but the excluded tokens
    exactly once, with its token id (``check_tiny_cache`` for a job of any size)."""
    from collections import Counter

    store = open_store(cache_uri)
    manifest = load_manifest(store)
    assert manifest.complete
    seen: Counter = Counter()
    for entry in manifest.shards:
        shard = read_shard(store, entry)
        ids = shard.sequence_ids.tolist(), shard.positions.tolist(), shard.token_ids.tolist()
        for sequence, position, token in zip(*ids, strict=True):
            assert tokens[sequence, position] == token, f"token at ({sequence}, {position})"
            seen[sequence, position] += 1
    assert set(seen.values()) == {1}, "a (sequence_id, position) cached twice"
    n_sequences, context = tokens.shape
    assert set(seen) == {(s, p) for s in range(n_sequences) for p in range(context) if tokens[s, p] not in excluded}


def _shard_bytes(cache_uri: str) -> dict[str, bytes]:
    store = open_store(cache_uri)
    return {entry.name: store.get_bytes(entry.name) for entry in load_manifest(store).shards}


class _NodeWatch(threading.Thread):
    """When the cluster (its GCS) first lists ``node`` dead, by ``time.monotonic()``."""

    def __init__(self, node: RayWorkerNode):
        super().__init__(daemon=True)
        self.node, self.dead_at, self.stop = node, None, threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.wait(0.2):
            listed = [n for n in ray.nodes() if n["NodeManagerPort"] == self.node.node_manager_port]
            if listed and not any(n["Alive"] for n in listed):
                self.dead_at = time.monotonic()
                return


class _NodeKiller:
    """``on_commit`` for ``build_caches``: records each commit and, right after commit
    ``after_commits``, kills the first worker node (the producers keep working meanwhile).

    Commits are timed on the fill's clock: ``time.monotonic()`` less the time this hook spent
    killing (scanning /proc and sending SIGKILL, a second or so on a busy machine), which is the
    test's time, not the fill's."""

    def __init__(self, cluster: RayCluster, after_commits: int):
        self.cluster, self.after_commits = cluster, after_commits
        self.commits: list[float] = []
        """Each commit on the fill's clock (``clock()``)."""
        self.producers: list = []  # the fill's list of live producers (its replacements join it)
        self.killed: list[str] = []
        self.killed_at: float | None = None
        """When every process of the node had been sent SIGKILL, on the fill's clock."""
        self.killed_wall: float | None = None
        """The same moment by ``time.time()`` (log records carry that clock)."""
        self.watch: _NodeWatch | None = None
        self.hook_s = 0.0

    def clock(self) -> float:
        return time.monotonic() - self.hook_s

    def __call__(self, manifests, producers) -> None:
        self.commits.append(self.clock())
        self.producers = producers
        if len(self.commits) == self.after_commits:
            started = time.monotonic()
            node = self.cluster.nodes[0]
            self.watch = _NodeWatch(node)
            self.killed = self.cluster.kill_node(node)
            self.hook_s += time.monotonic() - started
            self.killed_at, self.killed_wall = self.clock(), time.time()
            self.watch.start()


def _longest_gap(times: list[float]) -> float:
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def _stop_stalled_fill(filler: threading.Thread, producers: list) -> None:
    """Kill the producers of a fill that stopped committing (its replacements too, as they come)
    until it gives up, so the next scenario has the cluster to itself."""
    import ray

    deadline = time.monotonic() + 120
    while filler.is_alive() and time.monotonic() < deadline:
        for actor in list(producers):
            ray.kill(actor)
        filler.join(timeout=2)


def test_a_node_lost_mid_cache_costs_one_unit_and_loses_nothing(full_cluster, tmp_path, wide_model_dir,
                                                                tiny_corpus_dir, caplog):
    """Fault-free fill first (the reference: its bytes, its unit time); then the same fill with a
    worker node killed after two commits and no room to restart its producer: the survivor
    finishes without a pause longer than one unit plus ``DETECTION_ALLOWANCE_S``, and the cache
    is the reference's, byte for byte."""
    reference_job = _slow_fill_job(full_cluster, tmp_path / "reference", tmp_path, wide_model_dir, tiny_corpus_dir)
    [reference] = plan_caches(reference_job, open_store(absolute_uri(reference_job.cache.uri)))
    commits: list[float] = []
    started = time.monotonic()
    build_caches(reference_job, [reference], on_commit=lambda manifests, producers: commits.append(time.monotonic()))
    reference_s = time.monotonic() - started
    assert len(commits) == SLOW_SEQUENCES // SLOW_PER_SHARD
    # With the producers working side by side, one producer's unit spans WORKER_NODES
    # consecutive commit intervals: the longest such span is the longest unit a producer took
    # with the machine shared (the survivor, alone on it, is faster).
    unit_s = max(b - a for a, b in zip(commits, commits[WORKER_NODES:], strict=False))
    print(f"\nfault-free fill: {reference_s:.1f} s, commits at {[round(t - commits[0], 1) for t in commits]} s, "
          f"unit {unit_s:.1f} s")

    job = _slow_fill_job(full_cluster, tmp_path / "faulted", tmp_path, wide_model_dir, tiny_corpus_dir)
    [plan] = plan_caches(job, open_store(absolute_uri(job.cache.uri)))
    killer = _NodeKiller(full_cluster, after_commits=2)
    outcome: dict = {}

    def fill() -> None:
        try:
            outcome["report"] = build_caches(job, [plan], on_commit=killer)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = err

    filler = threading.Thread(target=fill, daemon=True)
    with caplog.at_level(logging.WARNING, logger="cluster"):
        filler.start()
        # Generous: the survivor alone does at most every unit, at the reference's pace or faster.
        filler.join(timeout=3 * reference_s + 60)
        stalled = filler.is_alive()
        gap_s = _longest_gap(killer.commits)
        if stalled:  # the gap still open when the test gave up is at least this long
            gap_s = max(gap_s, killer.clock() - killer.commits[-1])
            _stop_stalled_fill(filler, killer.producers)
    assert killer.killed_at is not None, "the node was killed"
    killer.watch.stop.set()
    # The fill's first word of trouble after the kill (a unit requeued, a producer given up).
    noticed = [r.created for r in caplog.records if r.name.startswith("cluster") and r.created >= killer.killed_wall]
    detection_s = noticed[0] - killer.killed_wall if noticed else float("nan")
    node_dead = (f"after {killer.watch.dead_at - killer.hook_s - killer.killed_at:.1f} s" if killer.watch.dead_at
                 else "not yet when the fill ended")
    print(f"\nlost node mid-cache: longest commit gap {'>= ' if stalled else ''}{gap_s:.1f} s (bound: unit "
          f"{unit_s:.1f} s + allowance {DETECTION_ALLOWANCE_S:.0f} s); the fill noticed the loss {detection_s:.1f} s "
          f"after the kill, the cluster listed the node dead {node_dead}; reference fill "
          f"{reference_s:.1f} s; kill at {killer.killed_at - killer.commits[0]:.1f} s, commits at "
          f"{[round(t - killer.commits[0], 1) for t in killer.commits]} s")

    assert any(c.startswith("ray::Producer") for c in killer.killed), f"a producer died with the node: {killer.killed}"
    assert not stalled, f"the fill stalled: no commit for {gap_s:.0f} s after the node was lost"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["report"].manifests[plan.hookpoint].complete
    _check_every_token_once(plan.uri, plan.tokens, plan.excluded_token_ids)
    assert _shard_bytes(plan.uri) == _shard_bytes(reference.uri), "the cache differs from the fault-free fill's"
    assert gap_s <= unit_s + DETECTION_ALLOWANCE_S, (
        f"longest time between two commits {gap_s:.1f} s: more than a unit ({unit_s:.1f} s) "
        f"+ {DETECTION_ALLOWANCE_S} s: the fill waited on the lost producer")


def test_a_node_lost_mid_training_resumes_bit_identical(full_cluster, tmp_path, tiny_model_dir, tiny_corpus_dir):
    """The node of a trainer worker killed after the first checkpoint: Ray Train starts a new
    group on the surviving node, which resumes from the newest complete checkpoint and ends with
    the weights of a run that was never interrupted. Prints the recovery time: from the kill to
    the restarted group's first step (rank 0's ``first_step`` in ``training-times.json``)."""
    store = str(tmp_path / "store")
    options = (*_on_cluster(full_cluster), "eval=off", "train.epochs=25", "run.checkpoint_every_steps=40",
               "train.log_every_steps=40", "train.histogram_every_steps=0", "logging.wandb_mode=disabled",
               "cluster.train_max_failures=1")
    [straight] = run_job(tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=straight", *options)).hookpoints
    assert straight.eval["resumed_from_step"] == 0
    check_tiny_cache(straight.cache_uri, {})

    job = tiny_job(store, tmp_path, tiny_model_dir, tiny_corpus_dir, "run.name=killed", *options)
    runner, outcome, checkpoints = run_until_checkpoint(job, straight.cache_uri.split("/caches/")[0] + "/runs/killed")
    nodes = full_cluster.nodes_running(b"ray::RayTrainWorker")
    assert nodes, "the trainer workers are running on the worker nodes"
    killed = full_cluster.kill_node(nodes[0])
    killed_at = time.time()
    assert any(c.startswith("ray::RayTrainWorker") for c in killed), killed
    runner.join(timeout=600)
    assert not runner.is_alive(), "the run did not end within 600 s of the kill"
    [resumed] = outcome["result"].hookpoints

    times = json.loads(checkpoints.get_bytes(TRAINING_TIMES_FILE))  # the group that finished: the restarted one
    print(f"\nlost node mid-training: the new worker group entered its loop {times['entered'] - killed_at:.1f} s "
          f"and took its first step {times['first_step'] - killed_at:.1f} s after the kill "
          f"(resumed from step {resumed.eval['resumed_from_step']})")
    assert resumed.eval["resumed_from_step"] >= 40, "the second worker group resumed from a checkpoint"
    assert times["entered"] > killed_at, "training-times.json is the restarted group's"
    assert resumed.eval["train_steps"] == straight.eval["train_steps"]
    assert_same_weights(resumed.dictionary_uri, straight.dictionary_uri)
