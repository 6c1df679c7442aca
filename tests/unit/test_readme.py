"""The README's configuration table names every setting."""

from __future__ import annotations

from pathlib import Path

from posguard_server.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"`POSGUARD_{name.upper()}`" in text, name
        assert f"`--{name.replace('_', '-')}" in text, name
