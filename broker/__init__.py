"""broker: a real-time pub/sub topic broker over WebSocket, with JWT auth and history."""

__version__ = "0.1.0"
