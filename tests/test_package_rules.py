"""The package boundaries of docs/architecture.md ("Packages and import rules"): the math and the storage run
without Ray, each outside system has one home, and conf/ holds YAML only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import
FORBIDDEN = {
    "trainer": {"ray", "boto3", "botocore", "cluster", "activation_cache", "pyarrow"},
    "activation_cache": {"ray", "deepspeed", "cluster", "trainer"},
    "interp": {"ray", "deepspeed", "cluster", "boto3", "botocore"},
}
# outside system -> the only module allowed to import it
SINGLE_HOME = {"deepspeed": "trainer/engine.py", "boto3": "activation_cache/s3.py", "botocore": "activation_cache/s3.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_forbidden_modules(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package]) for path in _modules(package)
    }
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("system", sorted(SINGLE_HOME))
def test_outside_system_is_imported_in_one_module(system):
    importers = {
        str(path.relative_to(ROOT))
        for package in ("trainer", "activation_cache", "cluster", "interp")
        for path in _modules(package)
        if system in _imports(path)
    }
    assert importers <= {SINGLE_HOME[system]}


def test_only_cluster_imports_ray():
    importers = {
        str(path.relative_to(ROOT))
        for package in ("trainer", "activation_cache", "interp")
        for path in _modules(package)
        if "ray" in _imports(path)
    }
    assert importers == set()


def test_conf_holds_yaml_only():
    files = [p for p in (ROOT / "conf").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".yaml" for p in files)
