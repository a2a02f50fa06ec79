"""What the CLI says when something is off (a bad option, an unreachable or refusing
broker, a terminal where a pipe was expected): one clear line and a documented exit code,
each against a real broker where one is involved."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.cli.main import cli

from .harness import Broker
from .support import ROOT, SECRET, free_port, isolated_env


def invoke(tmp_path: Path, *args: str) -> Result:
    """The CLI in-process, no token or secret from the environment."""
    env: dict[str, str | None] = {
        "BROKER_URL": None,
        "BROKER_TOKEN": None,
        "BROKER_SECRET": None,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "NO_COLOR": "1",
    }
    result = CliRunner().invoke(cli, list(args), env=env)
    assert "Traceback" not in result.output
    return result


def run_cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``broker`` command in a subprocess, stdin closed."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=ROOT,
        env={**isolated_env(tmp_path), "BROKER_SECRET": SECRET},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_token_ttl_zero_is_refused_not_eternal(tmp_path: Path) -> None:
    for ttl in ("0", "0s", "none"):
        result = invoke(tmp_path, "token", "--secret", SECRET, "--id", "a", "--ttl", ttl)
        assert result.exit_code == 2, (ttl, result.output)
        assert "--ttl" in result.output
    zero = invoke(tmp_path, "token", "--secret", SECRET, "--id", "a", "--ttl", "0")
    assert "never" in zero.output  # says how to ask for no expiry
    never = invoke(tmp_path, "token", "--secret", SECRET, "--id", "a", "--ttl", "never")
    assert never.exit_code == 0 and never.output.count(".") == 2


def test_token_empty_id_is_refused(tmp_path: Path) -> None:
    result = invoke(tmp_path, "token", "--secret", SECRET, "--id", "")
    assert result.exit_code == 2
    assert "--id" in result.output and "must not be empty" in result.output


@pytest.mark.slow
def test_bench_unreachable_exits_3(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    result = run_cli(tmp_path, "bench", "--url", url, "--secret", SECRET, "--msgs", "10")
    assert result.returncode == 3, result.stderr
    assert url in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_refused_token_exits_4(broker: Broker, tmp_path: Path) -> None:
    wrong = "another-secret-0123456789-abcdefghijklmnop"
    result = run_cli(tmp_path, "bench", "--url", broker.url, "--secret", wrong, "--msgs", "10")
    assert result.returncode == 4, result.stderr
    assert "token refused" in result.stderr


@pytest.mark.slow
def test_bench_duration_takes_a_duration(broker: Broker, tmp_path: Path) -> None:
    bad = invoke(tmp_path, "bench", "--url", broker.url, "--duration", "soon")
    assert bad.exit_code == 2 and "is not a duration" in bad.output
    started = time.monotonic()
    result = run_cli(
        tmp_path,
        "bench",
        "--url",
        broker.url,
        "--secret",
        SECRET,
        "--sub",
        "1",
        "--msgs",
        "100000000",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    # A rate of 200/s for 1s: about 200 published, nowhere near --msgs.
    assert '"published":' in result.stdout
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_pub_on_a_terminal_says_it_reads_stdin(broker: Broker, tmp_path: Path) -> None:
    """``broker pub TOPIC`` with a terminal for stdin: a hint on stderr, Ctrl-D ends it."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "pub", "hint", "--url", broker.url],
        cwd=ROOT,
        env={**isolated_env(tmp_path), "BROKER_SECRET": SECRET},
        stdin=terminal,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        seen = read_terminal(controller, b"Ctrl-D")
        assert b"from stdin, one per line" in seen and b"Ctrl-D" in seen, seen
        os.write(controller, b"goal\n\x04")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)


def read_terminal(controller: int, until: bytes, timeout: float = 15) -> bytes:
    """What a program wrote to its terminal, until ``until`` shows up or ``timeout`` passes."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.2)
        if ready:
            try:
                seen += os.read(controller, 4096)
            except OSError:
                break
    return seen


def on_terminal(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """``broker ARGS`` with stdout and stderr on a terminal; (process, controller fd)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=ROOT,
        env={**isolated_env(tmp_path), "BROKER_SECRET": SECRET, "TERM": "dumb"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    return proc, controller


@pytest.mark.slow
def test_readme_three_terminals_output(broker: Broker, tmp_path: Path) -> None:
    """What the README says terminals 2 and 3 show."""
    sub, sub_out = on_terminal(
        tmp_path, "sub", "football", "--count", "1", "--url", broker.url, "-v"
    )
    pub: subprocess.Popen[bytes] | None = None
    try:
        assert b"subscribed to football" in read_terminal(sub_out, b"epoch")
        pub, pub_out = on_terminal(tmp_path, "pub", "football", "2-1", "--url", broker.url)
        assert pub.wait(15) == 0
        said = read_terminal(pub_out, b")\r\n").decode()
        os.close(pub_out)
        assert "published to football (seq 1)" in said
        line = read_terminal(sub_out, b"2-1").decode()
        assert sub.wait(15) == 0
        # time, topic, sender (the local login name), data
        assert re.search(r"\d\d:\d\d:\d\d\.\d{3} football \S+ 2-1", line), line
    finally:
        for proc in (sub, pub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        os.close(sub_out)
    # Piped, the same subscription prints the data alone.
    piped = run_cli(tmp_path, "sub", "football", "--last", "1", "--count", "1", "--url", broker.url)
    assert piped.stdout == "2-1\n"


@pytest.mark.slow
def test_wss_to_a_plain_broker_is_one_clear_line(broker: Broker, tmp_path: Path) -> None:
    result = run_cli(tmp_path, "pub", "t", "x", "--url", f"wss://127.0.0.1:{broker.port}/ws")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "TLS" in lines[0] and f"ws://127.0.0.1:{broker.port}/ws" in lines[0], lines[0]
    assert "ConnectionResetError" not in lines[0]


@pytest.mark.slow
def test_a_wrong_path_hints_at_ws(broker: Broker, tmp_path: Path) -> None:
    for command in ("pub", "sub"):
        result = run_cli(tmp_path, command, "t", "x", "--url", f"ws://127.0.0.1:{broker.port}/")
        assert result.returncode == 3
        assert "HTTP 404" in result.stderr
        assert f"ws://127.0.0.1:{broker.port}/ws" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_message_over_the_size_limit_says_it_was_refused(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    small = make_broker("--max-message-size", "1KiB")
    result = run_cli(tmp_path, "pub", "big", "x" * 2000, "--url", small.url)
    assert result.returncode == 2, result.stderr
    assert "may or may not" not in result.stderr
    assert "refused" in result.stderr and "size limit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # It was indeed not recorded.
    kept = run_cli(
        tmp_path, "sub", "big", "--last", "10", "--timeout", "1s", "--json", "--url", small.url
    )
    assert kept.stdout == ""
