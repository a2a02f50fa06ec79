"""Namespaces: per-pattern options from the ``[[namespace]]`` tables of the TOML file.

No I/O. A namespace is a pattern (section 4 of docs/protocol.md) and the options of the
topics it covers: ``public`` (anonymous clients may read them, section 10), ``history``
and ``retention`` (instead of the global ones) and ``presence`` (off: no presence and no
join/leave on its topics). The first namespace, in the order of the file, whose pattern
matches a topic is that topic's namespace; a topic no namespace matches takes the
defaults. ``parse_namespaces`` reads and checks the tables (``ValueError``, one line);
``Namespaces`` answers what applies to a topic, remembering its answers.

Each option is one row of ``OPTIONS``: the hooks (``subscribe_hook``, ``publish_hook``)
come as two more rows and two more fields of ``Namespace``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from broker.core.topics import any_covers, matches, validate_pattern
from broker.core.units import format_duration, parse_duration
from broker.errors import BrokerError

#: Topics whose namespace is remembered at once (``Namespaces.find``); past it, forgotten.
_CACHE = 65536


@dataclass(frozen=True)
class Namespace:
    """The options of the topics ``pattern`` covers; ``None``: the global setting."""

    pattern: str
    public: bool = False
    history: int | None = None
    retention: float | None = None
    presence: bool = True
    #: Subscriptions to its topics ask the backend's ``subscribe`` hook (broker.core.hooks).
    subscribe_hook: bool = False
    #: Publishes to its topics ask the backend's ``publish`` hook.
    publish_hook: bool = False


#: The namespace of topics no ``[[namespace]]`` covers.
DEFAULT = Namespace(pattern="#")


def _boolean(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise ValueError("must be true or false")
    return raw


def _history(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError("must be a whole number, 0 or more")
    return raw


def _retention(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError("must be a duration such as 30s, 15m, 1h, 7d")
    value = parse_duration(raw)  # the words of --retention
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _pattern(raw: object) -> str:
    try:
        return validate_pattern(raw)
    except BrokerError as exc:
        raise ValueError(f"is not a valid pattern: {exc.message}") from None


#: key -> how its TOML value is read (``ValueError`` saying why not). ``pattern`` is required.
OPTIONS: dict[str, Callable[[object], Any]] = {
    "pattern": _pattern,
    "public": _boolean,
    "history": _history,
    "retention": _retention,
    "presence": _boolean,
    "subscribe_hook": _boolean,
    "publish_hook": _boolean,
}


def can_match_inbox(pattern: str) -> bool:
    """Whether ``pattern`` can match a topic of some user's inbox (``user/<id>``...)."""
    levels = pattern.split("/")
    if levels[0] == "#":
        return True
    if len(levels) < 2 or levels[0] not in ("user", "+"):
        return False
    return levels[1] != ""  # ``user//x`` is nobody's inbox: ids are never empty


def can_match_reserved(pattern: str) -> bool:
    """Whether ``pattern`` can match a ``$`` topic (a wildcard first level never does)."""
    return pattern.startswith("$")


def overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns ``a`` and ``b``."""
    alevels, blevels = a.split("/"), b.split("/")
    for first, second in ((alevels, blevels), (blevels, alevels)):
        if first[0] in ("+", "#") and second[0].startswith("$"):
            return False
    for i in range(max(len(alevels), len(blevels))):
        x = alevels[i] if i < len(alevels) else None
        y = blevels[i] if i < len(blevels) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True


def parse_namespaces(raw: object, retention: float | None = None) -> tuple[Namespace, ...]:
    """The ``[[namespace]]`` tables of a TOML file, checked (``ValueError``, one line).

    Refused, each with one line: a value that is not a list of tables, an unknown key, a
    missing or bad pattern, a bad value, two namespaces with the same pattern, a public
    pattern that can match an inbox or a ``$`` topic, a public namespace that an earlier,
    not public one would partly shadow (anonymous clients would receive topics that are
    not public), and a retention longer than the global ``retention`` (when given)."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ValueError("'namespace' must be tables written [[namespace]]")
    found: list[Namespace] = []
    for number, table in enumerate(raw, 1):
        label = f"[[namespace]] #{number}"
        values: dict[str, Any] = {}
        for key, value in table.items():
            reader = OPTIONS.get(key)
            if reader is None:
                known = ", ".join(OPTIONS)
                raise ValueError(f"{label}: unknown key {key!r} (known: {known})")
            try:
                values[key] = reader(value)
            except ValueError as exc:
                raise ValueError(f"{label}: {key} {exc}") from None
        if "pattern" not in values:
            raise ValueError(f"{label}: 'pattern' is required")
        space = Namespace(**values)
        label = f"namespace {space.pattern!r}"
        if any(other.pattern == space.pattern for other in found):
            raise ValueError(f"{label} is given twice")
        if space.public and can_match_inbox(space.pattern):
            raise ValueError(f"{label} cannot be public: it can match users' inboxes (user/...)")
        if space.public and can_match_reserved(space.pattern):
            raise ValueError(f"{label} cannot be public: it matches topics reserved ($...)")
        if space.public:
            for other in found:
                if not other.public and overlap(other.pattern, space.pattern):
                    raise ValueError(
                        f"{label} is public, but the earlier namespace {other.pattern!r}, "
                        "not public, covers some of its topics first: make that one public "
                        "or put it after"
                    )
        found.append(space)
    if retention is not None:
        check_retention(found, retention)
    return tuple(found)


