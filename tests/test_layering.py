"""The package's layers, read from every module's syntax tree (imports inside functions included).

Fails on any import cycle between modules of ``transport``, on ``transport.core`` or ``transport.methods``
importing ``transport.families`` or ``transport.sources``, on any library module but ``transport.sources``
importing ``transport.families``, on a library module importing the zoo's builder, and on ``transport``
importing streamlit. Also checks that the core names no family.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transport"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``path`` imports, anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # 'transport.core.layout.param_axes' -> the module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycle(graph):
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def _offenders(graph, importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m} -> {t}" for m, ts in graph.items() if m == importers or m.startswith(importers + ".")
            for t in ts if t.startswith(forbidden)]


def test_core_and_methods_never_import_families_or_sources(graph):
    bad = _offenders(graph, "transport.core", ("transport.families", "transport.sources", "transport.zoo",
                                               "transport.methods", "transport.pipeline", "transport.cli"))
    bad += _offenders(graph, "transport.methods", ("transport.families", "transport.sources", "transport.zoo",
                                                   "transport.pipeline", "transport.cli"))
    assert not bad, bad


def test_only_sources_imports_families(graph):
    bad = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
           if t.startswith("transport.families") and not m.startswith("transport.families") and m != "transport.sources"]
    assert not bad, bad


def test_no_library_module_imports_the_zoo_builder(graph):
    top = ("transport.cli", "transport.zoo.builder")
    bad = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if t == "transport.zoo.builder" and m not in top]
    assert not bad, bad


def test_transport_never_imports_streamlit():
    bad = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
           if re.search(r"^\s*(import streamlit|from streamlit)", p.read_text(), re.M)]
    assert not bad, bad


def test_the_core_names_no_family():
    words = re.compile(r"open_clip|openclip|hf_clip|hf_vit|vision_model|resblocks|in_proj|c_fc|transformers|"
                       r"\bllama\b|\bqwen|\bgpt2\b", re.I)
    bad = [f"{p.relative_to(ROOT)}:{i + 1}" for p in (PACKAGE / "core").rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines()) if words.search(line)]
    bad += [f"{p.relative_to(ROOT)}:{i + 1}" for p in (PACKAGE / "methods").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines())
            if re.search(r"resblocks|in_proj|vision_model|c_fc|self_attn|q_proj", line)]
    assert not bad, bad


def test_files_stay_small():
    """Modules stay readable: none over 600 lines (the design aims at ~500)."""
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
