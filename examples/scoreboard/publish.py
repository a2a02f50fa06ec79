"""Feed the scoreboard: publish match scores through the broker's HTTP API.

Each update is one ``POST /api/publish`` to ``scores/<match>`` with an idempotency key, so
a retry after a network error is recorded once. Standard library only: this is what any
backend (a cron job, a webhook from the data provider) would do.

    broker serve --config examples/scoreboard/broker.toml
    python examples/scoreboard/publish.py --token "$(broker token --id scores --pub 'scores/#')"
    python examples/scoreboard/publish.py --count 20 --interval 0.5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request
import uuid

MATCHES = ["arsenal-chelsea", "liverpool-everton", "leeds-spurs"]


def publish(url: str, token: str, topic: str, data: object, key: str) -> int:
    """Publish once (retrying a network error with the same key); the message's seq."""
    body = json.dumps({"topic": topic, "data": data, "key": key}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(json.load(response)["seq"])
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise SystemExit(
                    f"refused: {exc.code} {exc.read().decode(errors='replace')}"
                ) from None
        except OSError:
            pass  # the broker restarting: the same key again is recorded once
        time.sleep(0.2 * 2**attempt)
    raise SystemExit(f"cannot publish to {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the broker's HTTP URL")
    parser.add_argument("--token", required=True, help="a JWT allowed to publish to scores/#")
    parser.add_argument("--count", type=int, default=10, help="updates to publish")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.add_argument("--seed", type=int, default=None, help="repeatable scores")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scores = {match: {"home": 0, "away": 0} for match in MATCHES}
    for i in range(args.count):
        match = rng.choice(MATCHES)
        scores[match][rng.choice(["home", "away"])] += 1
        seq = publish(args.url, args.token, f"scores/{match}", scores[match], str(uuid.uuid4()))
        print(f"{seq} scores/{match} {scores[match]['home']}-{scores[match]['away']}", flush=True)
        if i + 1 < args.count:
            time.sleep(args.interval)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
