"""The client commands (token, sub, pub, tail, presence, stats) against real brokers.

Most run in-process with click's ``CliRunner``; the live ``sub`` and Ctrl-C tests run the
real ``broker`` command in a subprocess.
"""

from __future__ import annotations

import asyncio
import getpass
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from click.testing import CliRunner, Result

from broker.cli.main import cli
from broker.core.auth import mint_token

from .harness import Broker
from .support import (
    ROOT,
    SECRET,
    free_port,
    isolated_env,
    self_signed_cert,
)

Run = Callable[..., Result]


def make_runner(url: str, config: Path) -> Run:
    """Invoke the CLI in-process with an isolated environment; never a traceback."""

    def invoke(
        *args: str, input: str | None = None, env: dict[str, str | None] | None = None
    ) -> Result:
        base: dict[str, str | None] = {
            "BROKER_URL": url,
            "BROKER_TOKEN": None,
            "BROKER_SECRET": None,
            "BROKER_CA_FILE": None,
            "XDG_CONFIG_HOME": str(config),
            "NO_COLOR": "1",
        }
        base.update(env or {})
        result = CliRunner().invoke(cli, list(args), input=input, env=base, catch_exceptions=False)
        assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def run(tmp_path: Path, broker: Broker) -> Run:
    """The CLI against a running broker."""
    return make_runner(broker.url, tmp_path / "config")


@pytest.fixture
def offline(tmp_path: Path) -> Run:
    """The CLI with no broker (for ``broker token``)."""
    return make_runner(f"ws://127.0.0.1:{free_port()}/ws", tmp_path / "config")


def token_for(user: str = "alice", **kw: Any) -> str:
    return mint_token(SECRET, user, **kw)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# -- token ---------------------------------------------------------------------------------


def test_token_mints_with_every_option(offline: Run) -> None:
    result = offline(
        "token",
        "--id",
        "alice",
        "--name",
        "Alice",
        "--ttl",
        "15m",
        "--pub",
        "scores/#",
        "--sub",
        "scores/+",
        "--sub",
        "chat",
        "--admin",
        "--secret",
        SECRET,
    )
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 1  # the token alone
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["name"] == "Alice" and claims["admin"] is True
    assert claims["acl"] == {"pub": ["scores/#"], "sub": ["scores/+", "chat"]}
    assert abs(claims["exp"] - time.time() - 900) < 5


@pytest.mark.parametrize(
    "ttl,seconds", [("30", 30), ("7d", 7 * 86400), ("1h", 3600), ("never", None)]
)
def test_token_ttl_forms(offline: Run, ttl: str, seconds: int | None) -> None:
    result = offline("token", "--ttl", ttl, "--secret", SECRET)
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    if seconds is None:
        assert "exp" not in claims
    else:
        assert abs(claims["exp"] - time.time() - seconds) < 5
    assert claims["sub"] == getpass.getuser()  # default id: the login name


def test_token_secret_precedence(offline: Run, tmp_path: Path) -> None:
    secret_file = tmp_path / "config" / "broker" / "secret"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text("file-secret-file-secret-file-secret\n")
    env_secret = "env-secret-env-secret-env-secret-env"

    def signed_with(result: Result) -> str:
        token = result.stdout.strip()
        for key in (
            "flag-secret-flag-secret-flag-secret",
            env_secret,
            "file-secret-file-secret-file-secret",
        ):
            try:
                jwt.decode(token, key, algorithms=["HS256"])
                return key
            except jwt.InvalidSignatureError:
                continue
        raise AssertionError("signed with an unknown key")

    env = {"BROKER_SECRET": env_secret}
    assert signed_with(
        offline("token", "--secret", "flag-secret-flag-secret-flag-secret", env=env)
    ).startswith("flag")
    assert signed_with(offline("token", env=env)) == env_secret
    assert signed_with(offline("token")).startswith("file")


def test_token_empty_acl_lists(offline: Run) -> None:
    result = offline("token", "--id", "bot", "--pub", "scores/#", "--sub", "", "--secret", SECRET)
    assert result.exit_code == 0
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["acl"] == {
        "pub": ["scores/#"],
        "sub": [],
    }  # subscribe: own inbox only
    claims = jwt.decode(
        offline("token", "--secret", SECRET).stdout.strip(),
        SECRET,
        algorithms=["HS256"],
    )
    assert "acl" not in claims  # no list given: unrestricted


