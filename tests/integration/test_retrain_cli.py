"""``posguard-server retrain``, ``report`` and ``models shadow`` as the data team runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.image import imread

if TYPE_CHECKING:
    from .conftest import Cli

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
SMALL = ("--customer-min-history", "30", "--customer-estimators", "10", "--n-estimators", "30")


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_nightly_retrain_report_and_shadow_from_the_command_line(cli: Cli, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    assert cli(*data, "import", "transactions", str(SAMPLE), timeout=120).returncode == 0
    assert cli(*data, "import", "outcomes", str(SAMPLE)).returncode == 0

    first = cli(*data, "retrain", *SMALL, "--jobs", "2", "--report", str(tmp_path / "first"), timeout=180)
    assert first.returncode == 0, first.stderr
    assert re.search(r"customer models trained\s+30\b", first.stdout), first.stdout
    assert re.search(r"global model\s+trained: no global model was active", first.stdout)
    assert re.search(r"customer models per second\s+\d", first.stdout)
    assert re.search(r"promotion\s+promoted$", first.stdout, re.MULTILINE)
    version = re.search(r"version\s+(\S+)", first.stdout).group(1)  # type: ignore[union-attr]
    html = (tmp_path / "first" / "index.html").read_text()
    assert version in html
    assert {p.name for p in _pngs(tmp_path / "first")} >= {"score_distribution.png", "roc.png"}

    both = cli(*data, "retrain", "--force", "--shadow")
    assert both.returncode == 2
    assert "choose one of --force, --shadow and --no-promote" in both.stderr

    again = cli(*data, "retrain", *SMALL, "--json", timeout=180)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["version"] == "(nothing trained)"
    assert summary["customer models trained"] == "0"
    assert summary["promotion"] == "nothing new"

    shadow = cli(*data, "retrain", *SMALL, "--all", "--seed", "1", "--shadow", timeout=180)
    assert shadow.returncode == 0, shadow.stderr
    assert re.search(r"promotion\s+in shadow \(31 models\)", shadow.stdout), shadow.stdout
    candidate = re.search(r"version\s+(\S+)", shadow.stdout).group(1)  # type: ignore[union-attr]

    listed = cli(*data, "models", "list", "--scope", "global", "--json")
    statuses = {row["version"]: row["status"] for row in map(json.loads, listed.stdout.splitlines())}
    assert statuses == {version: "ACTIVE", candidate: "SHADOW"}

    report = cli(*data, "report", "--out", str(tmp_path / "on-demand"), timeout=180)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "on-demand" / "index.html").read_text()
    assert candidate in page  # the newest run, compared with the active one
    assert version in page
    for png in _pngs(tmp_path / "on-demand"):
        image = imread(png)
        assert image.ndim == 3
        assert image.shape[0] > 100
        assert image.std() > 0.01  # not a blank canvas

    cleared = cli(*data, "models", "shadow", "--clear", "--reason", "seen enough")
    assert cleared.returncode == 0, cleared.stderr
    assert "31 models are candidates again" in cleared.stdout
    refused = cli(*data, "models", "shadow", "--reason", "nothing named")
    assert refused.returncode == 2
    assert "give --version VERSION" in refused.stderr
