"""The layout of docs/architecture.md, enforced: each wing's import rule, and no
import circle between the engine's modules (function-level imports included)."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "engine"
WINGS = ("engine.http", "engine.store", "engine.ledger")
CORE = {"engine.campaign", "engine.codes", "engine.config", "engine.domain", "engine.errors",
        "engine.auth", "engine.ratelimit", "engine.schemas", "engine.shards",
        "engine.crashpoint", "engine.logs", "engine.cliargs"}
ROOTS = {"engine.cli", "engine.server"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def parse(path: Path) -> ast.Module:
    """``ast.parse`` with the collector off: CPython 3.11.7 can raise ``SystemError: AST
    constructor recursion depth mismatch`` (gh-106905) when a collection runs another
    object's finalizer while it builds the tree, as an earlier test's leftovers did."""
    source = path.read_text("utf-8")
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def imports_of(name: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """Every module ``name`` imports, anywhere in its body: third-party ones by their
    top-level name, the engine's by their full dotted name."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name if a.name.startswith("engine") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("engine"):
                out.add(mod.split(".")[0])
                continue
            out.add(mod)
            for a in node.names:  # "from engine.store import keys" imports a module
                if f"{mod}.{a.name}" in modules:
                    out.add(f"{mod}.{a.name}")
    out.discard(name)
    return out


def engine_imports(name: str, modules: dict[str, Path] = MODULES) -> set[str]:
    return {m for m in imports_of(name, modules) if m.startswith("engine")}


def in_wing(mod: str, wing: str) -> bool:
    return mod == wing or mod.startswith(wing + ".")


def wing_of(mod: str) -> str | None:
    return next((w for w in WINGS if in_wing(mod, w)), None)


def test_every_module_has_a_place() -> None:
    for name in MODULES:
        assert (name in ("engine", "engine.data") or name in CORE or name in ROOTS
                or wing_of(name) or name in ("engine.service", "engine.metrics")), \
            f"{name} has no place"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_import_rules(name: str) -> None:
    check_rules(name, MODULES)


def check_rules(name: str, modules: dict[str, Path]) -> None:
    imps = imports_of(name, modules)
    eng = engine_imports(name, modules)
    wing = wing_of(name)
    touches = {w for w in WINGS if any(in_wing(m, w) for m in eng)}
    # No module imports both aiohttp and redis, and only the http wing imports aiohttp.
    assert not ({"aiohttp", "redis"} <= imps)
    if wing != "engine.http":
        assert "aiohttp" not in imps, f"{name} imports aiohttp outside engine/http/"
    if name in CORE:
        assert not touches and not eng & (ROOTS | {"engine.service", "engine.metrics"}), \
            f"core module {name} imports {sorted(eng)}"
        assert not imps & {"aiohttp", "redis", "hiredis", "sqlite3"}
    elif name == "engine.service":
        assert touches <= {"engine.store"} and not eng & ROOTS
        assert not imps & {"redis", "sqlite3"}
    elif name == "engine.metrics":
        assert eng - CORE <= {"engine.store.scripts"}, sorted(eng - CORE)
        assert not imps & {"redis", "sqlite3"}
    elif wing == "engine.http":
        # The app factory builds the engine through the service, never the store itself.
        assert not touches - {"engine.http"}, f"{name} imports {sorted(eng)}"
        assert not eng & ROOTS and not imps & {"redis", "sqlite3"}
    elif wing == "engine.store":
        assert not touches - {"engine.store"}, f"{name} imports {sorted(eng)}"
        assert not eng & (ROOTS | {"engine.service", "engine.metrics"})
        assert "sqlite3" not in imps
    elif wing == "engine.ledger":
        assert not touches - {"engine.ledger", "engine.store"}, f"{name} imports {sorted(eng)}"
        assert not eng & (ROOTS | {"engine.service", "engine.metrics"})


def test_no_import_circle() -> None:
    check_no_circle(MODULES)


def check_no_circle(modules: dict[str, Path]) -> None:
    graph = {name: {m for m in engine_imports(name, modules) if m in modules}
             for name in modules}
    # A package's __init__ re-exporting its own modules is not a circle through them.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".")
                                                      and modules[m].name == "__init__.py")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_rules_would_catch_a_breach(tmp_path: Path) -> None:
    """Guard against vacuous rules: a store module importing aiohttp and the service,
    and two modules importing each other (inside a function, as the archiver once did)."""
    fake = {"engine": ROOT / "__init__.py", "engine.store": ROOT / "store" / "__init__.py"}
    for name, text in (("a", "from aiohttp import web\nfrom ..service import Engine\n"),
                       ("b", "def f():\n    from . import c\n"), ("c", "from . import b\n")):
        (tmp_path / f"{name}.py").write_text(text)
        fake[f"engine.store.{name}"] = tmp_path / f"{name}.py"
    with pytest.raises(AssertionError, match="aiohttp"):
        check_rules("engine.store.a", fake)
    (tmp_path / "a.py").write_text("from ..service import Engine\n")
    with pytest.raises(AssertionError):
        check_rules("engine.store.a", fake)
    fake["engine.store"] = tmp_path / "a.py"  # an __init__ that imports nothing of these
    with pytest.raises(AssertionError, match="circle: engine.store.b -> engine.store.c"):
        check_no_circle(fake)
