"""Two users chatting one-to-one through their inboxes.

Every user may subscribe to their own inbox, ``user/<id>``, and anyone allowed to publish
may write to it; nobody else can read it. Alice and Bob each listen on their inbox and
write to the other's. Both run in this one script to keep it short; in real life each is
its own program holding its own token.

    python examples/chat_one_to_one.py --url ws://127.0.0.1:8765/ws [--secret S]
"""

from __future__ import annotations

import argparse
import asyncio
import os

from broker.client import Client
from broker.core.auth import mint_token
from broker.local import DEFAULT_URL, read_local_secret


async def main(url: str, secret: str) -> None:
    # Tokens are normally minted by your own backend; here we sign them ourselves.
    alice_token = mint_token(secret, "alice", "Alice", ttl=300)
    bob_token = mint_token(secret, "bob", "Bob", ttl=300)

    async with Client(url, alice_token) as alice, Client(url, bob_token) as bob:
        # Each user listens on their own inbox (allowed whatever the token's ACL).
        await alice.subscribe("user/alice")
        await bob.subscribe("user/bob")

        # Alice writes to Bob's inbox; the ack means the broker recorded it.
        await alice.publish("user/bob", "Hi Bob, are you coming to the match?")

        # Bob reads it: msg.sender is set by the broker from Alice's token, not by Alice.
        msg = await bob.next_message(timeout=5)
        print(f"{msg.sender.name} -> bob: {msg.data}")

        # Bob answers in Alice's inbox.
        await bob.publish("user/alice", f"Yes {msg.sender.name}, see you at 3!")
        reply = await alice.next_message(timeout=5)
        print(f"{reply.sender.name} -> alice: {reply.data}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BROKER_URL", DEFAULT_URL))
    parser.add_argument("--secret", default=os.environ.get("BROKER_SECRET") or read_local_secret())
    args = parser.parse_args()
    if not args.secret:
        parser.error("no secret: pass --secret, set BROKER_SECRET, or run `broker serve` here once")
    asyncio.run(main(args.url, args.secret))
