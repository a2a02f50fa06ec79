"""Build a copy of this tree with its per-message modules compiled, to measure both builds
side by side with the same harness.

A wheel (``pip install .``) is compiled already where a C compiler is present (setup.py;
the modules are listed in pyproject.toml under ``[tool.broker] compiled``), and this tree's
editable install is pure Python. This copies the tree to ``--out`` (default: a new
temporary directory) and compiles it in place with the same build hook, so that every
benchmark run from the copy measures the compiled build:

    python benchmarks/compiled.py --out /tmp/compiled     # ~2 minutes on one core
    python /tmp/compiled/benchmarks/chat_path.py           # the benchmarks put their own
    python benchmarks/chat_path.py                         # tree first on sys.path

``MYPYC_OPT_LEVEL`` (default 3) is passed on. mypyc comes with mypy (the test extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ("broker", "cli", "benchmarks", "setup.py", "setup.cfg", "pyproject.toml", "README.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the compiled copy")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="broker-compiled-"))
    out.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "node_modules", "peers")
    for name in COPY:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, out / name, ignore=skip, dirs_exist_ok=True)
        else:
            shutil.copy(ROOT / name, out / name)
    # The CLI installs as broker.cli; in a source tree it is cli/.
    link = out / "broker" / "cli"
    if not link.exists():
        link.symlink_to(out / "cli", target_is_directory=True)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=out,
        env={**os.environ, "BROKER_COMPILE": "1"},
    )
    if done.returncode:
        return done.returncode
    print(f"compiled copy: {out}\nrun a benchmark from it: python {out}/benchmarks/chat_path.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
