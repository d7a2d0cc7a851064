"""Package hygiene: light import, no engine imported eagerly."""

from __future__ import annotations

import subprocess
import sys


def test_import_localroute_imports_no_engine() -> None:
    code = (
        "import sys, localroute, localroute.server, localroute.cli, localroute.routing, localroute.settings;"
        "heavy = [m for m in ('llama_cpp', 'torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_version_is_exported() -> None:
    import localroute

    assert localroute.__all__ == ["__version__"] and localroute.__version__


# The house's layers, lowest first: a module may import its own layer and those below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("localroute", "localroute.errors", "localroute.types", "localroute.fileio", "localroute.redaction"),
    ("localroute.settings", "localroute.registry", "localroute.calibration_file"),
    ("localroute.backends", "localroute.embeddings", "localroute.shared_state"),
    ("localroute.routing",),
    ("localroute.monitoring",),
    ("localroute.evaluation",),
    ("localroute.service",),
    ("localroute.server",),
    ("localroute.bench", "localroute.cli"),
    ("localroute.__main__",),
)


def _import_graph() -> dict[str, set[str]]:
    """Every localroute module and the localroute modules it imports (top level or lazily)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "localroute"
    paths = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name not in paths:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name) if name.startswith("localroute") else None
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def _layer(module: str) -> int:
    best, level = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level >= 0, f"{module} is in no layer: add it to LAYERS"
    return level


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph[module]):
            if seen.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    return cycles


def test_no_module_imports_a_layer_above_it() -> None:
    assert _upward(_import_graph()) == []


def test_no_import_cycles() -> None:
    assert _cycles(_import_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both defects is caught, and the real graph's
    edges (lazy imports included) are read."""
    bad = {"localroute.routing.cascade": {"localroute.routing.verifier", "localroute.server.app"},
           "localroute.routing.verifier": {"localroute.routing.cascade"}, "localroute.server.app": set()}
    assert _upward(bad) == ["localroute.routing.cascade -> localroute.server.app"]
    assert _cycles(bad) == [["localroute.routing.cascade", "localroute.routing.verifier", "localroute.routing.cascade"]]
    graph = _import_graph()
    assert "localroute.routing.cascade" in graph["localroute.routing.verifier"]
    assert "localroute.routing.response_format" in graph["localroute.routing.cascade"]  # a lazy import
