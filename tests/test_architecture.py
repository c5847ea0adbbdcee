"""The layering docs/architecture.md promises: no import cycles in the core, no Flower in it, and
the teacher's training outside the library."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "feddifrc_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported when `path` runs (imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body
               for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _core_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # an import of a package's module also runs the package's __init__
        deps = set()
        for imported in _runtime_imports(path):
            if imported in modules:
                deps.add(imported)
        graph[name] = deps - {name}
    return graph


def test_core_has_no_import_cycles():
    graph = _core_graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40  # the walk saw the whole package


def test_core_does_not_import_flower_or_the_teacher_trainer():
    for path in CORE.rglob("*.py"):
        imports = _runtime_imports(path)
        assert not any(i == "flwr" or i.startswith("flwr.") for i in imports), path
        assert not any(i == "teacher" or i.startswith("teacher.") for i in imports), path


def _imports_of(folder: str) -> dict[Path, set[str]]:
    return {p: _runtime_imports(p) for p in (ROOT / folder).rglob("*.py")}


def test_the_apps_share_only_the_wire_protocol():
    """Neither app imports the other; what travels between them is spelled once, in wire/."""
    for app, other in (("server_app", "client_app"), ("client_app", "server_app")):
        for path, imports in _imports_of(app).items():
            assert not any(i == other or i.startswith(other + ".") for i in imports), path
    for app in ("server_app/app.py", "server_app/strategy.py", "client_app/app.py"):
        assert "wire.protocol" in _runtime_imports(ROOT / app) or "wire" in _runtime_imports(
            ROOT / app), app


def test_tools_are_packages_without_path_hacks():
    for folder in ("benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path
        assert (ROOT / folder / "__init__.py").is_file()
