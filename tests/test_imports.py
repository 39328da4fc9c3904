"""The import rules: no cycle among the project's modules (imports inside functions count), and
the light commands stay light, checked on ``sys.modules`` after the command ran, not on a clock."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "activation_cache", "cluster", "interp")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The module names an import statement may load (``from a import b`` may load ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".")[0]
    base = node.module if not node.level else ".".join(filter(None, (package, node.module)))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """{module: the project's modules it imports anywhere: at the top, in a function, under TYPE_CHECKING}."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name].update(m for m in _imported(name, node) if m in modules and m != name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        cycles.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def test_the_finder_sees_a_cycle_through_a_function_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_packages():
    graph = import_graph()
    assert {"cluster.cli", "cluster.train", "activation_cache.store", "trainer.layout"} <= graph.keys()
    assert "activation_cache.s3" in graph["activation_cache.store"], "function-level imports are counted"
    assert import_cycles(graph) == []


def test_the_packages_import_as_the_design_says():
    """trainer/ and activation_cache/ never import cluster/; the layout and the store protocol
    import none of the project's heavy modules."""
    graph = import_graph()
    for module, imports in graph.items():
        if not module.startswith("cluster"):
            assert not any(m.startswith("cluster") for m in imports), f"{module} imports {sorted(imports)}"
    assert graph["trainer.layout"] == set()
    assert graph["activation_cache.store_protocol"] == set()
    assert "activation_cache.store" not in graph["activation_cache.s3"]


# --------------------------------------------------------------------------- what a command loads

_PROBE = """
import json, sys
sys.argv[0] = "saeforge"
try:
    from cluster.cli import main
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
sys.stdout.write("\\nMODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}) + "\\n")
"""

HEAVY = ("ray.train", "deepspeed", "transformers")


def loaded_by(*argv: str, tmp_path: Path) -> tuple[int, set[str], str]:
    """(exit code, every module in sys.modules once ``saeforge <argv>`` returned, its output),
    the command run in a fresh interpreter."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("MODULES ")), None)
    assert line is not None, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(line.removeprefix("MODULES "))
    return report["code"], set(report["modules"]), run.stdout + run.stderr


def _loaded(modules: set[str], *names: str) -> list[str]:
    return [name for name in names if name in modules]


def test_help_and_a_config_error_load_no_torch(tmp_path):
    code, modules, _ = loaded_by("--help", tmp_path=tmp_path)
    assert code == 0 and _loaded(modules, "torch", "ray", *HEAVY) == []
    code, modules, output = loaded_by("train", "sae.n_latents=0", tmp_path=tmp_path)
    assert code == 2 and "sae.n_latents=0 must be positive" in output
    assert _loaded(modules, "torch", "ray", *HEAVY) == []


def test_printing_the_config_loads_neither_ray_train_deepspeed_nor_transformers(tmp_path):
    code, modules, output = loaded_by("train", "--cfg", "job", "sae.n_latents=8192", tmp_path=tmp_path)
    assert code == 0 and "n_latents: 8192" in output
    assert _loaded(modules, *HEAVY) == []


def test_pull_loads_neither_ray_train_deepspeed_nor_transformers(tmp_path):
    import torch

    from activation_cache.store import open_store
    from trainer.dictionary import dictionary_files
    from trainer.layout import write_dictionary
    from trainer.sae import TopKSAE

    files = dictionary_files(TopKSAE(8, 16, 2, seed=0), hookpoint="model.layers.0", model_name="tiny", scale=1.0,
                             extra_metadata={}, sparsity=torch.full((16,), 0.1), eval_metrics={"fvu": 0.5})
    write_dictionary(open_store(str(tmp_path / "run" / "dictionary" / "model.layers.0")), files)
    code, modules, output = loaded_by("pull", str(tmp_path / "run"), str(tmp_path / "pulled"), tmp_path=tmp_path)
    assert code == 0, output
    assert (tmp_path / "pulled" / "dictionary" / "model.layers.0" / "cfg.json").is_file()
    assert _loaded(modules, *HEAVY) == []


def test_cache_ls_loads_neither_ray_train_deepspeed_nor_transformers(tmp_path):
    import numpy as np
    import torch

    from activation_cache.manifest import ActivationStats, Manifest, ShardEntry, commit_manifest
    from activation_cache.schema import ShardMeta, encode_shard, sha256_hex
    from activation_cache.store import open_store

    key = "0123456789abcdef0123"
    cache = open_store(str(tmp_path / "store" / "caches" / key))
    meta = ShardMeta(model="tiny", revision="r1", hookpoint="model.layers.1", d_model=8, dtype="float32", cache_key=key)
    acts = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    data = encode_shard(acts, np.arange(5), np.zeros(5), np.arange(5), meta)
    cache.put_bytes("shards/unit-000000.arrow", data)
    entry = ShardEntry(name="shards/unit-000000.arrow", rows=5, size_bytes=len(data), sha256=sha256_hex(data),
                       first_sequence_id=0, n_sequences=1)
    manifest = Manifest(cache_key=key, key_inputs={"model": "tiny"}, model="tiny", revision="r1",
                        hookpoint="model.layers.1", d_model=8, dtype="float32")
    manifest = manifest.with_shard(entry, ActivationStats.of(acts.numpy()))
    manifest.complete = True
    commit_manifest(cache, manifest)
    code, modules, output = loaded_by("cache", "ls", str(tmp_path / "store"), tmp_path=tmp_path)
    assert code == 0 and key in output, output
    assert _loaded(modules, "ray", *HEAVY) == []
