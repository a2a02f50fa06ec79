"""broker.js tells an expired token from a refused one by codes and claims, not by words.

An expired token is a close ``4003`` on an open connection, or a token refused at
authentication (``unauthorized``, close ``4001``) whose own ``exp`` has passed; the text of
the broker's reason is for people. ``tests/js/expiry.mjs`` runs in Node against a real
broker; without node this skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from typing import Any

import pytest

from .support import ROOT, BrokerProcess

JS = ROOT / "tests" / "js"


def _node() -> list[str]:
    node = shutil.which("node")
    version = "" if node is None else subprocess.check_output([node, "--version"], text=True)
    found = re.match(r"v(\d+)", version.strip())
    if node is None or found is None or int(found.group(1)) < 20:
        reason = "needs node 20 or newer (apt-get install nodejs)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (a skip under CI would hide a missing install step)")
        pytest.skip(reason)
    return [node, "--experimental-websocket"] if int(found.group(1)) < 22 else [node]


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@pytest.mark.slow
def test_expiry_is_read_from_codes_and_claims_not_from_the_reason(broker: BrokerProcess) -> None:
    # Refused for its algorithm, with a reason that quotes it: "invalid algorithm 'expired' ...".
    header = _b64({"alg": "expired", "typ": "JWT"})
    forged = f"{header}.{_b64({'sub': '1', 'exp': int(time.time()) + 3600})}.c2ln"
    proc = subprocess.run(
        [
            *_node(),
            str(JS / "expiry.mjs"),
            broker.url,
            forged,
            broker.token("1", "Alice", ttl=-60),
            broker.token("1", "Alice"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=JS,
    )
    assert proc.returncode == 0, f"node exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "expired" in out["forged"]["message"]  # the words say so; the token is not
    assert out["forged"]["name"] == "Unauthorized"
    assert out["forged"]["unauthorized"] is True and out["forged"]["expired"] is False
    assert out["forgedState"] == "failed"
    # With getToken, a freshly fetched token that is refused stops the client at once.
    assert out["forgedGetToken"]["calls"] == 1
    assert out["forgedGetToken"]["state"] == "failed"
    assert out["forgedGetToken"]["error"]["name"] == "Unauthorized"
    # A token whose exp has passed is TokenExpired, still an Unauthorized.
    assert out["expired"]["name"] == "TokenExpired"
    assert out["expired"]["unauthorized"] is True and out["expired"]["expired"] is True
    # A held token refused while our clock thinks it valid: one fresh token, then connected.
    assert out["skewed"] == {"connected": True, "calls": 1, "state": "connected"}
