"""Imported transactions whose time ScoreTransaction refuses: rejected by line, nothing of them stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from posguard_server.config import Settings
from posguard_server.domain.customers import ExternalRef
from posguard_server.domain.errors import NotFound
from posguard_server.issuers import build_numbering
from posguard_server.pipeline.importer import (
    REJECTIONS_KEPT,
    Importer,
    ImportError_,
    ImportSummary,
    Rejection,
    read_outcomes,
    read_transactions,
)
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.scoring_writes import SqlScoringStore

if TYPE_CHECKING:
    from pathlib import Path

    from posguard_server.store.db import Database

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEADER = "transaction_id,customer_ref,timestamp,amount,currency,merchant_id"
# Line 1 is the header: the rows below are lines 2 to 7.
ROWS = [
    "t-good-1,C1,2018-04-01T10:00:00Z,12.50,EUR,M1",
    "t-9999,C9,9999-12-31T23:59:59Z,10.00,EUR,M1",
    "t-good-2,C1,2018-04-02T11:30:00+02:00,7.00,EUR,M2",
    "t-1999,C2,1999-12-31T23:59:59Z,3.00,EUR,M1",
    "t-good-3,C2,2026-11-23T12:04:00Z,20.00,EUR,M3",  # 4 minutes ahead: within the clock skew
    "t-ahead,C3,2026-11-23T12:06:00Z,20.00,EUR,M3",  # 6 minutes ahead: refused
]


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "transactions.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def parts(database: Database, tmp_path: Path) -> tuple[Importer, SqlScoringStore, SqlCustomerStore]:
    importer = Importer.on(database, build_numbering(Settings(data_dir=tmp_path / "data")))
    return importer, SqlScoringStore(database), SqlCustomerStore(database)


def _customer_exists(customers: SqlCustomerStore, ref: str) -> bool:
    try:
        customers.get(external=ExternalRef("source", ref))
    except NotFound:
        return False
    return True


def test_rows_the_rpc_would_refuse_are_rejected_by_line_and_the_rest_stored(
    parts: tuple[Importer, SqlScoringStore, SqlCustomerStore], tmp_path: Path
) -> None:
    importer, transactions, customers = parts
    seen: list[int] = []
    summary = importer.import_rows(read_transactions(_csv(tmp_path, ROWS)), progress=seen.append, now=NOW)

    assert [(r.line, r.column) for r in summary.rejections] == [
        (3, "timestamp"),
        (5, "timestamp"),
        (7, "timestamp"),
    ]
    assert summary.rejected == 3
    assert (summary.rows, summary.new, summary.read) == (3, 3, 6)
    assert summary.customers_created == 2  # C1 and C2: no customer for a row that was rejected
    assert sum(seen) == 6  # a progress bar over the file's lines still reaches its end

    for stored in ("t-good-1", "t-good-2", "t-good-3"):
        assert transactions.get_transaction(stored) is not None, stored
    for refused in ("t-9999", "t-1999", "t-ahead"):
        assert transactions.get_transaction(refused) is None, refused
    assert not _customer_exists(customers, "C9")
    assert not _customer_exists(customers, "C3")
    assert _customer_exists(customers, "C2")

    assert summary.rejection_messages() == [
        "line 3: timestamp 9999-12-31T23:59:59+00:00 must not be more than 5 minutes in the future",
        "line 5: timestamp 1999-12-31T23:59:59+00:00 must not be before 2000-01-01",
        "line 7: timestamp 2026-11-23T12:06:00+00:00 must not be more than 5 minutes in the future",
        "3 rows rejected, not imported: ScoreTransaction refuses their time",
    ]

    # Idempotent as before: a second run stores nothing new and rejects the same lines again.
    again = importer.import_rows(read_transactions(_csv(tmp_path, ROWS)), now=NOW)
    assert (again.rows, again.new, again.rejected) == (3, 0, 3)


def test_the_rule_is_the_rpcs() -> None:
    from posguard_server.api import risk as api
    from posguard_server.domain import risk as domain

    # One definition: the servicer calls the domain's rule, it does not keep a copy.
    assert api.event_time_refusal is domain.event_time_refusal
    assert not hasattr(api, "EARLIEST_TIME")
    assert not hasattr(api, "CLOCK_SKEW")


def test_messages_count_in_words_and_list_a_bounded_number() -> None:
    one = ImportSummary()
    one.reject(Rejection(4, "timestamp", "1999-01-01T00:00:00+00:00", "must not be before 2000-01-01"))
    assert one.rejection_messages()[-1] == "1 row rejected, not imported: ScoreTransaction refuses their time"
    assert ImportSummary().rejection_messages() == []

    many = ImportSummary()
    for line in range(2, REJECTIONS_KEPT + 1_002):
        many.reject(Rejection(line, "timestamp", "9999-12-31T23:59:59+00:00", "must not be ahead"))
    messages = many.rejection_messages()
    assert many.rejected == REJECTIONS_KEPT + 1_000
    assert len(many.rejections) == REJECTIONS_KEPT
    assert messages[-2:] == [
        "... and 1,000 more",
        f"{REJECTIONS_KEPT + 1_000:,} rows rejected, not imported: ScoreTransaction refuses their time",
    ]


def test_file_errors_do_not_name_the_file_the_caller_names_it_once(tmp_path: Path) -> None:
    path = tmp_path / "transactions.csv"
    path.write_text("transaction_id,customer_ref,timestamp,amount,currency\n", encoding="utf-8")
    with pytest.raises(ImportError_) as missing:
        list(read_transactions(path))
    assert str(missing.value) == "missing column merchant_id"
    path.write_text("transaction_id,note\n", encoding="utf-8")
    with pytest.raises(ImportError_) as neither:
        list(read_outcomes(path, delay=NOW - NOW))
    assert "transactions.csv" not in str(neither.value)
