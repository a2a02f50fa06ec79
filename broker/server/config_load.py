"""Reading the settings of ``broker serve``: flags, then the environment, then the file,
then the defaults.

The file is ``--config FILE``, else ``broker.toml`` in the user's config directory when it
exists; it is read whole, at most ``MAX_CONFIG_FILE`` bytes. Every error is a
``ConfigError`` of one line naming the setting and where its value came from.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.hooks import check as check_hooks
from broker.core.namespaces import check_retention
from broker.core.units import format_size, shown
from broker.errors import ConfigError
from broker.local import default_config_file
from broker.server.config import (
    SECTIONS,
    SETTINGS,
    SETTINGS_BY_NAME,
    ServerConfig,
    Setting,
)

#: Largest settings file read: a real one is a few KiB; this bounds a wrong path
#: (``/dev/zero``, a log file) to a quick refusal.
MAX_CONFIG_FILE = 1 << 20


#: URL schemes ``redis`` accepts (the last two: Sentinel).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")


@dataclass
class Effective:
    """The settings in force and where each came from (``flag --port``, ``env BROKER_PORT``,
    ``file /etc/broker/broker.toml``, ``default``)."""

    config: ServerConfig
    sources: dict[str, str]
    #: The TOML file read, if any.
    file: Path | None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings and sections in a TOML file, parsed (by TOML name); ``ConfigError``
    naming the file and the key."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise ConfigError(
            f"{path}: larger than {format_size(MAX_CONFIG_FILE)}; not a settings file"
        )
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        row = SETTINGS_BY_NAME.get(key)
        section = SECTIONS.get(key)
        if row is not None:
            values[key] = _parse(row, value, f"file {path}")
        elif section is not None:
            try:
                values[key] = section.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: bad [{key}]: {exc}") from None
        elif _is_table(value):
            raise ConfigError(f"{path}: {_unknown_table(key, value)}")
        else:
            close = difflib.get_close_matches(key, SETTINGS_BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown setting {shown(key)}{hint}")
    return values


def _is_table(value: object) -> bool:
    """A TOML ``[table]`` or ``[[array of tables]]`` (inline ones too)."""
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def _unknown_table(key: str, value: object) -> str:
    tables: list[Any] = value if isinstance(value, list) else [value]
    settings = sorted({k for t in tables for k in t if k in SETTINGS_BY_NAME})
    known = f" (the tables are {', '.join(f'[{s}]' for s in SECTIONS)})" if SECTIONS else ""
    where = f"unknown table [{shown(key)[1:-1]}]{known}: settings go at the top level of the file"
    if settings:
        return f"{where}, above any [table] line: move {', '.join(settings)} there"
    return f"{where}, above any [table] line"


def _parse(row: Setting, raw: object, source: str) -> Any:
    try:
        return row.kind.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"bad value for {row.name} from {source}: {exc}") from None


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Effective:
    """Combine the sources into a ``ServerConfig``.

    ``flags`` maps setting names to values given on the command line (already parsed);
    ``environ`` is the environment (``BROKER_*`` variables are read, an empty one counts as
    unset); ``config_file`` is the ``--config`` file, else the default file is read when it
    exists. Raises ``ConfigError`` for an unknown key, a bad value, or settings that
    exclude each other.
    """
    path = config_file
    if path is None and default_config_file().is_file():
        path = default_config_file()
    from_file = read_config_file(path) if path is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for row in SETTINGS:
        text = environ.get(row.env, "")
        if row.name in flags:
            values[row.field], sources[row.name] = flags[row.name], f"flag {row.flag}"
        elif text.strip():
            values[row.field], sources[row.name] = (
                _parse(row, text, f"env {row.env}"),
                f"env {row.env}",
            )
        elif row.name in from_file:
            values[row.field], sources[row.name] = from_file[row.name], f"file {path}"
        else:
            sources[row.name] = "default"
    for section in SECTIONS.values():
        if section.name in from_file:
            values[section.field] = from_file[section.name]
            sources[section.name] = f"file {path}"
        else:
            sources[section.name] = "default"
    config = ServerConfig(**values)
    _check(config, sources)
    return Effective(config, sources, path)


def _check(config: ServerConfig, sources: Mapping[str, str]) -> None:
    """Settings that exclude or need each other; the message names where each came from."""

    def given(name: str) -> str:
        return f"{name} ({sources[name]})"

    if config.tls_cert and not config.tls_key:
        raise ConfigError(f"{given('tls_cert')} needs tls_key")
    if config.tls_key and not config.tls_cert:
        raise ConfigError(f"{given('tls_key')} needs tls_cert")
    if config.memory and config.data:
        raise ConfigError(f"{given('memory')} and {given('data')} exclude each other")
    if config.redis and not config.redis.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{given('redis')} is not a Redis URL (redis://, rediss://, unix:// or "
            "redis+sentinel://host:26379/service/db)"
        )
    if config.redis_wait and not config.redis:
        raise ConfigError(f"{given('redis_wait')} needs redis")
    if config.redis and (config.memory or config.data):
        other = "memory" if config.memory else "data"
        raise ConfigError(f"{given('redis')} keeps history in Redis: {given(other)} doesn't apply")
    if not config.algorithm.startswith("HS") and not config.public_key:
        raise ConfigError(f"{given('algorithm')} {config.algorithm} needs public_key")
    try:
        check_retention(config.namespaces, config.retention)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({sources['retention']})") from None
    selected = {
        name: [s.pattern for s in config.namespaces if getattr(s, f"{name}_hook")]
        for name in ("subscribe", "publish")
    }
    wrong = check_hooks(config.hooks, selected)
    if wrong is not None:
        raise ConfigError(f"{given('namespace')}: {wrong}")


def describe(effective: Effective) -> list[tuple[str, str, str]]:
    """``(name, value as TOML or "", source)`` per setting, secrets redacted; the data
    directory as the one the store will use."""
    config = effective.config
    rows = []
    for row in SETTINGS:
        value, source = row.show(getattr(config, row.field)), effective.sources[row.name]
        if row.field == "data" and not value:
            folder = config.data_folder()
            if folder is not None:
                value, source = row.show(folder), "default: the user's data directory"
        rows.append((row.name, value, source))
    return rows