def test_token_errors(offline: Run) -> None:
    result = offline("token")  # no secret anywhere
    assert result.exit_code == 2 and "no secret" in result.stderr
    result = offline("token", "--id", "a/b", "--secret", SECRET)
    assert result.exit_code == 2 and "'/'" in result.stderr
    result = offline("token", "--ttl", "soon", "--secret", SECRET)
    assert result.exit_code == 2 and "not a duration" in result.stderr
    result = offline("token", "--pub", "a/#/b", "--secret", SECRET)
    assert result.exit_code == 2 and "'#' must be the last level" in result.stderr


def test_token_decode_valid(offline: Run) -> None:
    token = token_for("alice", name="Alice", ttl=3600, pub=["scores/#"])
    result = offline("token", "--decode", token, "--secret", SECRET)
    assert result.exit_code == 0
    assert "valid token for user 'alice' (Alice)" in result.stdout
    assert '"scores/#"' in result.stdout
    assert "expires in 59m" in result.stdout or "expires in 1h" in result.stdout
    assert "may publish to: scores/#" in result.stdout


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: token_for(ttl=-300), "token expired 5m"),
        (
            lambda: mint_token("some-other-secret-some-other-secret", "a"),
            "invalid signature",
        ),
        (lambda: "not.a.token", "malformed token"),
        (
            lambda: mint_token(SECRET * 2, "a", algorithm="HS512"),
            "invalid algorithm 'HS512'",
        ),
    ],
    ids=["expired", "signature", "malformed", "algorithm"],
)
def test_token_decode_refused(offline: Run, make: Callable[[], str], reason: str) -> None:
    result = offline("token", "--decode", make(), "--secret", SECRET)
    assert result.exit_code == 4
    assert reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- pub and sub -------------------------------------------------------------------------


def test_pub_then_sub_last_default_output(run: Run, broker: Broker) -> None:
    token = token_for("alice", name="Alice")
    assert run("pub", "football", "2-1", "--token", token).exit_code == 0
    assert (
        run("pub", "football", '{"home": 2, "away": 1}', "--json", "--token", token).exit_code == 0
    )
    assert run("pub", "football", "[1, 2]", "--token", token).exit_code == 0  # a string
    result = run("sub", "football", "--last", "3", "--count", "3", "--token", token)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["2-1", '{"home":2,"away":1}', "[1, 2]"]


def test_sub_json_and_format(run: Run) -> None:
    token = token_for("alice", name="Alice")
    run(
        "pub",
        "scores/uk",
        '{"home": 2, "team": {"name": "Ars"}}',
        "--json",
        "--token",
        token,
    )
    result = run("sub", "scores/+", "--last", "1", "--count", "1", "--json", "--token", token)
    line = orjson.loads(result.stdout)
    assert set(line) == {"topic", "seq", "data", "from", "ts"}
    assert line["from"] == {"id": "alice", "name": "Alice"} and line["data"]["home"] == 2
    result = run(
        "sub",
        "scores/#",
        "--last",
        "1",
        "--count",
        "1",
        "--token",
        token,
        "--format",
        r"{seq}|{topic}|{from.id}/{from.name}|{data.team.name}|{data.nope}|{{x}}\t{data}",
    )
    assert result.stdout == (
        f"{line['seq']}|scores/uk|alice/Alice|Ars||{{x}}\t" + '{"home":2,"team":{"name":"Ars"}}\n'
    )
    result = run(
        "sub",
        "scores/#",
        "--last",
        "1",
        "--count",
        "1",
        "-F",
        "{time} {ts}",
        "--token",
        token,
    )
    stamp, ts = result.stdout.split()
    assert stamp[:4].isdigit() and "T" in stamp and ts == str(line["ts"])


def test_sub_since_resumes_after_seq(run: Run) -> None:
    token = token_for()
    for i in range(5):
        run("pub", "resume", str(i), "--token", token)
    first = run("sub", "resume", "--last", "5", "--count", "2", "--json", "--token", token)
    seen = [orjson.loads(line) for line in first.stdout.splitlines()]
    assert [m["data"] for m in seen] == ["0", "1"]
    result = run(
        "sub",
        "resume",
        "--since",
        str(seen[-1]["seq"]),
        "--count",
        "3",
        "--token",
        token,
    )
    assert result.stdout.splitlines() == ["2", "3", "4"]
    assert result.stderr == ""


def test_sub_since_other_epoch_warns_and_replays(run: Run) -> None:
    token = token_for()
    run("pub", "ep", "a", "--token", token)
    result = run(
        "sub",
        "ep",
        "--since",
        "999",
        "--epoch",
        "old",
        "--count",
        "1",
        "--token",
        token,
    )
    assert result.exit_code == 0 and result.stdout == "a\n"
    assert "warning:" in result.stderr and "epoch old" in result.stderr


