"""``broker serve`` settings: one table for flags, BROKER_* variables, a TOML file, defaults.

The first two tests start real brokers configured only by a file and only by the
environment, and check that port, history limit and max message size take effect.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.exceptions import ConnectionClosed

from broker.cli.main import cli
from broker.server.config import SETTINGS, ServerConfig
from broker.server.config_docs import settings_markdown, starter_file

from .support import ROOT, SECRET, BrokerProcess, Peer, free_port, isolated_env


class BareBroker(BrokerProcess):
    """``broker serve`` with no flag but the given ones: the rest from env and file."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "broker.cli", "serve", *self.args]


async def check_configured(broker: BrokerProcess, data_dir: Path) -> None:
    """Port as configured, 2 messages kept per topic, frames over 1 KiB closed with 1009."""
    peer = await Peer.open(broker.url, broker.token("u1"))
    try:
        for i in range(4):
            reply = await peer.request("pub", topic="cfg", data=f"m{i}")
            assert reply["op"] == "ok", reply
        reply = await peer.request("sub", topic="cfg", last=10)
        assert reply["op"] == "ok"
        replayed = [await peer.recv() for _ in range(2)]
        assert [m["data"] for m in replayed] == ["m2", "m3"]
        await peer.expect_nothing(0.2)
        await peer.send({"op": "pub", "topic": "cfg", "data": "x" * 2000})
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                await peer.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        await peer.close()
    assert (data_dir / "broker.sqlite3").is_file()


