"""The README names every setting, installs only from the lock and links only to files that exist.

Its "First steps" and tour are run against a real server in tests/integration/test_readme_tour.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from posguard_server.config import Settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# [text](target) with a target inside the repository: no scheme, not only an anchor.
RELATIVE_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:)([^)#\s]+)(?:#[^)]*)?\)")


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"`POSGUARD_{name.upper()}`" in text, name
        assert f"`--{name.replace('_', '-')}" in text, name


def test_the_readme_installs_only_through_the_lock() -> None:
    # pip would resolve the dependencies afresh and miss the versions uv.lock pins.
    assert "pip install" not in README.read_text()


def test_every_relative_link_of_the_readme_exists() -> None:
    targets = RELATIVE_LINK.findall(README.read_text())
    assert "docs/cli.md" in targets
    missing = [target for target in targets if not (REPO / target).exists()]
    assert not missing
