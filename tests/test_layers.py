"""Imports run one way: contracts -> models -> exporters -> runtime_check -> toolchain -> sqexport.

Every .py file of the five packages is parsed (ast, nothing is imported), including imports inside
functions: a lazy import is still a dependency. A lower layer importing a higher one, or any import
cycle between the project's modules, fails here with the offending lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("contracts", "models", "exporters", "runtime_check", "toolchain", "sqexport")
# installed, the layer folders are `sqexport.<layer>`; here they are named by their folders
NAMESPACE = "sqexport."
RANK = {name: i for i, name in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` names or lies in (`pkg.mod.func` -> `pkg.mod`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _local(name: str) -> str:
    """`sqexport.toolchain.x` (the installed name) -> `toolchain.x` (the folder's name)."""
    if name.startswith(NAMESPACE) and name[len(NAMESPACE):].split(".")[0] in RANK:
        return name[len(NAMESPACE):]
    return name


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_local(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _local(node.module or "")
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                found.append((resolved, node.lineno))
    return found


def _graph() -> dict[str, list[tuple[str, int]]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_every_layer_has_modules():
    layers = {m.split(".")[0] for m in _modules()}
    assert layers == set(LAYERS)


def test_no_lower_layer_imports_a_higher_one():
    known = _modules()
    upward = []
    for module, deps in _graph().items():
        for dep, line in deps:
            if RANK[dep.split(".")[0]] > RANK[module.split(".")[0]]:
                upward.append(f"{known[module].relative_to(ROOT)}:{line} imports {dep}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles_between_modules():
    graph = {m: sorted({d for d, _ in deps}) for m, deps in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _package(module: str) -> str:
    """A module's own package: `toolchain.quantization.int8` -> `toolchain.quantization`."""
    path = _modules()[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0] or module


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        src = _package(module)
        graph.setdefault(src, set())
        for dep, _ in deps:
            dst = _package(dep)
            graph.setdefault(dst, set())
            # a package's __init__ re-exporting its own submodules is not a cycle between packages
            if dst != src and not dst.startswith(src + ".") and not src.startswith(dst + "."):
                graph[src].add(dst)
    cycles = _cycles({k: sorted(v) for k, v in graph.items()})
    assert not cycles, "package cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, expected", [
    ("import sqexport.toolchain.registry", ["toolchain.registry"]),
    ("from sqexport.exporters.qdq import Site", ["exporters.qdq"]),
    ("from sqexport.toolchain.pruning import magnitude", ["toolchain.pruning.magnitude"]),
    ("def f():\n    from sqexport.toolchain import pipeline", ["toolchain.pipeline"]),
    ("from . import graph", ["exporters.graph"]),
    ("import numpy", []),
])
def test_the_parser_sees_every_kind_of_import(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [m for m, _ in _imports("exporters.probe", path, _modules())] == expected


def test_the_checks_catch_an_upward_import_and_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
    assert RANK["exporters"] < RANK["toolchain"]


OUTSIDE_DOCS = ("shared/methods.md", "shared/design.md", "shared/style.md", "../shared", "shared/")


def test_code_refers_to_no_document_outside_the_repository():
    """Comments and docstrings point at files a reader of this repository has (docs/, README)."""
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for folder in LAYERS + ("tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if any(ref in line for ref in OUTSIDE_DOCS) and p.name != "test_layers.py"]
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