@pytest.mark.slow
async def test_a_broker_configured_entirely_by_file(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "filedata"
    config = tmp_path / "broker.toml"
    config.write_text(
        f'port = {port}\nsecret = "{SECRET}"\ndata = "{data}"\n'
        'history = 2\nmax_message_size = "1KiB"\nlog_format = "json"\n'
    )
    broker = BareBroker(tmp_path / "home", "--config", str(config), port=port)
    broker.start()
    try:
        await check_configured(broker, data)
        # log_format = "json" took effect too: every log line is a JSON object.
        assert broker.log().lstrip().startswith("{")
    finally:
        broker.kill()


@pytest.mark.slow
async def test_a_broker_configured_entirely_by_environment(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "envdata"
    env = {
        "BROKER_PORT": str(port),
        "BROKER_SECRET": SECRET,
        "BROKER_DATA": str(data),
        "BROKER_HISTORY": "2",
        "BROKER_MAX_MESSAGE_SIZE": "1KiB",
    }
    broker = BareBroker(tmp_path / "home", port=port, env=env)
    broker.start()
    try:
        await check_configured(broker, data)
    finally:
        broker.kill()


@pytest.mark.slow
def test_the_default_config_file_is_read(tmp_path: Path) -> None:
    """broker.toml in the user's config dir applies when no --config is given."""
    port = free_port()
    home = tmp_path / "home"
    (home / "config" / "broker").mkdir(parents=True)
    (home / "config" / "broker" / "broker.toml").write_text(f"port = {port}\n")
    # start() returns once the broker accepts connections on that port.
    broker = BareBroker(home, "--memory", port=port, env={"BROKER_SECRET": SECRET}).start()
    try:
        assert wait_for_log(broker, f"listening on ws://127.0.0.1:{port}/ws")
    finally:
        broker.kill()


def wait_for_log(broker: BrokerProcess, text: str, timeout: float = 10.0) -> bool:
    """Poll the broker's log until ``text`` shows up (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in broker.log():
            return True
        time.sleep(0.05)
    return False


def serve_config(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``broker serve ARGS --print-config`` in-process: (exit code, output)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    full_env.update(env or {})
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", *args, "--print-config"], env=full_env)
    return result.exit_code, result.output


def printed(output: str) -> dict[str, tuple[str, str]]:
    """``--print-config`` lines as {name: (value, source)}."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^(#\s)?(\w+)(?: = (.*?)| \(not set\))\s+# (.*)$", line)
        if match:
            rows[match[2]] = ((match[3] or "").strip(), match[4])
    return rows


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = tmp_path / "b.toml"
    config.write_text('port = 1111\nhistory = 7\nmax_queue = "2MiB"\nretention = "1h"\n')
    code, out = serve_config(
        tmp_path,
        "--config",
        str(config),
        "--port",
        "3333",
        env={"BROKER_PORT": "2222", "BROKER_HISTORY": "8"},
    )
    assert code == 0, out
    rows = printed(out)
    assert rows["port"] == ("3333", "flag --port")
    assert rows["history"] == ("8", "env BROKER_HISTORY")
    assert rows["max_queue"] == ('"2MiB"', f"file {config}")
    assert rows["retention"] == ('"1h"', f"file {config}")
    assert rows["max_message_size"] == ('"64KiB"', "default")
    assert set(rows) == {row.name for row in SETTINGS}
    # Without the flag the environment wins over the file; without both, the file.
    assert printed(serve_config(tmp_path, "--config", str(config), env={"BROKER_PORT": "2222"})[1])[
        "port"
    ] == ("2222", "env BROKER_PORT")
    assert printed(serve_config(tmp_path, "--config", str(config))[1])["port"] == (
        "1111",
        f"file {config}",
    )


def test_a_switch_flag_overrides_the_environment(tmp_path: Path) -> None:
    code, out = serve_config(tmp_path, "--no-memory", env={"BROKER_MEMORY": "true"})
    assert code == 0, out
    assert printed(out)["memory"] == ("false", "flag --memory")
    code, out = serve_config(tmp_path, env={"BROKER_MEMORY": "yes"})
    assert printed(out)["memory"] == ("true", "env BROKER_MEMORY")


def test_print_config_redacts_secrets(tmp_path: Path) -> None:
    code, out = serve_config(
        tmp_path,
        "--secret",
        "s3cr3t-value-0123456789",
        env={"BROKER_REDIS": "redis://user:hunter2pass@127.0.0.1:6379/0"},
    )
    assert code == 0, out
    assert "s3cr3t-value" not in out and "hunter2pass" not in out
    rows = printed(out)
    assert rows["secret"] == ('"<redacted>"', "flag --secret")
    assert rows["redis"] == ('"redis://user:<redacted>@127.0.0.1:6379/0"', "env BROKER_REDIS")


def test_an_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("port = 9000\nmax_queu = 5\n")
    code, out = serve_config(tmp_path, "--config", str(config))
    assert code == 2
    assert str(config) in out and "'max_queu'" in out and "max_queue" in out


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("env", "bad value for max_queue from env BROKER_MAX_QUEUE: 'lots' is not a size"),
        ("file", "bad value for max_queue from file {file}: 'lots' is not a size"),
    ],
)
def test_a_bad_value_names_the_key_and_its_source(
    tmp_path: Path, where: str, expected: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('max_queue = "lots"\n' if where == "file" else "")
    env = {"BROKER_MAX_QUEUE": "lots"} if where == "env" else {}
    code, out = serve_config(tmp_path, "--config", str(config), env=env)
    assert code == 2
    assert expected.format(file=config) in " ".join(out.split())


def test_a_value_of_the_wrong_toml_type_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('port = "nine"\nmemory = "maybe"\n')
    code, out = serve_config(tmp_path, "--config", str(config))
    assert code == 2 and "bad value for port from file" in out


def test_settings_that_exclude_each_other_name_their_sources(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('data = "/tmp/somewhere"\n')
    code, out = serve_config(tmp_path, "--config", str(config), "--memory")
    assert code == 2
    assert "memory (flag --memory) and data (file" in out


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    code, out = serve_config(tmp_path, "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "nope.toml: no such config file" in out


def test_every_setting_has_a_flag_a_variable_and_a_key() -> None:
    """The one rule: --max-queue, BROKER_MAX_QUEUE, max_queue; every one in --help."""
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    help_text = " ".join(result.output.split())
    fields = set(ServerConfig.__dataclass_fields__)
    for row in SETTINGS:
        assert row.flag == "--" + row.name.replace("_", "-")
        assert row.env == "BROKER_" + row.name.upper()
        assert row.field in fields
        assert row.flag in help_text and row.env in help_text
        # The default parses back to itself through its own kind.
        if row.default not in (None, []):
            assert row.kind.parse(tomllib.loads(f"v = {row.kind.show(row.default)}")["v"]) == (
                row.default
            )


def test_config_init_writes_a_commented_starter_file(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "broker.toml"
    runner = CliRunner()
    first = runner.invoke(cli, ["config", "init", str(target)])
    assert first.exit_code == 0, first.output
    text = target.read_text()
    assert text == starter_file()
    assert tomllib.loads(text) == {}  # everything commented out: all defaults
    assert target.stat().st_mode & 0o077 == 0  # it may come to hold the secret
    # Every setting is there, with its help; uncommented, the lines are valid TOML.
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    assert set(tomllib.loads(uncommented)) == {row.name for row in SETTINGS}
    for row in SETTINGS:
        assert row.env in text
    # It refuses to overwrite, unless --force.
    target.write_text("port = 1\n")
    again = runner.invoke(cli, ["config", "init", str(target)])
    assert again.exit_code == 1 and "--force" in again.output
    assert target.read_text() == "port = 1\n"
    assert runner.invoke(cli, ["config", "init", str(target), "--force"]).exit_code == 0
    assert target.read_text() == starter_file()


def test_config_init_default_location_is_what_serve_reads(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    result = CliRunner().invoke(cli, ["config", "init"], env=env)
    assert result.exit_code == 0, result.output
    written = tmp_path / "xdg" / "broker" / "broker.toml"
    assert written.is_file()
    code, out = serve_config(tmp_path)
    assert code == 0 and f"# config file: {written}" in out


def broker_script() -> Path:
    """The installed console script (``pip install -e .`` puts it beside python)."""
    script = Path(sys.executable).parent / "broker"
    assert script.is_file(), "the broker console script is not installed (pip install -e .)"
    return script


@pytest.mark.slow
def test_bash_completion_script_and_completions(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    source = subprocess.run(
        [str(broker_script())],
        env={**env, "_BROKER_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert source.returncode == 0, source.stderr
    assert "_broker_completion()" in source.stdout
    assert "complete -o nosort -F _broker_completion broker" in source.stdout
    check = subprocess.run(
        ["bash", "-n"], input=source.stdout, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
    # And the completions it asks for: commands, then serve's options.
    words = subprocess.run(
        [str(broker_script())],
        env={
            **env,
            "_BROKER_COMPLETE": "bash_complete",
            "COMP_WORDS": "broker se",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "plain,serve" in words.stdout.splitlines()
    options = subprocess.run(
        [str(broker_script())],
        env={
            **env,
            "_BROKER_COMPLETE": "bash_complete",
            "COMP_WORDS": "broker serve --max-q",
            "COMP_CWORD": "2",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "plain,--max-queue" in options.stdout.splitlines()


@pytest.mark.process
def test_no_banner_when_stderr_is_not_a_terminal(broker: BrokerProcess) -> None:
    """In a pipe or a file the log is plain lines: no box-drawn banner first."""
    assert wait_for_log(broker, "listening on")
    log = broker.log()
    assert not set("╭╮╰╯│─") & set(log)
    assert log.splitlines()[0].split()[0][:4].isdigit()  # a timestamped log line first


@pytest.mark.slow
def test_root_has_no_top_level_cli_package() -> None:
    """cli/ installs as broker.cli: importing a top-level `cli` must not find ours."""
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli'))"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert str(ROOT / "cli") not in found.stdout


def test_the_settings_table_in_the_docs_is_the_table() -> None:
    """docs/operations.md shows exactly the settings table (regenerate it when this fails:
    python -c 'from broker.server.config_docs import settings_markdown as m; print(m())')."""
    docs = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"<!-- settings-table:[^\n]*-->\n(.*?)\n<!-- /settings-table -->", docs, re.S)
    assert match is not None, "the settings table markers are missing from docs/operations.md"
    assert match[1] == settings_markdown()
