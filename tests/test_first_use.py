"""What a new user meets first, with the README only: each message says what to do next.

``broker stats`` without an admin token says how to get one; ``broker serve`` logs the
console's address and warns about a short secret; ``--print-config`` shows the data
directory it will use; a ``[server]`` table in the settings file says where settings go;
docs/web.md's event table lists every event its own examples listen to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli.main import cli

from .support import ROOT, SECRET, BrokerProcess, isolated_env, wait_for


def serve_print_config(tmp_path: Path, *args: str) -> tuple[int, str]:
    """``broker serve ARGS --print-config`` in-process, with XDG dirs under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    result = CliRunner().invoke(cli, ["serve", *args, "--print-config"], env=env)
    return result.exit_code, result.output


@pytest.mark.slow
def test_stats_without_an_admin_token_says_how_to_get_one(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path, memory=True).start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "stats", "--url", broker.url],
            env={**isolated_env(tmp_path), "BROKER_TOKEN": broker.token("u1")},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        broker.kill()
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "stats needs an admin token" in lines[0]
    assert "`broker token --id ops --admin`" in lines[0]


@pytest.mark.slow
def test_serve_logs_the_console_address_too(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path, memory=True).start()
    try:
        wait_for(lambda: "listening on" in broker.log(), timeout=10)
        line = next(x for x in broker.log().splitlines() if "listening on" in x)
    finally:
        broker.kill()
    assert f"ws://127.0.0.1:{broker.port}/ws" in line
    assert f"console: http://127.0.0.1:{broker.port}/" in line


@pytest.mark.slow
def test_serve_warns_about_a_short_secret_as_token_does(tmp_path: Path) -> None:
    token = subprocess.run(
        [sys.executable, "-m", "broker.cli", "token", "--id", "u", "--secret", "abc"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    warning = "the secret is only 3 bytes long; 32 or more are recommended"
    assert warning in token.stderr
    weak = BrokerProcess(tmp_path / "weak", secret="abc", memory=True).start()
    strong = BrokerProcess(tmp_path / "strong", secret=SECRET, memory=True).start()
    try:
        wait_for(lambda: "listening on" in weak.log() and "listening on" in strong.log())
        assert warning in weak.log()
        assert "flag --secret" in weak.log()  # where the short secret came from
        assert "bytes long" not in strong.log()
    finally:
        weak.kill()
        strong.kill()


def test_print_config_shows_the_data_directory_it_will_use(tmp_path: Path) -> None:
    code, out = serve_print_config(tmp_path)
    assert code == 0, out
    expected = tmp_path / "xdg-data" / "broker"
    line = next(x for x in out.splitlines() if re.match(r"#? ?data\b", x))
    assert line.startswith(f'data = "{expected}"'), line
    assert "the user's data directory" in line
    # Not on disk: no directory is claimed.
    code, out = serve_print_config(tmp_path, "--memory")
    assert code == 0, out
    assert re.search(r"^# data \(not set\)", out, re.M), out


def test_a_table_in_the_settings_file_says_settings_go_at_the_top_level(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[server]\nport = 9000\nsecret = "abc"\n')
    code, out = serve_print_config(tmp_path, "--config", str(config))
    assert code == 2
    text = " ".join(out.split())
    assert "[server]" in text and "settings go at the top level" in text
    assert "move port, secret there" in text
    assert "did you mean" not in text
    # Any table, an array of tables too, even with no setting in it.
    config.write_text("[[listeners]]\naddress = 'x'\n")
    code, out = serve_print_config(tmp_path, "--config", str(config))
    assert code == 2 and "settings go at the top level" in " ".join(out.split())


def test_the_web_docs_event_table_lists_the_events_of_its_examples() -> None:
    docs = (ROOT / "docs" / "web.md").read_text()
    table = docs.split("Events (`client.on(name, fn)`", 1)[1].split("\n\n", 2)[1]
    listed = {name for row in table.splitlines() for name in re.findall(r"`(\w+)`", row[:30])}
    used = set(re.findall(r"(?:client|getClient\(\))\.on\(\"(\w+)\"", docs))
    assert "state" in used  # the Angular and React examples
    assert used <= listed, used - listed
    # And the declarations' client events, each documented.
    dts = (ROOT / "broker" / "static" / "broker.d.ts").read_text()
    block = re.search(r"(?:interface ClientEvents|type ClientEvents =) \{(.*?)\}", dts, re.S)
    assert block is not None
    declared = set(re.findall(r"^\s*(\w+):", block[1], re.M))
    assert declared <= listed, declared - listed
