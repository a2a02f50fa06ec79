"""The build: a wheel compiles the per-message modules with mypyc where a C compiler is
present and is pure Python, with one line of notice, where none is; ``broker --version``
names the build that runs; the suite runs against either (``.ci/run`` runs it against a
compiled install too, with ``BROKER_EXPECT_COMPILED=1``)."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import broker

from .support import ROOT, isolated_env

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The modules setup.py compiles (pyproject.toml, ``[tool.broker] compiled``).
COMPILED = PYPROJECT["tool"]["broker"]["compiled"]


def is_extension(module: str) -> bool:
    origin = importlib.import_module(module).__file__ or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def requirement_name(line: str) -> str:
    for stop in "[<>=!~; ":
        line = line.split(stop, 1)[0]
    return line.strip().lower().replace("_", "-")


def test_every_module_to_compile_exists() -> None:
    # A module renamed or split would otherwise fail only the compiled build.
    missing = [m for m in COMPILED if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, f"pyproject.toml [tool.broker] compiled names missing modules: {missing}"
    assert len(set(COMPILED)) == len(COMPILED)


def test_no_interpreted_class_subclasses_a_compiled_one() -> None:
    # A compiled class cannot be subclassed by interpreted code (a TypeError at import of
    # the compiled build only): compile the subclass's module too, or leave both out.
    found = []
    for path in sorted((ROOT / "broker").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module in COMPILED:
            continue
        tree = ast.parse(path.read_text())
        compiled_names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module in COMPILED
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                found += [f"{module}.{node.name}({b})" for b in bases & compiled_names]
    assert not found, found


def test_the_build_environment_has_the_types_it_compiles_from() -> None:
    # mypyc compiles from the types mypy infers, so the build environment holds the
    # runtime libraries and the mypy that judges the code (requirements/tools.txt).
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    runtime = {
        requirement_name(line)
        for line in cfg["options"]["install_requires"].splitlines()
        if line.strip()
    }
    build = PYPROJECT["build-system"]["requires"]
    assert runtime <= {requirement_name(r) for r in build}, build
    tools = (ROOT / "requirements" / "tools.txt").read_text().splitlines()
    assert [r for r in build if r.startswith("mypy")] == [
        t for t in tools if t.startswith("mypy==")
    ]


def test_version_names_the_build_that_runs(tmp_path: Path) -> None:
    compiled = [m for m in COMPILED if is_extension(m)]
    # All or nothing: a partial build would be a packaging bug.
    assert compiled in ([], COMPILED), compiled
    build = "compiled" if compiled else "pure Python"
    assert broker.build() == build
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--version"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"broker {broker.__version__} ({build})"


@pytest.mark.skipif(
    os.environ.get("BROKER_EXPECT_COMPILED") != "1", reason="BROKER_EXPECT_COMPILED=1 unset"
)
def test_the_suite_runs_the_compiled_build() -> None:
    # .ci/run installs the compiled wheel and sets BROKER_EXPECT_COMPILED=1: the suite
    # must import that install, not this source tree.
    assert Path(broker.__file__).resolve().parent.parent != ROOT, broker.__file__
    assert [m for m in COMPILED if not is_extension(m)] == []
    assert broker.build() == "compiled"


@pytest.mark.slow
def test_without_a_c_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("broker", "cli"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    env = {**isolated_env(tmp_path), "CC": "/bin/false"}
    env.pop("BROKER_COMPILE", None)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "dist")]
        + [str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    notices = [
        line.strip()
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip().startswith("broker: ")
    ]
    assert len(notices) == 1 and notices[0].startswith("broker: pure Python build: "), notices
    (wheel,) = (tmp_path / "dist").glob("broker_pubsub-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith((".so", ".pyd"))]
        archive.extractall(site)
    # The pure wheel runs, and says so (from a directory that shadows nothing).
    env = {**isolated_env(tmp_path), "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    version = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--version"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.stdout.strip() == f"broker {broker.__version__} (pure Python)", version
