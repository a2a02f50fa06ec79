"""The Lua scripts (``lua/*.lua``, shipped with the package), read once each."""

from __future__ import annotations

from functools import cache
from importlib import resources

#: Scripts that run with ``presence_lib.lua`` in front of them.
_NEEDS_PRESENCE_LIB = frozenset({"set_presence", "sweep"})


@cache
def script(name: str) -> str:
    """The source of ``lua/<name>.lua``, with the presence library prepended where needed."""
    lua = resources.files("broker.store.redis").joinpath("lua")
    text = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _NEEDS_PRESENCE_LIB:
        text = lua.joinpath("presence_lib.lua").read_text(encoding="utf-8") + text
    return text
