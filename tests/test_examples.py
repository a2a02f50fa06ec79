"""Every script in examples/ runs to completion against a real broker and prints what
its scenario promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import Broker
from .support import ROOT, SECRET, isolated_env

# Each test runs example scripts as processes.
pytestmark = pytest.mark.slow


def run_example(name: str, broker: Broker, tmp_path: Path) -> list[str]:
    proc = subprocess.run(  # noqa: PLW1510 - the code is asserted
        [
            sys.executable,
            str(ROOT / "examples" / name),
            "--url",
            broker.url,
            "--secret",
            SECRET,
        ],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout.splitlines()


def test_chat_one_to_one(broker: Broker, tmp_path: Path) -> None:
    assert run_example("chat_one_to_one.py", broker, tmp_path) == [
        "Alice -> bob: Hi Bob, are you coming to the match?",
        "Bob -> alice: Yes Alice, see you at 3!",
    ]


def test_group_channel(broker: Broker, tmp_path: Path) -> None:
    lines = run_example("group_channel.py", broker, tmp_path)
    users = ["ann", "ben", "cat"]
    expected = [
        f"{me} heard {other}: hello from {other}" for me in users for other in users if other != me
    ]
    assert lines[:-1] == expected  # nobody hears their own message
    assert lines[-1] == "in the channel: Ann, Ben, Cat"


def test_football_scores(broker: Broker, tmp_path: Path) -> None:
    lines = run_example("football_scores.py", broker, tmp_path)
    by_listener = {
        name: [line.split(": ", 1)[1] for line in lines if line.startswith(name + ":")]
        for name in ("fan1", "fan2", "gooner", "late", "feed")
    }
    everything = [
        "ars-che 1-0 (12')",
        "liv-mun 0-1 (30')",
        "ars-che 2-0 (58')",
        "liv-mun 1-1 (77')",
    ]
    assert by_listener["fan1"] == everything
    assert by_listener["fan2"] == everything
    assert by_listener["gooner"] == ["ars-che 1-0 (12')", "ars-che 2-0 (58')"]
    assert by_listener["late"] == everything[-2:]  # from history, after the match
    assert len(by_listener["feed"]) == 4


def test_examples_need_a_secret(tmp_path: Path) -> None:
    proc = subprocess.run(  # noqa: PLW1510 - the code is asserted
        [sys.executable, str(ROOT / "examples" / "chat_one_to_one.py")],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "no secret" in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_every_example_is_tested_and_documented(path: Path) -> None:
    assert f'"{path.name}"' in Path(__file__).read_text()
    assert path.read_text().startswith('"""')
