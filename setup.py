"""The build hook: compile the per-message modules with mypyc where it can.

Everything else about the package is in setup.cfg. A wheel (``pip install .``) compiles
the modules listed in pyproject.toml under ``[tool.broker] compiled`` when a C compiler and
the Python headers are present, and is pure Python, with one line saying why, when they
are not. An editable install (``pip install -e .``) stays pure Python. ``BROKER_COMPILE``
overrides: ``0`` never compiles, ``1`` always does (an editable install too) and fails the
build when it cannot. ``MYPYC_OPT_LEVEL`` (default 3) is the C optimisation level.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILDS = {"bdist_wheel", "build", "build_ext", "install", "editable_wheel", "develop"}
EDITABLE = {"editable_wheel", "develop"}


def notice(line: str) -> None:
    print(f"broker: {line}", file=sys.stderr, flush=True)


def compiled_modules() -> list[str]:
    """The source files to compile (pyproject.toml, ``[tool.broker] compiled``)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        modules: list[str] = tomllib.load(f)["tool"]["broker"]["compiled"]
    return [m.replace(".", "/") + ".py" for m in modules]


def why_not() -> str | None:
    """Why no extension can be built here (None: it can)."""
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        return f"no Python headers ({include}/Python.h)"
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    compiler: Any = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile([str(probe)], output_dir=tmp, include_dirs=[include])
        except Exception as exc:
            return f"no working C compiler ({str(exc).splitlines()[0] if str(exc) else exc})"
    return None


def extensions() -> list[Any]:
    """mypyc's extensions for this build, or [] for a pure-Python one."""
    commands = set(sys.argv[1:])
    if not commands & BUILDS:
        return []  # metadata only (egg_info, dist_info, sdist)
    # What an earlier build left (pip builds in this tree) would go into this wheel too: a
    # stale extension in a pure wheel, or one of a module no longer compiled.
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    setting = os.environ.get("BROKER_COMPILE", "")
    if setting == "0":
        notice("pure Python build (BROKER_COMPILE=0)")
        return []
    if setting != "1" and commands & EDITABLE:
        return []  # development: pure Python unless asked
    reason = why_not()
    if reason is None:
        try:
            from mypyc.build import mypycify
        except ImportError:
            reason = "mypy is not installed in the build environment"
    if reason is not None:
        if setting == "1":
            raise SystemExit(f"broker: BROKER_COMPILE=1 but cannot compile: {reason}")
        notice(f"pure Python build: {reason}")
        return []
    notice("compiling the per-message modules with mypyc")
    try:
        return list(
            mypycify(
                compiled_modules(),
                opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
                group_name="broker",  # the shared library: broker__mypyc.*.so
                # One C file for all modules: ~3 % fewer instructions per publish than
                # one per module (multi_file=True), for ~30 % more build CPU.
                multi_file=False,
            )
        )
    except SystemExit:  # mypy found errors (printed above)
        if setting == "1":
            raise
        notice("pure Python build: mypyc could not compile the modules (see above)")
        return []


class ParallelBuildExt(build_ext):
    """build_ext compiling an extension's C files on every core at once (the modules' file
    and a dozen of mypyc's runtime library, which distutils would compile one after
    another), and leaving the build pure Python when the C compiler fails (unless
    BROKER_COMPILE=1)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if os.environ.get("BROKER_COMPILE") == "1" or not self.extensions:
                raise
            notice(f"pure Python build: the C compiler failed ({type(exc).__name__})")
            self.extensions = []
            self.distribution.ext_modules = []

    def build_extension(self, ext: Any) -> None:
        compiler = self.compiler
        serial = compiler.compile
        jobs = os.cpu_count() or 1

        def compile_all(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            if jobs < 2 or len(sources) < 2:
                return list(serial(sources, *args, **kwargs))
            with ThreadPoolExecutor(jobs) as pool:
                parts = pool.map(lambda s: serial([s], *args, **kwargs), sources)
                return [obj for objs in parts for obj in objs]

        compiler.compile = compile_all
        try:
            super().build_extension(ext)
        finally:
            compiler.compile = serial


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
