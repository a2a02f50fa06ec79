"""broker.js is checked by the TypeScript compiler, and broker.d.ts is generated from it.

``tsc`` (pinned in ``tests/js/package.json``; ``npm ci --prefix tests/js``) checks
``broker/static/broker.js`` with its JSDoc types under the strict settings of
``tests/js/tsconfig.broker.json``, and ``tests/js/declarations.mjs --check`` regenerates
``broker/static/broker.d.ts`` from those types and compares it with the committed file.
Without node or tsc these tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .support import ROOT

JS = ROOT / "tests" / "js"
TSC = JS / "node_modules" / ".bin" / "tsc"
STRICT = {
    "allowJs": True,
    "checkJs": True,
    "strict": True,
    "noImplicitReturns": True,
    "noFallthroughCasesInSwitch": True,
    "noUnusedLocals": True,
    "noUnusedParameters": True,
}


def _tools() -> str:
    node = shutil.which("node")
    if node is None or not TSC.exists():
        reason = "needs node and tsc (apt-get install nodejs; npm ci --prefix tests/js)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (a skip under CI would hide a missing install step)")
        pytest.skip(reason)
    return node


@pytest.mark.slow
def test_broker_js_has_no_type_errors_under_strict_settings() -> None:
    _tools()
    config = json.loads((JS / "tsconfig.broker.json").read_text())
    assert config["compilerOptions"].items() >= STRICT.items()  # nobody loosened it
    assert config["files"] == ["../../broker/static/broker.js"]
    # Editors check it too, without the tsconfig.
    assert "\n// @ts-check\n" in (ROOT / "broker" / "static" / "broker.js").read_text()
    proc = subprocess.run(
        [str(TSC), "--noEmit", "-p", str(JS / "tsconfig.broker.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS,
    )
    assert proc.returncode == 0, f"tsc found type errors in broker.js:\n{proc.stdout}{proc.stderr}"


@pytest.mark.slow
def test_broker_d_ts_is_what_broker_js_declares() -> None:
    node = _tools()
    proc = subprocess.run(
        [node, str(JS / "declarations.mjs"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    declarations = (ROOT / "broker" / "static" / "broker.d.ts").read_text()
    # The library's surface, documented; its internals are not part of it.
    for name in ("BrokerClient", "Subscription", "ClientOptions", "Message<T = Json>"):
        assert f" {name} " in declarations
    assert "Returns a fresh JWT" in declarations
    assert not [line for line in declarations.splitlines() if line.lstrip().startswith("_")]
    assert "@internal" not in declarations and "type Frame" not in declarations
