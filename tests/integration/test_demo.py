"""``posguard-server demo`` end to end: a real server process, real training, real payments over gRPC."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conftest import Cli

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "handbook_sample.csv.gz"
DECISION_ROW = re.compile(r"^  (APPROVE|REVIEW|DECLINE|total)\s+(\d+)\s+(\d+)\s+(\d+)$", re.MULTILINE)
TOP_ROW = re.compile(r"^  (\d+)\. risk (\d\.\d+) (APPROVE|REVIEW|DECLINE)\s", re.MULTILINE)


@pytest.mark.slow
def test_demo_plays_one_day_and_writes_its_report(cli: Cli, tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    # Bounded for CI: 12 customers of the sample, and 20 of their day's ~25 transactions.
    args = ["demo", "--data-dir", str(data_dir), "--dataset", str(SAMPLE), "--customers", "12"]
    result = cli(*args, "--transactions", "20", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    header = re.search(r"Decisions on (\S+): (\d+) payments sent, (\d+) scored", out)
    assert header is not None, out
    sent, scored = int(header.group(2)), int(header.group(3))
    assert sent == scored == 20  # the limit was applied and the server answered every payment
    rows = {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in DECISION_ROW.finditer(out)}
    assert set(rows) == {"APPROVE", "REVIEW", "DECLINE", "total"}, out
    assert sum(rows[d][0] for d in ("APPROVE", "REVIEW", "DECLINE")) == rows["total"][0] == sent
    for payments, fraud, genuine in rows.values():
        assert fraud + genuine == payments  # every payment lined up with the dataset's label
    assert "refused" not in out

    top = out[out.index("Highest risk on") :]
    ranked = [(float(m.group(2)), m.group(3)) for m in TOP_ROW.finditer(top)]
    assert len(ranked) == 5
    assert [risk for risk, _ in ranked] == sorted((risk for risk, _ in ranked), reverse=True)
    for risk, decision in ranked:  # the server's default thresholds: REVIEW from 0.99, DECLINE from 0.999
        assert decision == ("DECLINE" if risk >= 0.999 else "REVIEW" if risk >= 0.99 else "APPROVE")
    reasons = re.findall(r"^       - (.+)$", top, re.MULTILINE)
    assert reasons
    assert "(no single feature stands out)" not in reasons[0]  # the riskiest payment says why
    assert "decided by the customer model" in top or "decided by the global model" in top

    match = re.search(r"^Evaluation report of the day: (.+)$", out, re.MULTILINE)
    assert match is not None, out
    report = Path(match.group(1))  # relative paths are relative to the working directory we share
    assert report.resolve() == (data_dir / "report" / "index.html").resolve()
    assert "posguard demo" in report.read_text(encoding="utf-8")
    assert (data_dir / "report" / "score_distribution.png").stat().st_size > 0
    # The server was a real process with its own log, and it was shut down gracefully.
    log = (data_dir / "server.log").read_text(encoding="utf-8")
    assert "/posguard.v1.Risk/ScoreTransaction" in log
    # Its JSON access log names the model that decided each score and only a masked customer.
    trained = re.search(r"^training +version (\S+):", out, re.MULTILINE)
    assert trained is not None, out
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    scores = [e for e in entries if e.get("method") == "/posguard.v1.Risk/ScoreTransaction"]
    assert len(scores) == sent
    assert {e["model_version"] for e in scores} == {trained.group(1)}
    assert all("*" in e["customer"] for e in scores)
    assert "stopped" in log.splitlines()[-1]


def test_demo_refuses_a_directory_it_did_not_make(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "posguard.db").write_bytes(b"someone's data")
    result = cli("demo", "--data-dir", str(tmp_path), "--dataset", str(SAMPLE))
    assert result.returncode == 1
    assert "was not made by the demo" in result.stderr
    assert (tmp_path / "posguard.db").read_bytes() == b"someone's data"
