"""The house rules the code review checks: no module imports upward, no import loop.

Layers, lowest first (docs/architecture.md draws them). A module may import its own layer and
the ones below it, never one above, not even inside a function; imports under
`if TYPE_CHECKING:` are for the type checker only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "routerd"

LAYERS: list[set[str]] = [
    {"errors", "config", "units", "bodies", "events", "log", "sdnotify", "tlsctx", "keys",
     "metrics", "__init__"},
    {"store", "workers", "engine", "client"},
    {"catalog", "discovery"},
    {"scheduler", "peers"},
    {"dispatch"},
    {"api", "activity", "history"},
    {"app", "reload", "cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py; add it")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported routerd module, at module level?) for each runtime import in the file."""
    tree = ast.parse(path.read_text())
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for name in names:
            if name == "routerd" or name.startswith("routerd."):
                found.append((name, id(node) in top_level))
    return found


def _real(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_module_imports_upward() -> None:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module(f) for f in files}
    bad = []
    for f in files:
        me = _module(f)
        for name, _ in _imports(f):
            target = _real(name, modules)
            if target and target != "routerd" and _layer(target) > _layer(me):
                bad.append(f"{me} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_loop_at_module_level() -> None:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for f in files:
        me = _module(f)
        for name, top in _imports(f):
            target = _real(name, modules)
            if top and target and target not in (me, "routerd") and not me.startswith(target + "."):
                graph[me].add(target)
    seen: dict[str, int] = {}
    loops: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                loops.append(" -> ".join(path[path.index(n):] + [n]) if n in path else n)
            elif n not in seen:
                visit(n, path + [n])
        seen[m] = 2

    for m in sorted(modules):
        if m not in seen:
            visit(m, [m])
    assert not loops, "\n".join(loops)


def test_bench_has_no_import_loop() -> None:
    """bench/__main__ imports bench/document; document must not import __main__ back."""
    text = (ROOT / "bench/document.py").read_text()
    assert "__main__" not in text