def test_sub_verbose_reports_seq_and_epoch(run: Run) -> None:
    token = token_for()
    run("pub", "v", "x", "--token", token)
    result = run("sub", "v", "--last", "1", "--count", "1", "-v", "--token", token)
    assert "subscribed to v (seq " in result.stderr and "epoch " in result.stderr


def test_sub_timeout_and_usage_errors(run: Run) -> None:
    token = token_for()
    started = time.monotonic()
    result = run("sub", "quiet", "--count", "2", "--timeout", "0.5", "--token", token)
    assert result.exit_code == 6 and time.monotonic() - started < 3
    assert "timed out after 0.5s (0 of 2 messages received)" in result.stderr
    assert run("sub", "a", "--since", "1", "--last", "1", "--token", token).exit_code == 2
    assert run("sub", "a", "--epoch", "e", "--token", token).exit_code == 2
    assert run("sub", "a", "--json", "-F", "{data}", "--token", token).exit_code == 2
    result = run("sub", "a", "-F", "{nope}", "--token", token)
    assert result.exit_code == 2 and "unknown field {nope}" in result.stderr
    result = run("sub", "a/#/b", "--token", token)
    assert result.exit_code == 2 and "'#' must be the last level" in result.stderr
    assert run("sub", "--token", token).exit_code == 2  # no pattern
    result = run("sub", "a", "--timeout", "abc", "--token", token)
    assert result.exit_code == 2


@pytest.mark.slow
def test_sub_live_with_pub_in_subprocess(run: Run, broker: Broker, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    env["BROKER_URL"] = broker.url
    env["BROKER_TOKEN"] = token_for("bob")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "sub",
            "football",
            "chat/+",
            "--count",
            "2",
            "-v",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for _ in range(2):  # both subscriptions confirmed
            assert "subscribed to" in proc.stderr.readline()
        assert run("pub", "football", "2-1", "--token", token_for("alice")).exit_code == 0
        assert run("pub", "chat/x", "hi", "--echo", "--token", token_for("alice")).exit_code == 0
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["2-1", "hi"]


@pytest.mark.slow
def test_pub_stdin_thousands_all_acknowledged(make_broker: Any, tmp_path: Path) -> None:
    broker = make_broker("--history", "5000")
    token = token_for()
    lines = "\n".join(str(i) for i in range(3000)) + "\n\n"  # a trailing blank line is skipped
    base = {
        "BROKER_URL": broker.url,
        "BROKER_SECRET": None,
        "XDG_CONFIG_HOME": str(tmp_path / "c"),
    }
    runner = CliRunner()
    result = runner.invoke(cli, ["pub", "bulk", "--json", "--token", token], input=lines, env=base)
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli,
        ["sub", "bulk", "--since", "0", "--count", "3000", "--token", token],
        env=base,
    )
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [str(i) for i in range(3000)]


def test_pub_stdin_failures_exit_non_zero(run: Run) -> None:
    limited = token_for("carol", pub=["scores/#"])
    result = run("pub", "chat", "--token", limited, input="a\nb\nc\n")
    assert result.exit_code == 5
    assert (
        "not acknowledged" in result.stderr
        and "line 1" in result.stderr
        and "forbidden" in result.stderr
    )
    result = run("pub", "scores/x", "--json", "--token", limited, input="1\n{bad\n3\n")
    assert result.exit_code == 2 and "line 2 is not valid JSON" in result.stderr


def test_pub_errors(run: Run) -> None:
    token = token_for()
    result = run("pub", "$sys/x", "1", "--token", token)
    assert result.exit_code == 5 and result.stderr.startswith("Error: forbidden:")
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("pub", "a/+", "1", "--token", token)
    assert result.exit_code == 2 and "publishing to a pattern" in result.stderr
    result = run("pub", "a", "{bad", "--json", "--token", token)
    assert result.exit_code == 2 and "not valid JSON" in result.stderr


# -- tail ----------------------------------------------------------------------------------


