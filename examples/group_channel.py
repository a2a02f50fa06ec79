"""A group channel: everyone in ``chat/lobby`` sees everyone else's messages.

Three users join the channel with ``presence=True`` (so they hear who joins and leaves),
each says hello, and each prints what the others said. A message is not sent back to the
connection that published it (unless published with ``echo=True``).

    python examples/group_channel.py --url ws://127.0.0.1:8765/ws [--secret S]
"""

from __future__ import annotations

import argparse
import asyncio
import os

from broker.client import Client, Message
from broker.core.auth import mint_token
from broker.local import DEFAULT_URL, read_local_secret

CHANNEL = "chat/lobby"
USERS = ["ann", "ben", "cat"]


async def member(name: str, client: Client, everyone_in: asyncio.Barrier) -> list[str]:
    """Join, wait for the others, say hello, then collect the others' hellos."""
    await client.subscribe(CHANNEL, presence=True)
    await everyone_in.wait()  # start talking once all three are subscribed
    await client.publish(CHANNEL, f"hello from {name}")
    heard = []
    async for event in client.events():  # messages plus presence join/leave events
        if isinstance(event, Message):
            heard.append(f"{name} heard {event.sender.id}: {event.data}")
            if len(heard) == len(USERS) - 1:
                return heard


async def main(url: str, secret: str) -> None:
    # A token per member; this ACL lets them use chat/* topics only (inboxes always work).
    clients = [
        Client(
            url,
            mint_token(secret, name, name.title(), ttl=300, pub=["chat/+"], sub=["chat/+"]),
        )
        for name in USERS
    ]
    for client in clients:
        await client.connect()
    try:
        barrier = asyncio.Barrier(len(USERS))
        results = await asyncio.wait_for(
            asyncio.gather(*(member(n, c, barrier) for n, c in zip(USERS, clients))), 10
        )
        for lines in results:
            print("\n".join(sorted(lines)))
        # Who is in the channel right now, according to the broker:
        users = await clients[0].presence(CHANNEL)
        print("in the channel:", ", ".join(sorted(u.name for u in users)))
    finally:
        for client in clients:
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BROKER_URL", DEFAULT_URL))
    parser.add_argument("--secret", default=os.environ.get("BROKER_SECRET") or read_local_secret())
    args = parser.parse_args()
    if not args.secret:
        parser.error("no secret: pass --secret, set BROKER_SECRET, or run `broker serve` here once")
    asyncio.run(main(args.url, args.secret))
