"""broker.js on public topics: ``latest`` and anonymous connections in Node against a real
broker (the declarations are checked with the others by tests/test_js_client.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .support import PUBLIC_SCORES, BrokerProcess
from .test_js_client import run_node


@pytest.mark.slow
def test_latest_and_anonymous_in_node(make_broker: Any, tmp_path: Path) -> None:
    path = tmp_path / "public.toml"
    path.write_text(PUBLIC_SCORES)
    broker: BrokerProcess = make_broker("--config", str(path))
    out = run_node("public.mjs", broker.url, broker.token("p"))
    assert out["user"] == {"id": "", "name": ""}
    assert out["ready"]["recovered"] is True
    assert out["got"] == [["scores/b", "1-0"], ["scores/a", "1-0"], ["scores/b", "2-0"]]
    assert out["publish"] == "Forbidden" and out["chat"] == "Forbidden"
    assert out["both"] == "TypeError"