def test_tail_shows_last_n_rich(run: Run) -> None:
    token = token_for("alice", name="Alice")
    for i in range(12):
        run("pub", f"t/{i % 2}", f"goal {i}", "--token", token)
    run("pub", "t/0", '{"score": 3}', "--json", "--token", token)
    result = run("tail", "t/#", "-n", "3", "--count", "3", "--token", token)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    clock, rest = lines[0].split(" ", 1)
    assert len(clock) == 12 and clock[2] == ":" and clock[8] == "."
    assert rest == "t/0 Alice (alice) goal 10"
    assert lines[1].endswith(" t/1 Alice (alice) goal 11")
    assert lines[2].endswith(' t/0 Alice (alice) {"score":3}')
    result = run("tail", "t/1", "-n", "2", "--count", "2", "--json", "--token", token)
    assert [orjson.loads(x)["data"] for x in result.stdout.splitlines()] == [
        "goal 9",
        "goal 11",
    ]


# -- presence and stats ------------------------------------------------------------------------


async def test_presence_table_and_json(broker: Broker, run: Run) -> None:
    from broker.client import Client

    async def cli(
        *args: str,
    ) -> Result:  # the CLI runs its own event loop: use a thread
        return await asyncio.to_thread(run, "presence", *args, "--token", token_for("zed"))

    async with (
        Client(broker.url, token_for("ann", name="Ann")) as a1,
        Client(broker.url, token_for("ann", name="Ann")) as a2,
        Client(broker.url, token_for("ben", name="Ben")) as b,
    ):
        for c in (a1, a2, b):
            await c.subscribe("lobby")
        table = await cli("lobby")
        as_json = await cli("lobby", "--json")
        empty = await cli("nobody")
        pattern = await cli("lobby/+")
        inbox = await cli("user/ann")
    assert table.exit_code == 0
    rows = [line for line in table.stdout.splitlines() if "ann" in line or "ben" in line]
    assert len(rows) == 2 and "Ann" in rows[0] and rows[0].rstrip(" │|").endswith("2")
    assert rows[1].rstrip(" │|").endswith("1")
    assert sorted(orjson.loads(as_json.stdout), key=lambda u: u["id"]) == [
        {"id": "ann", "name": "Ann", "connections": 2},
        {"id": "ben", "name": "Ben", "connections": 1},
    ]
    assert "nobody is subscribed to nobody" in empty.stdout
    assert pattern.exit_code == 2 and "bad request" in pattern.stderr
    assert inbox.exit_code == 5 and "forbidden" in inbox.stderr


def test_stats(run: Run) -> None:
    admin = token_for("root", admin=True)
    result = run("stats", "--token", admin)
    assert (
        result.exit_code == 0 and "connections" in result.stdout and "broker stats" in result.stdout
    )
    result = run("stats", "--json", "--token", admin)
    assert orjson.loads(result.stdout)["connections"] >= 1
    result = run("stats", "--token", token_for("joe"))
    assert result.exit_code == 5 and "admin" in result.stderr


def test_stats_watch(run: Run) -> None:
    admin = token_for("root", admin=True)
    started = time.monotonic()
    result = run(
        "stats",
        "--watch",
        "--count",
        "3",
        "--interval",
        "0.1",
        "--json",
        "--token",
        admin,
    )
    assert result.exit_code == 0
    snapshots = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(snapshots) == 3 and all("connections" in s for s in snapshots)
    assert time.monotonic() - started < 3
    result = run("stats", "--watch", "--count", "2", "--interval", "0.1", "--token", admin)
    assert result.exit_code == 0 and "per second" in result.stdout


def test_stats_shows_top_topics(run: Run) -> None:
    admin = token_for("root", admin=True)
    for topic, n in (("cold", 1), ("hot", 3)):
        for i in range(n):
            assert run("pub", topic, str(i), "--token", token_for("p")).exit_code == 0
    out = run("stats", "--token", admin).stdout
    assert "top topics" in out
    assert out.index("hot") < out.index("cold")  # busiest first


# -- connection options and error paths --------------------------------------------------


def test_token_from_environment(run: Run) -> None:
    result = run("pub", "e", "x", env={"BROKER_TOKEN": token_for("envuser")})
    assert result.exit_code == 0
    result = run(
        "sub",
        "e",
        "--last",
        "1",
        "--count",
        "1",
        "--json",
        env={"BROKER_TOKEN": token_for("z")},
    )
    assert orjson.loads(result.stdout)["from"]["id"] == "envuser"


def test_local_secret_mints_for_login_user(run: Run, tmp_path: Path) -> None:
    secret_file = tmp_path / "config" / "broker" / "secret"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text(SECRET + "\n")
    assert run("pub", "football", "2-1").exit_code == 0  # no token typed anywhere
    result = run("sub", "football", "--last", "1", "--count", "1", "--json")
    assert result.exit_code == 0
    assert orjson.loads(result.stdout)["from"]["id"] == getpass.getuser()


