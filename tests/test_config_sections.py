"""Structured settings: a ``[table]`` of the file read into one ``ServerConfig`` field.

No section exists yet (the public namespaces and the hooks will be the first); these tests
register one over an existing field to hold the loader to its part: the table is parsed by
the section's own function, a bad one is refused in one line naming it, and a table that
is no section still says that settings go at the top level, listing the tables there are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.server.config import SECTIONS, Section
from broker.server.config_load import load_settings


def origins(raw: object) -> list[str]:
    """``[origins] allow = [...]`` as the ``allowed_origins`` field."""
    if not isinstance(raw, dict) or set(raw) != {"allow"}:
        raise ValueError("takes exactly one key, allow")
    return [str(item) for item in raw["allow"]]


@pytest.fixture
def section(monkeypatch: pytest.MonkeyPatch) -> Section:
    row = Section("allowed_origins", "origins", origins, "Allowed origins, as a table.")
    monkeypatch.setitem(SECTIONS, "origins", row)
    return row


def test_a_section_is_read_from_its_table(tmp_path: Path, section: Section) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('port = 9000\n[origins]\nallow = ["https://a.example"]\n')
    effective = load_settings({}, {}, path)
    assert effective.config.allowed_origins == ["https://a.example"]
    assert effective.sources["origins"] == f"file {path}"
    assert effective.config.port == 9000


def test_a_bad_section_is_one_line_naming_it(tmp_path: Path, section: Section) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[origins]\ndeny = ["x"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, path)
    assert info.value.message == f"{path}: bad [origins]: takes exactly one key, allow"


def test_an_unknown_table_lists_the_sections(tmp_path: Path, section: Section) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("[server]\nport = 9000\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, path)
    assert (
        "unknown table [server] (the tables are [namespace], [hooks], [origins])"
        in info.value.message
    )
    assert "settings go at the top level" in info.value.message
