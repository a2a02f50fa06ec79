"""The settings table written for people: the starter file of ``broker config init`` and
the table of docs/operations.md (tests/test_config.py checks that the docs show it)."""

from __future__ import annotations

import textwrap

from broker.server.config import SETTINGS


def starter_file() -> str:
    """A TOML file with every setting commented out, its help, bounds and default."""
    lines = [
        "# broker serve settings. Uncomment and change what you need; every setting goes",
        "# at the top level of the file (no [table] around them).",
        "# Precedence: command-line flags, then environment variables (BROKER_ + the key in",
        "# upper case, e.g. BROKER_MAX_QUEUE), then this file, then the defaults shown here.",
        "# Durations: 30s, 15m, 1h, 7d. Sizes: bytes, or 64KiB, 1MiB.",
        "# Check the result with: broker serve --config THIS_FILE --print-config",
        "",
    ]
    for row in SETTINGS:
        bounds = row.kind.bounds()
        text = f"{row.help} [{row.flag}, {row.env}{'; ' + bounds if bounds else ''}]"
        lines += textwrap.wrap(text, 88, initial_indent="# ", subsequent_indent="# ")
        if row.default is None or row.default == []:
            example = row.kind.show(row.example) if row.example is not None else '""'
            lines.append(f"# {row.name} = {example}  # not set by default")
        else:
            lines.append(f"# {row.name} = {row.show(row.default)}")
        lines.append("")
    lines += [
        "# Per-pattern options: [[namespace]] tables, after every setting (no flag or",
        "# environment form). The first namespace whose pattern matches a topic applies to it.",
        "#   [[namespace]]",
        '#   pattern = "scores/#"',
        "#   public = true      # anonymous clients may read it (no token)",
        "#   history = 1        # messages kept per topic, instead of history",
        '#   retention = "7d"   # their maximum age (at most retention)',
        "#   presence = false   # no presence, no join/leave",
        "#   publish_hook = true    # publishes ask the application first ([hooks] publish)",
        "#   subscribe_hook = true  # so do subscriptions ([hooks] subscribe)",
        "",
        "# Hooks to the application's backend (docs/hooks.md): its own login, rules and",
        "# records. Each URL is optional; a secret is required with any.",
        "#   [hooks]",
        '#   connect = "http://127.0.0.1:8000/broker/connect"',
        '#   publish = "http://127.0.0.1:8000/broker/publish"',
        '#   events = "http://127.0.0.1:8000/broker/events"',
        '#   secret = "a long random string"',
        '#   timeout = "2s"',
        "",
    ]
    return "\n".join(lines)


def settings_markdown() -> str:
    """The settings table of docs/operations.md: key, environment variable, default,
    accepted values, meaning."""
    lines = [
        "| key (`--flag`) | environment | default | accepted | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in SETTINGS:
        shown = row.show(row.default).strip('"')
        default = f"`{shown}`" if shown not in ("", "[]") else "not set"
        bounds = row.kind.bounds() or ""
        lines.append(
            f"| `{row.name}` (`{row.flag}`) | `{row.env}` | {default} | {bounds} | {row.help} |"
        )
    return "\n".join(lines)
