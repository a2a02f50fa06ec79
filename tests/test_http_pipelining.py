"""Pipelined plain HTTP requests: answered in a loop (any number, in order), and a client
that does not read its answers holds a bounded amount of the broker's memory."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from .support import BrokerProcess, wait_for


def _rss(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_hundreds_of_pipelined_requests_are_all_answered(broker: BrokerProcess) -> None:
    count = 1000
    wire = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * count
    received = bytearray()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(wire)
        deadline = time.monotonic() + 20
        while received.count(b"HTTP/1.1 200") < count and time.monotonic() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            received += chunk
    assert received.count(b"HTTP/1.1 200") == count
    log = broker.log()
    assert "RecursionError" not in log
    assert "Traceback" not in log


@pytest.mark.process
def test_unread_pipelined_answers_are_bounded(broker: BrokerProcess) -> None:
    assert broker.proc is not None
    pid = broker.proc.pid
    before = _rss(pid)
    # 8 connections x 300 requests for broker.js (42 KB each): 100 MB of answers if every
    # request were answered into a buffer the client never reads.
    wire = b"GET /broker.js HTTP/1.1\r\nHost: x\r\n\r\n" * 300
    socks = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", broker.port))
            s.sendall(wire)
            socks.append(s)
        # Let the broker do whatever it will with them.
        time.sleep(1.5)
        grown = _rss(pid) - before
        assert grown < 40 * 1024 * 1024, f"RSS grew {grown >> 20} MiB"
        # The connections still work: one that reads gets answers past the bound (its
        # 4 KiB receive buffer makes reading slow: 60 answers, 2.5 MB, are enough).
        s = socks[0]
        received = bytearray()
        deadline = time.monotonic() + 60
        while received.count(b"HTTP/1.1 200") < 60 and time.monotonic() < deadline:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            received += chunk
        assert received.count(b"HTTP/1.1 200") >= 60
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: broker.proc is not None and broker.proc.poll() is None, 1)
