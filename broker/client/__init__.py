"""The Python client library: ``Client`` and what it hands you.

``from broker.client import Client`` is the public entry point; the modules under it are
the asyncio shell (``client``) and the load generator behind ``broker bench`` (``bench``).
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
