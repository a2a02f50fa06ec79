"""Build a copy of the broker whose hot path is compiled with mypyc, to measure that lever.

The broker is not shipped compiled; this answers "what would compiling the per-publish
path buy" with the same harness as every other figure. It copies ``broker/`` to
``--out`` (default: a new temporary directory), compiles there the modules one chat
publish runs through (frame parsing, request handling, codec, hub, session, journal and
both stores' append paths) and prints how to start the compiled broker:

    python benchmarks/compiled.py                 # ~2.5 minutes on one core
    PYTHONPATH=<out> broker serve ...             # as printed; the CLI stays interpreted

mypyc comes with mypy (the test extra). The source is unchanged, but the copy is for
measuring, not for serving: mypyc turns mypy's unsound narrowings into runtime
TypeErrors, and two tests of the suite fail against it (docs/performance.md, "The
compiled hot path, measured").
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

#: The modules of one publish's path, from the socket to the store (see
#: docs/performance.md, "Chat rooms").
HOT = [
    "broker/core/auth.py",
    "broker/core/frames.py",
    "broker/core/hub.py",
    "broker/core/model.py",
    "broker/core/protocol.py",
    "broker/core/topics.py",
    "broker/server/app.py",
    "broker/server/backpressure.py",
    "broker/server/connection.py",
    "broker/server/journal.py",
    "broker/server/metrics.py",
    "broker/server/session.py",
    "broker/store/dedupe.py",
    "broker/store/memory.py",
    "broker/store/sqlite/commitlog.py",
    "broker/store/sqlite/database.py",
    "broker/store/sqlite/files.py",
    "broker/store/sqlite/store.py",
    "broker/store/sqlite/syncer.py",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the compiled copy")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="broker-mypyc-"))
    shutil.copytree(ROOT / "broker", out / "broker", dirs_exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", out / "pyproject.toml")
    done = subprocess.run(
        [sys.executable, "-m", "mypyc", *HOT], cwd=out, env={**os.environ, "MYPYC_OPT_LEVEL": "3"}
    )
    if done.returncode:
        return done.returncode
    print(f"compiled copy: {out}\nrun it with: PYTHONPATH={out} broker serve ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
