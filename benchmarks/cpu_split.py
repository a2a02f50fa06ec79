"""User and kernel CPU of a running server over a window, for a rate it is known to serve.

The shared harness gives a server's whole CPU per delivery; this splits it. Run it while
the harness runs a fixed-rate scenario (its `chat` publishes 1,000 messages a second), for
the broker or a peer, and it prints the user and system time the process (all threads, and
its children) took per event over the window:

    python benchmarks/cpu_split.py --match 'broker serve' --rate 1000 --delay 3 --seconds 4

Reads /proc/<pid>/stat (utime and stime, in clock ticks), so it needs Linux; the window
should hold a few hundred ticks for the split to mean much.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def find(match: str) -> int:
    """The pid of the busiest process (most CPU so far) whose command line contains
    ``match``: the server rather than a shell that started it."""
    found: list[tuple[int, int]] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if match in cmdline and "cpu_split" not in cmdline:
                found.append((sum(times(int(entry.name))), int(entry.name)))
        except (OSError, IndexError, ValueError):
            continue
    if not found:
        raise SystemExit(f"no process matches {match!r}")
    return max(found)[1]


def times(pid: int) -> tuple[int, int]:
    """utime and stime of ``pid`` with its waited-for children, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the name: state is field 3; utime 14, stime 15, cutime 16, cstime 17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return utime + cutime, stime + cstime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match", required=True, help="text of the server's command line")
    parser.add_argument("--rate", type=float, required=True, help="events per second served")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the window")
    args = parser.parse_args()
    time.sleep(args.delay)
    pid = find(args.match)
    u0, s0 = times(pid)
    t0 = time.monotonic()
    time.sleep(args.seconds)
    u1, s1 = times(pid)
    events = args.rate * (time.monotonic() - t0)
    user = (u1 - u0) / TICK / events * 1e6
    system = (s1 - s0) / TICK / events * 1e6
    print(f"pid {pid}: user {user:.1f} us, system {system:.1f} us per event ({events:.0f} events)")


if __name__ == "__main__":
    main()
