"""The layering the README promises, checked on the source: who may import whom, no pickle,
no private name used outside its module.

    osd/       the core library: decoding, models, data, serving, registry, router
    trainers/  distillation on top of osd
    actors/    thin Ray roles over osd and trainers
    bench/     benchmarks, cli/ the `osd` command: composition roots, may use everything
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("osd", "trainers", "actors", "bench", "cli")
FORBIDDEN = {
    "osd": {"ray", "actors", "trainers", "bench", "cli"},
    "trainers": {"ray", "actors", "bench", "cli"},
    "actors": {"bench", "cli"},
}
PICKLE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (function-level imports count too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def layering_violations(package: str) -> list[str]:
    banned = FORBIDDEN[package]
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in python_files(package)
            for line, module in imported_modules(ast.parse(path.read_text(), str(path)))
            if module.split(".")[0] in banned]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_the_layers_below_it(package):
    assert python_files(package), f"no Python files under {package}/"
    assert layering_violations(package) == []


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The check above can fail: a function-level `import ray` in osd/ is found."""
    fake = tmp_path / "osd" / "decoding"
    fake.mkdir(parents=True)
    (fake / "sneaky.py").write_text("def f():\n    from trainers.loop import TrainerLoop\n    import ray\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert layering_violations("osd") == ["osd/decoding/sneaky.py:2 imports trainers.loop",
                                          "osd/decoding/sneaky.py:3 imports ray"]


@pytest.mark.parametrize("package", ["osd", "trainers", "actors"])
def test_nothing_imports_pickle(package):
    for path in python_files(package):
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            assert module.split(".")[0] not in PICKLE, f"{path}:{line} imports {module}"


def test_no_private_name_is_imported_from_another_module():
    found = []
    for package in OURS:
        for path in python_files(package):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_test_files_do_not_import_each_other():
    """Shared helpers live in tests/support/; a test module imports none of its siblings."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
            if module.split(".")[-1].startswith("test_"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert found == []
