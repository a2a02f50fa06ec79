"""The layering contract, checked on the source: who may import whom, and no cycles.

    broker.errors            the exception tree: imports nothing of ours
    broker.core              sans-I/O (topics, auth, protocol, model, hub, units): errors only
    broker.local             this machine's broker: default URL, directories, the local
                             secret (file I/O, so not the core): core, errors
    broker.store             core, errors
    broker.server            store, local, core, errors (redis only lazily, with --redis)
    broker.client            local, core, errors
    broker.cli (cli/)        anything

Module-level imports count, those under ``if TYPE_CHECKING`` included: a cycle that only
the type checker sees is still two modules that cannot be read apart. Imports inside
functions are deliberate late bindings (the Redis store, the CLI's commands) and do not.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from .support import FROM_SOURCE

ROOT = Path(__file__).resolve().parent.parent

#: Layer -> the layers of ours it may import at module level (besides itself).
ALLOWED = {
    "broker.errors": set(),
    "broker.core": {"broker.errors"},
    "broker.local": {"broker.errors", "broker.core"},
    "broker.store": {"broker.errors", "broker.core"},
    "broker.server": {"broker.errors", "broker.core", "broker.local", "broker.store"},
    "broker.client": {"broker.errors", "broker.core", "broker.local"},
    "broker.cli": {
        "broker.errors",
        "broker.core",
        "broker.local",
        "broker.store",
        "broker.server",
        "broker.client",
    },
    "broker": set(),
}
#: What the sans-I/O core must never import: no event loop, no sockets, no threads.
IO_MODULES = {
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "threading",
    "concurrent",
    "sqlite3",
    "websockets",
    "redis",
    "uvloop",
    "subprocess",
}


#: Cycles known and owned by a change in flight, each with why it is still here. Nothing else
#: may be added: a new cycle is a design to fix, not an exception to list.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_files(
    roots: tuple[tuple[Path, str], ...] = (
        (ROOT / "broker", "broker"),
        (ROOT / "cli", "broker.cli"),
    ),
) -> dict[str, Path]:
    """Every module under ``roots`` (folder, import name), by its import name (cli/
    installs as broker.cli)."""
    found: dict[str, Path] = {}
    for folder, prefix in roots:
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def eager_imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports at module level, ``if TYPE_CHECKING`` included (absolute
    names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                out.add(mod)
                out.update(f"{mod}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return out


def layer(module: str) -> str:
    """The layer a module of ours belongs to."""
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} is in no layer")


MODULES = module_files()


def ours(imported: str, modules: Mapping[str, Path] = MODULES) -> str | None:
    """The module of ``modules`` that ``imported`` names (a module, or a name in one)."""
    while imported:
        if imported in modules:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def graph(modules: Mapping[str, Path] = MODULES) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports."""
    out = {}
    for name, path in modules.items():
        found = (ours(imported, modules) for imported in eager_imports(name, path))
        out[name] = {m for m in found if m and m != name}
    return out


def import_cycles(deps: Mapping[str, set[str]]) -> list[list[str]]:
    """The cycles of the import graph ``deps``, each as the modules along it."""
    # Package __init__ modules re-export their children: an edge back to them is not a cycle.
    edges = {name: {d for d in ds if not name.startswith(d + ".")} for name, ds in deps.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_the_layout_has_the_layers() -> None:
    for folder in (
        "broker/core",
        "broker/store",
        "broker/store/redis",
        "broker/store/sqlite",
        "broker/server",
        "cli",
    ):
        assert (ROOT / folder).is_dir(), folder
    assert {layer(m) for m in MODULES} == set(ALLOWED)


def test_each_layer_imports_only_the_layers_below() -> None:
    wrong = []
    for name, deps in graph().items():
        mine = layer(name)
        for dep in deps:
            theirs = layer(dep)
            if theirs != mine and theirs not in ALLOWED[mine] and dep != "broker":
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "layering broken:\n" + "\n".join(sorted(wrong))


def test_the_examples_are_client_side() -> None:
    # What an application copies: the client, the local defaults, never the server.
    wrong = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        for imported in eager_imports(f"examples.{path.stem}", path):
            mine = ours(imported)
            if mine is not None and layer(mine) not in ALLOWED["broker.client"] | {"broker.client"}:
                wrong.append(f"{path.name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_core_does_no_io() -> None:
    wrong = []
    for name, path in MODULES.items():
        if layer(name) in ("broker.core", "broker.errors"):
            for imported in eager_imports(name, path):
                if imported.split(".")[0] in IO_MODULES:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    cycles = [c for c in import_cycles(graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_the_known_cycles_still_exist() -> None:
    # An exception outliving its cycle would hide the next one through the same modules.
    found = {frozenset(c) for c in import_cycles(graph())}
    gone = KNOWN_CYCLES - found
    assert not gone, f"no longer a cycle, remove it from KNOWN_CYCLES: {gone}"


def test_a_cycle_through_type_checking_imports_is_found(tmp_path: Path) -> None:
    # The checker itself, on a small tree: a imports b only for the type checker, b imports
    # a at run time. Python runs it; the layering test must still call it a cycle.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.b import B\n"
        "class A:\n"
        "    def b(self) -> B: ...\n"
    )
    (pkg / "b.py").write_text("from . import a\nclass B(a.A): ...\n")
    (pkg / "c.py").write_text("def late() -> None:\n    from pkg import a\n")
    modules = module_files(((pkg, "pkg"),))
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    assert graph(modules)["pkg.c"] == set()  # an import inside a function is no edge
    assert import_cycles(graph(modules)) == [["pkg.a", "pkg.b"]]


def test_the_contract_catches_a_violation(tmp_path: Path) -> None:
    # The checker itself: a core module importing the server is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom broker.server.app import BrokerServer\n")
    found = {ours(m) for m in eager_imports("broker.core.bad", bad)}
    assert "broker.server.app" in found
    assert "asyncio" in eager_imports("broker.core.bad", bad)


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_a_single_node_never_imports_redis(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from broker.server.config import ServerConfig\n"
        "from broker.server.factory import create_server\n"
        "import broker.cli.main\n"
        f"create_server(ServerConfig(secret='s' * 32, data={str(tmp_path)!r}))\n"
        "create_server(ServerConfig(secret='s' * 32, memory=True))\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))\n"
    )
    env = dict(os.environ)
    if FROM_SOURCE:  # else the installed build under test (.ci/run's compiled one)
        env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
