"""The README's settings table is what the Settings definitions produce now, and its check can fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from posguard_server.config import Settings

if TYPE_CHECKING:
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_config_table.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_table", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def test_one_row_per_setting_with_variable_flag_default_and_description(script: ModuleType) -> None:
    rows = script.render().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for row, (name, info) in zip(rows, Settings.model_fields.items(), strict=True):
        assert row.startswith(f"| `POSGUARD_{name.upper()}` | `--{name.replace('_', '-')}"), row
        assert row.endswith(f"| {info.description} |"), row
    table = "\n".join(rows)
    assert "| `POSGUARD_METRICS_ENABLED` | `--metrics-enabled/--no-metrics-enabled` | on |" in table
    assert "| `POSGUARD_GRACE_PERIOD` | `--grace-period` | `10` |" in table
    assert "| `POSGUARD_DATABASE_URL` | `--database-url` | unset |" in table


def test_check_fails_on_a_stale_table_and_passes_once_regenerated(script: ModuleType, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    stale = f"# title\n\n{script.START}\n| variable | flag |\n{script.END}\n\nafter\n"
    readme.write_text(stale, encoding="utf-8")
    assert script.main(["--check", "--readme", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == stale  # --check writes nothing

    assert script.main(["--readme", str(readme)]) == 0
    regenerated = readme.read_text(encoding="utf-8")
    assert regenerated == f"# title\n\n{script.START}\n{script.render()}{script.END}\n\nafter\n"
    assert script.main(["--check", "--readme", str(readme)]) == 0


def test_a_readme_without_markers_is_an_error(script: ModuleType, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n", encoding="utf-8")
    assert script.main(["--check", "--readme", str(readme)]) == 2