def test_url_from_environment_and_flag(run: Run, broker: Broker) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    token = token_for()
    result = run("pub", "u", "x", "--token", token, env={"BROKER_URL": dead})
    assert result.exit_code == 3 and "cannot connect" in result.stderr
    assert (
        run(
            "pub",
            "u",
            "x",
            "--token",
            token,
            "--url",
            broker.url,
            env={"BROKER_URL": dead},
        ).exit_code
        == 0
    )
    # A list: the dead one is skipped.
    assert run("pub", "u", "x", "--token", token, "--url", f"{dead},{broker.url}").exit_code == 0


@pytest.mark.parametrize(
    "command",
    [["sub", "x"], ["pub", "x", "1"], ["tail", "x"], ["presence", "x"], ["stats"]],
)
def test_error_exit_codes(run: Run, command: list[str]) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    cases = [
        ([], {}, 4, "no token"),
        (["--url", dead, "--token", token_for()], {}, 3, "cannot connect"),
        (["--token", "garbage"], {}, 4, "malformed token"),
        (["--token", token_for(ttl=-60)], {}, 4, "token expired"),
        (
            ["--token", mint_token("another-secret-another-secret-xx", "a")],
            {},
            4,
            "invalid signature",
        ),
        (["--url", "http://nope", "--token", token_for()], {}, 2, "--url"),
    ]
    for extra, env, code, text in cases:
        result = run(*command, *extra, env=env)
        assert result.exit_code == code, (command, extra, result.output)
        assert text in result.stderr, (command, extra, result.stderr)
        if code != 2:
            assert len(result.stderr.strip().splitlines()) == 1


def test_help_documents_exit_codes(run: Run) -> None:
    for command in ("token", "sub", "pub", "tail", "presence", "stats"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Exit codes:" in result.stdout and "130 interrupted" in result.stdout
        assert "3   broker unreachable" in result.stdout


@pytest.mark.slow
def test_expired_token_mid_session_exits_4(broker: Broker, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    env.update(BROKER_URL=broker.url, BROKER_TOKEN=token_for(ttl=1))
    proc = subprocess.run(  # noqa: PLW1510 - the code is asserted
        [sys.executable, "-m", "broker.cli", "sub", "x"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 4
    assert proc.stderr.strip() == "Error: unauthorized: token expired"


@pytest.mark.slow
def test_ctrl_c_exits_130_quietly(broker: Broker, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    env.update(BROKER_URL=broker.url, BROKER_TOKEN=token_for())
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "sub", "x", "-v"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "subscribed to x" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert out == "" and err == ""


@pytest.mark.slow
def test_sub_survives_broker_restart(broker: Broker, tmp_path: Path, run: Run) -> None:
    env = isolated_env(tmp_path)
    env.update(BROKER_URL=broker.url, BROKER_TOKEN=token_for("bob"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "sub", "r", "--count", "2", "-v"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "subscribed to r" in proc.stderr.readline()
        assert run("pub", "r", "before", "--token", token_for()).exit_code == 0
        broker.restart()
        assert run("pub", "r", "after", "--token", token_for()).exit_code == 0
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["before", "after"]
    assert "connection lost; reconnecting" in err and "reconnected" in err


def test_ca_file_for_wss(make_broker: Any, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    broker = make_broker("--tls-cert", str(cert), "--tls-key", str(key))
    url = f"wss://127.0.0.1:{broker.port}/ws"
    run = make_runner(url, tmp_path / "config")
    token = token_for()
    result = run("pub", "tls", "x", "--token", token)
    assert result.exit_code == 3 and "certificate verify failed" in result.stderr
    assert run("pub", "tls", "x", "--token", token, "--ca-file", str(cert)).exit_code == 0
    result = run(
        "sub",
        "tls",
        "--last",
        "1",
        "--count",
        "1",
        "--token",
        token,
        env={"BROKER_CA_FILE": str(cert)},
    )
    assert result.exit_code == 0 and result.stdout == "x\n"
    result = run("pub", "tls", "x", "--token", token, "--ca-file", str(tmp_path / "missing.pem"))
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis-wait", "1"], "redis_wait (flag --redis-wait) needs redis"),
        (["--memory", "--data", "d"], "memory (flag --memory) and data (flag --data) exclude"),
        (["--tls-cert", __file__], "tls_cert (flag --tls-cert) needs tls_key"),
    ],
)
def test_serve_refuses_option_combinations(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve", *args])
    assert result.exit_code == 2 and message in result.output
