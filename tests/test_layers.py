"""The layering contract, checked on the source: who may import whom, and no cycles.

    broker.errors            the exception tree: imports nothing of ours
    broker.core              sans-I/O (topics, auth, protocol, model, hub): errors only
    broker.store             core, errors
    broker.server            store, core, errors (redis only lazily, with --redis)
    broker.client            core, errors
    broker.cli (cli/)        anything

Only imports that run when a module is imported count: those under ``if TYPE_CHECKING``
and inside functions are deliberate late bindings (the Redis store, the CLI's commands).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Layer -> the layers of ours it may import at module level (besides itself).
ALLOWED = {
    "broker.errors": set(),
    "broker.core": {"broker.errors"},
    "broker.store": {"broker.errors", "broker.core"},
    "broker.server": {"broker.errors", "broker.core", "broker.store"},
    "broker.client": {"broker.errors", "broker.core"},
    "broker.cli": {
        "broker.errors",
        "broker.core",
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


def module_files() -> dict[str, Path]:
    """Every module of the package, by its import name (cli/ installs as broker.cli)."""
    found: dict[str, Path] = {}
    for folder, prefix in ((ROOT / "broker", "broker"), (ROOT / "cli", "broker.cli")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def eager_imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports when it is imported (absolute names)."""
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
            elif isinstance(node, ast.If) and not _type_checking(node):
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


def ours(imported: str) -> str | None:
    """The module of ours that ``imported`` names (a module, or a name in one)."""
    while imported:
        if imported in MODULES:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def graph() -> dict[str, set[str]]:
    return {
        name: {m for m in map(ours, eager_imports(name, path)) if m and m != name}
        for name, path in MODULES.items()
    }


def test_the_layout_has_the_layers() -> None:
    for folder in ("broker/core", "broker/store", "broker/store/redis", "broker/server", "cli"):
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


def test_the_core_does_no_io() -> None:
    wrong = []
    for name, path in MODULES.items():
        if layer(name) in ("broker.core", "broker.errors"):
            for imported in eager_imports(name, path):
                if imported.split(".")[0] in IO_MODULES:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    deps = graph()
    # Package __init__ modules re-export their children: an edge back to them is not a cycle.
    for name in deps:
        deps[name] = {d for d in deps[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(deps):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


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
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
