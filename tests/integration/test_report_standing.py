"""The report of a registered run names what the run is now: candidate, in shadow, active or rolled back."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from posguard_models.training import TrainingConfig
from posguard_server.config import Settings
from posguard_server.domain.risk import ModelScope
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import Importer, read_outcomes, read_transactions
from posguard_server.pipeline.report import Standing, write_report
from posguard_server.pipeline.retrain import PromotionMode, RetrainOptions, evaluate_run, retrain

if TYPE_CHECKING:
    from posguard_server.store.db import Database

    from ..conftest import RiskStores

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
CONFIG = TrainingConfig(seed=0, n_estimators=30, customer_estimators=10, customer_min_history=30)
ROLLED_BACK_AT = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)


@pytest.fixture
def store(database: Database, risk_stores: RiskStores, tmp_path: Path) -> RiskStores:
    importer = Importer.on(database, build_numbering(Settings(data_dir=tmp_path / "data")))
    importer.import_rows(read_transactions(SAMPLE))
    importer.import_outcomes(read_outcomes(SAMPLE, delay=timedelta(days=7)))
    return risk_stores


def _page(store: RiskStores, version: str, folder: Path) -> str:
    evaluated = evaluate_run(store.history, store.registry, version)
    files = write_report(evaluated.report(version, review=0.99, decline=0.999), folder)
    return files.html.read_text(encoding="utf-8")


def test_each_standing_of_a_run_reads_in_its_report(store: RiskStores, tmp_path: Path) -> None:
    first = retrain(store.history, store.registry, store.shadow, RetrainOptions(config=CONFIG))
    options = RetrainOptions(config=replace(CONFIG, seed=1), everyone=True, promotion=PromotionMode.NEVER)
    second = retrain(store.history, store.registry, store.shadow, options)
    assert evaluate_run(store.history, store.registry, second.version).standing is Standing.CANDIDATE
    assert f"Evaluation of candidate run {second.version} against" in _page(
        store, second.version, tmp_path / "c"
    )

    store.shadow.set_shadow(second.version, now=datetime.now(UTC), actor="test")
    assert evaluate_run(store.history, store.registry, second.version).standing is Standing.SHADOW
    assert f"Evaluation of run {second.version} (in shadow) against" in _page(
        store, second.version, tmp_path / "s"
    )
    store.shadow.clear_shadow(now=datetime.now(UTC), actor="test")

    now = datetime.now(UTC)
    store.registry.promote(
        ModelScope.GLOBAL, "", second.version, force=True, now=now, actor="test", reason="r"
    )
    active = evaluate_run(store.history, store.registry, second.version)
    assert active.standing is Standing.ACTIVE
    assert active.standing_since is not None

    store.registry.rollback(
        ModelScope.GLOBAL, "", version=second.version, now=ROLLED_BACK_AT, actor="test", reason="r"
    )
    rolled_back = evaluate_run(store.history, store.registry, second.version)
    assert (rolled_back.standing, rolled_back.standing_since) == (Standing.ROLLED_BACK, ROLLED_BACK_AT)
    page = _page(store, second.version, tmp_path / "r")
    assert f"Evaluation of run {second.version} (rolled back on 2026-11-30 09:15 UTC) against" in page
    assert "candidate" not in page
    # The run it went back to is active again, not rolled back.
    assert evaluate_run(store.history, store.registry, first.version).standing is Standing.ACTIVE