def check_retention(spaces: Iterable[Namespace], retention: float) -> None:
    """``ValueError`` for a namespace whose retention is longer than the global one (the
    global pass removes what is older than it, whatever the namespace)."""
    for space in spaces:
        if space.retention is not None and space.retention > retention:
            raise ValueError(
                f"namespace {space.pattern!r}: retention {format_duration(space.retention)} "
                f"is longer than the global retention {format_duration(retention)}; raise that"
            )


def render(spaces: Iterable[Namespace]) -> list[str]:
    """The namespaces as ``[[namespace]]`` TOML tables, options left at their default out."""
    lines: list[str] = []
    for space in spaces:
        lines.append("[[namespace]]")
        for f in fields(Namespace):
            value = getattr(space, f.name)
            if f.name != "pattern" and value == f.default:
                continue
            if isinstance(value, bool):
                shown = "true" if value else "false"
            elif f.name == "retention":
                shown = json.dumps(format_duration(float(value)))
            elif isinstance(value, str):
                shown = json.dumps(value)
            else:
                shown = str(value)
            lines.append(f"{f.name} = {shown}")
    return lines


class Namespaces:
    """What applies to each topic: the first namespace that matches it, else ``DEFAULT``."""

    def __init__(self, spaces: Sequence[Namespace] = ()) -> None:
        self.spaces = tuple(spaces)
        #: The public patterns (section 10), in the order of the file.
        self.public = tuple(s.pattern for s in self.spaces if s.public)
        self._found: dict[str, Namespace] = {}

    def __bool__(self) -> bool:
        return bool(self.spaces)

    def find(self, topic: str) -> Namespace:
        """The namespace of ``topic``."""
        found = self._found.get(topic)
        if found is None:
            found = next((s for s in self.spaces if matches(s.pattern, topic)), DEFAULT)
            if len(self._found) >= _CACHE:
                self._found.clear()
            self._found[topic] = found
        return found

    def is_public(self, pattern: str) -> bool:
        """Whether one public pattern covers ``pattern`` (the rule of the ``acl`` claim)."""
        return any_covers(self.public, pattern)

    def presence(self, topic: str) -> bool:
        """Whether presence (and join/leave) is on for ``topic``."""
        return not self.spaces or self.find(topic).presence

    def history(self, topic: str, default: int) -> int:
        """Messages kept for ``topic``."""
        if not self.spaces:
            return default
        value = self.find(topic).history
        return default if value is None else value

    def retention(self, topic: str, default: float) -> float:
        """Maximum age (seconds) of ``topic``'s messages."""
        if not self.spaces:
            return default
        value = self.find(topic).retention
        return default if value is None else value

    def publish_hook(self, topic: str) -> bool:
        """Whether a publish to ``topic`` asks the backend's ``publish`` hook."""
        return bool(self.spaces) and self.find(topic).publish_hook

    def subscribe_hook(self, pattern: str) -> bool:
        """Whether a subscription to ``pattern`` asks the backend's ``subscribe`` hook: it
        can match a topic of a namespace that sets ``subscribe_hook``."""
        return any(s.subscribe_hook and overlap(s.pattern, pattern) for s in self.spaces)

    def selecting(self, hook: str) -> list[str]:
        """The patterns of the namespaces that set ``<hook>_hook``."""
        return [s.pattern for s in self.spaces if getattr(s, f"{hook}_hook", False)]

    @property
    def retentions(self) -> list[Namespace]:
        """The namespaces that set their own retention."""
        return [s for s in self.spaces if s.retention is not None]
