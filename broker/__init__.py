"""broker: a real-time pub/sub topic broker over WebSocket, with JWT auth and history."""

from __future__ import annotations

import importlib.machinery
import importlib.util

__version__ = "0.1.0"


def build() -> str:
    """Which build runs: "compiled" (the per-message modules are mypyc extensions, as a
    wheel built where a C compiler is present has them) or "pure Python"."""
    spec = importlib.util.find_spec("broker.core.hub")
    origin = spec.origin if spec is not None else None
    compiled = origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled" if compiled else "pure Python"
