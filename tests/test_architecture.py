"""The package's layering, read from its source with ``ast`` (nothing is imported):

- no import cycles among ``lightning_tlq`` modules, counting every import statement wherever it sits (module level,
  inside a function, under ``if __name__ == "__main__"``; only ``if TYPE_CHECKING:`` blocks, never executed, are
  left out): a lazy import still makes the modules depend on each other both ways;
- ``lightning_tlq/core/`` is pure torch: it imports nothing from lightning or transformers, nothing from the rest
  of the package, and never reads the environment (``os.environ`` / ``os.getenv``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tlq"

_METHODS = ("awq", "gptq", "mbq", "rtn", "smoothquant", "tlq")
KNOWN_CYCLES: set[frozenset[str]] = set()
"""Import cycles tolerated for now: none. Break a new one by moving the shared piece into a third module (as
``methods/registry.py``, ``adapters/registry.py`` and ``run_calibration.py`` did) rather than listing it here."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never executed)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (any import statement), resolved to modules that exist."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` depends on the module, `from pkg import name` on pkg (grimp's convention)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where only a.b is a module
                target = target.rpartition(".")[0]
            if target.startswith("lightning_tlq") and target != name:
                out.add(target)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), each a set of modules in a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert sorted(map(sorted, _cycles(graph))) == [["a", "b", "c"], ["e", "f"]]


def test_imports_are_resolved_to_package_modules() -> None:
    graph = _graph()
    assert "lightning_tlq.core.quantizer" in graph["lightning_tlq.core.gptq"]  # from-import of a function
    assert "lightning_tlq.core.gptq_graph" in graph["lightning_tlq.core.gptq"]  # `from pkg import module`
    assert "lightning_tlq.run_calibration" in graph["lightning_tlq.lightning_cli"]  # an import inside a method counts
    assert "lightning_tlq.config" not in graph["lightning_tlq.methods.base"]  # under `if TYPE_CHECKING:` only


def test_no_import_cycles_among_package_modules() -> None:
    cycles = set(_cycles(_graph()))
    new = sorted(sorted(c) for c in cycles - KNOWN_CYCLES)
    assert not new, f"import cycles: {new}; break them (move the shared piece into a third module)"
    gone = sorted(sorted(c) for c in KNOWN_CYCLES - cycles)
    assert not gone, f"these known cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_core_is_pure_torch() -> None:
    for name, path in _modules().items():
        if not name.startswith("lightning_tlq.core"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [node.module or ""] if not node.level else [f"lightning_tlq.core.{node.module or ''}"]
            else:
                roots = []
            for root in roots:
                top = root.split(".")[0]
                assert top not in ("lightning", "pytorch_lightning", "transformers"), f"{name} imports {root}"
                if top == "lightning_tlq":
                    assert root.startswith("lightning_tlq.core"), f"{name} imports {root}: core is the bottom layer"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
                assert node.attr not in ("environ", "getenv", "putenv"), f"{name} reads os.{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module == "os":
                bad = {alias.name for alias in node.names} & {"environ", "getenv"}
                assert not bad, f"{name} imports os.{bad.pop()}"


def test_only_the_environment_module_reads_os_environ() -> None:
    readers = sorted(
        name
        for name, path in _modules().items()
        if ("os.environ" in path.read_text() or "os.getenv" in path.read_text()) and name != "lightning_tlq.environment"
    )
    assert not readers, f"{readers} read the environment: declare the variable in lightning_tlq/environment.py"


_PICTURE = (  # top to bottom
    ("cli", "lightning_cli", "callbacks", "run_calibration", "trainer_fabric", "calibrate", "evaluate", "launch"),
    ("pipeline",),
    ("loop", "importance_pass", "vision", "activations", "placement", "lowmem"),
    ("stage", "module_stats", "smoothing", "shared_stats", "rowsplit", "tokenweights"),
    ("methods",),
    ("adapters", "models", "tasks"),
    ("core",),
)
LAYERS: dict[str, int] = {m: len(_PICTURE) - 1 - rank for rank, names in enumerate(_PICTURE) for m in names}
"""The layers of docs/architecture.md's picture (top = 6), by first name below ``lightning_tlq``; modules beside
the layers (data, outputs, evaluation, config, keys, environment...) are not ranked."""


def _layer(module: str) -> int | None:
    return LAYERS.get(module.removeprefix("lightning_tlq.").partition(".")[0])


def test_no_import_runs_back_up_the_layers() -> None:
    upward = sorted(
        f"{name} ({_layer(name)}) imports {target} ({_layer(target)})"
        for name, targets in _graph().items()
        for target in targets
        if _layer(name) is not None and _layer(target) is not None and _layer(target) > _layer(name)
    )
    assert not upward, "imports that run back up the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_every_layer_of_the_picture_exists() -> None:
    tops = {name.removeprefix("lightning_tlq.").partition(".")[0] for name in _modules()}
    assert set(LAYERS) <= tops, f"docs/architecture.md layers without a module: {sorted(set(LAYERS) - tops)}"
