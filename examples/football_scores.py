"""Football scores: one publisher, several listeners, and a late one catching up.

The publisher may only publish under ``scores/`` (its token's ACL). Two listeners follow
every match with the pattern ``scores/#``, one follows a single match, and a late listener
joins after the final whistle and gets the last results from history with ``last``.

    python examples/football_scores.py --url ws://127.0.0.1:8765/ws [--secret S]
"""

from __future__ import annotations

import argparse
import asyncio
import os

from broker.client import Client
from broker.core.auth import mint_token
from broker.local import DEFAULT_URL, read_local_secret

GOALS = [
    ("scores/football/ars-che", {"home": 1, "away": 0, "minute": 12}),
    ("scores/football/liv-mun", {"home": 0, "away": 1, "minute": 30}),
    ("scores/football/ars-che", {"home": 2, "away": 0, "minute": 58}),
    ("scores/football/liv-mun", {"home": 1, "away": 1, "minute": 77}),
]


async def listen(client: Client, name: str, count: int) -> None:
    """Print ``count`` score updates as they arrive."""
    for _ in range(count):
        msg = await client.next_message(timeout=5)
        match = msg.topic.rsplit("/", 1)[-1]
        print(f"{name}: {match} {msg.data['home']}-{msg.data['away']} ({msg.data['minute']}')")


async def main(url: str, secret: str) -> None:
    feed_token = mint_token(secret, "scores-feed", "Score feed", ttl=300, pub=["scores/#"])
    fan_tokens = {
        name: mint_token(secret, name, ttl=300, sub=["scores/#"])
        for name in ("fan1", "fan2", "gooner", "late")
    }
    async with (
        Client(url, feed_token) as feed,
        Client(url, fan_tokens["fan1"]) as fan1,
        Client(url, fan_tokens["fan2"]) as fan2,
        Client(url, fan_tokens["gooner"]) as gooner,
    ):
        # Listeners subscribe first: live delivery starts at the subscription.
        await fan1.subscribe("scores/#")  # every match, every level below scores/
        await fan2.subscribe("scores/football/+")  # every football match
        await gooner.subscribe("scores/football/ars-che")  # one match only

        listeners = asyncio.gather(
            listen(fan1, "fan1", len(GOALS)),
            listen(fan2, "fan2", len(GOALS)),
            listen(gooner, "gooner", 2),
        )
        for topic, score in GOALS:
            seq = await feed.publish(topic, score)  # returns once recorded in history
            print(f"feed: published {topic} as seq {seq}")
        await listeners

    # After the match: a new listener asks for the last 2 updates kept in history.
    async with Client(url, fan_tokens["late"]) as late:
        await late.subscribe("scores/football/#", last=2)
        await listen(late, "late", 2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BROKER_URL", DEFAULT_URL))
    parser.add_argument("--secret", default=os.environ.get("BROKER_SECRET") or read_local_secret())
    args = parser.parse_args()
    if not args.secret:
        parser.error("no secret: pass --secret, set BROKER_SECRET, or run `broker serve` here once")
    asyncio.run(main(args.url, args.secret))
