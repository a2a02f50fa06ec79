"""The Python client library: ``Client`` and what it hands you.

``from broker.client import Client`` is the public entry point. Under it: ``state``, the
sans-I/O part (subscriptions, resume points, de-duplication by seq), ``client``, the asyncio
shell around it (connect, authenticate, reconnect, refresh), and ``bench``, the load
generator behind ``broker bench``.
"""

from broker.client.client import (
    Client,
    Gap,
    Message,
    PresenceEvent,
    PresenceUser,
    Subscription,
    TokenProvider,
    User,
    token_expiry,
)

__all__ = [
    "Client",
    "Gap",
    "Message",
    "PresenceEvent",
    "PresenceUser",
    "Subscription",
    "TokenProvider",
    "User",
    "token_expiry",
]
