"""The risk tables and what the modules storing risk share: widths, row values, small helpers.

Scoring writes (``scoring_writes``), history (``history``), profiles (``profiles``), outcomes
(``outcomes``), the model registry (``model_registry``) and shadow scoring (``shadow``) each have a module and
a store of their own; the ORM classes here never leave those modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.domain.errors import InvalidArgument, NotFound
from posguard_server.domain.risk import (
    Channel,
    Decision,
    ModelScope,
    ModelStatus,
    NewTransaction,
    Outcome,
    ProfileSnapshot,
    StoredReason,
    TransactionSource,
)
from posguard_server.store.customers import CUSTOMER_ID_MAX, SqlCustomer
from posguard_server.store.schema import PRINCIPAL_MAX, REQUEST_ID_MAX, Base, utc
from posguard_server.store.schema import insert_for as schema_insert_for

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


# Widths callers validate against. The contract allows transaction ids and notes this long.
TRANSACTION_ID_MAX = 128
MERCHANT_ID_MAX = 64
TERMINAL_ID_MAX = 64
MCC_LENGTH = 4
CURRENCY_LENGTH = 3
FINGERPRINT_MAX = 64
OUTCOME_NOTE_MAX = 1000
MODEL_VERSION_MAX = 64

# How often a write that lost a race on a unique constraint is re-run; the re-run sees the winner.
ATTEMPTS = 3
# Rows per executemany and values per IN list: well below SQLite's limit on bound parameters.
CHUNK = 500
FRAUD_LABELS = (Outcome.FRAUD.value, Outcome.CHARGEBACK.value)

_Item = TypeVar("_Item")


def _in_list(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class SqlRiskTransaction(Base):
    """One transaction, imported as history or scored live; a scored one carries its answer."""

    __tablename__ = "risk_transactions"
    __table_args__ = (
        # Feature history and training read a customer's transactions in event-time order.
        Index("ix_risk_transactions_customer_time", "customer_id", "event_time", "id"),
        Index("ix_risk_transactions_outcome", "outcome", "outcome_at"),
        # Rules ask whether a customer paid at a merchant or terminal before (customer.new_merchant,
        # customer.new_terminal): an index probe per pair instead of a scan of the customer's history.
        Index("ix_risk_transactions_customer_merchant", "customer_id", "merchant_id", "in_history"),
        Index("ix_risk_transactions_customer_terminal", "customer_id", "terminal_id", "in_history"),
        # Label feedback asks, per score, who paid at a terminal (or a terminal-less merchant) lately.
        Index("ix_risk_transactions_terminal_time", "terminal_id", "event_time"),
        Index(
            "ix_risk_transactions_merchant_time",
            "merchant_id",
            "event_time",
            sqlite_where=text("terminal_id = ''"),
            postgresql_where=text("terminal_id = ''"),
        ),
        # The shadow comparison reads one run's transactions; only transactions scored in shadow are indexed.
        Index(
            "ix_risk_transactions_shadow_version",
            "shadow_version",
            sqlite_where=text("shadow_version IS NOT NULL"),
            postgresql_where=text("shadow_version IS NOT NULL"),
        ),
        CheckConstraint(_in_list("source", (s.value for s in TransactionSource)), name="source"),
        CheckConstraint(_in_list("channel", (c.value for c in Channel)), name="channel"),
        CheckConstraint(_in_list("decision", (d.value for d in Decision)), name="decision"),
        CheckConstraint(_in_list("model_scope", (s.value for s in ModelScope)), name="model_scope"),
        CheckConstraint(_in_list("outcome", (o.value for o in Outcome)), name="outcome"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(String(TRANSACTION_ID_MAX), unique=True)
    customer_id: Mapped[str] = mapped_column(String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"))
    event_time: Mapped[datetime]
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(CURRENCY_LENGTH))
    merchant_id: Mapped[str] = mapped_column(String(MERCHANT_ID_MAX))
    terminal_id: Mapped[str] = mapped_column(String(TERMINAL_ID_MAX))
    mcc: Mapped[str] = mapped_column(String(MCC_LENGTH))
    channel: Mapped[str] = mapped_column(String(16))
    latitude: Mapped[float | None] = mapped_column(Double)
    longitude: Mapped[float | None] = mapped_column(Double)
    source: Mapped[str] = mapped_column(String(8))
    # False for a transaction kept only for replay and reports (e.g. a rule decline): not training data.
    in_history: Mapped[bool] = mapped_column(Boolean)
    # The scored request's fingerprint: a retry must match it to be answered from the stored answer.
    fingerprint: Mapped[str | None] = mapped_column(String(FINGERPRINT_MAX))
    # The request that stored it; not unique: request ids are their callers' own (see store.idempotency).
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX))
    scored_at: Mapped[datetime | None]
    risk_score: Mapped[float | None] = mapped_column(Double)
    decision: Mapped[str | None] = mapped_column(String(16))
    # JSON list of {"code", "message", "weight"}.
    reasons: Mapped[str | None] = mapped_column(Text)
    model_scope: Mapped[str | None] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(MODEL_VERSION_MAX))
    history_size: Mapped[int | None] = mapped_column(Integer)
    cold_start: Mapped[bool | None] = mapped_column(Boolean)
    # The feature vector as float64 bytes, for reports and evaluation.
    features: Mapped[bytes | None] = mapped_column(LargeBinary)
    outcome: Mapped[str | None] = mapped_column(String(16))
    outcome_at: Mapped[datetime | None]
    outcome_note: Mapped[str | None] = mapped_column(String(OUTCOME_NOTE_MAX))
    # The report that set the current label (the full log is risk_outcome_reports).
    outcome_request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_MAX))
    # The shadow run scoring alongside the answer's models, and its score (NULL when none was running): for
    # comparing the two in reports, never part of the answer.
    shadow_version: Mapped[str | None] = mapped_column(String(MODEL_VERSION_MAX))
    shadow_risk_score: Mapped[float | None] = mapped_column(Double)


class SqlRiskOutcomeReport(Base):
    """One ReportOutcome call, kept under its request_id so that a retry replays it.

    A log rather than columns on the transaction: a later report may overwrite the label, and a retry of the
    earlier one must still be recognised as a retry instead of writing its label back.
    """

    __tablename__ = "risk_outcome_reports"
    __table_args__ = (CheckConstraint(_in_list("outcome", (o.value for o in Outcome)), name="outcome"),)

    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_MAX), primary_key=True)
    # The caller's key id: a request_id is its caller's own.
    caller: Mapped[str] = mapped_column(String(PRINCIPAL_MAX), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_MAX))
    transaction_id: Mapped[str] = mapped_column(
        String(TRANSACTION_ID_MAX), ForeignKey("risk_transactions.transaction_id"), index=True
    )
    outcome: Mapped[str] = mapped_column(String(16))
    outcome_at: Mapped[datetime]
    note: Mapped[str] = mapped_column(String(OUTCOME_NOTE_MAX))
    received_at: Mapped[datetime]


class SqlRiskProfile(Base):
    """A customer's feature profile. ``state`` is opaque here: the features module encodes and reads it."""

    __tablename__ = "risk_profiles"

    customer_id: Mapped[str] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id"), primary_key=True
    )
    state: Mapped[bytes] = mapped_column(LargeBinary)
    transaction_count: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    declines: Mapped[int] = mapped_column(Integer, default=0)
    reviews: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]
    # Moved on by one with every write; a write names the version it read, so two writers of one profile
    # (processes, replicas) cannot both succeed from the same read: the loser finds no row and starts over.
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class SqlRiskModel(Base):
    """A model version in the registry.

    GLOBAL models have a NULL customer_id, so CUSTOMER models keep their foreign key. NULLs never collide in
    a unique index, so the GLOBAL rows get partial unique indexes of their own (``WHERE customer_id IS
    NULL``); SQLite and PostgreSQL both support them. The same goes for "at most one ACTIVE".
    """

    __tablename__ = "risk_models"
    __table_args__ = (
        UniqueConstraint("scope", "customer_id", "version", name="uq_risk_models_scope_customer_version"),
        Index(
            "uq_risk_models_global_version",
            "version",
            unique=True,
            sqlite_where=text("customer_id IS NULL"),
            postgresql_where=text("customer_id IS NULL"),
        ),
        Index(
            "uq_risk_models_active_customer",
            "customer_id",
            unique=True,
            sqlite_where=text("status = 'ACTIVE'"),
            postgresql_where=text("status = 'ACTIVE'"),
        ),
        Index(
            "uq_risk_models_active_global",
            "scope",
            unique=True,
            sqlite_where=text("status = 'ACTIVE' AND customer_id IS NULL"),
            postgresql_where=text("status = 'ACTIVE' AND customer_id IS NULL"),
        ),
        # A training run is promoted, rolled back, put in shadow and reported on by its version.
        Index("ix_risk_models_version", "version"),
        # Servers look for the shadow run on every reload; only the shadow run's rows are in this index.
        Index(
            "ix_risk_models_shadow_version",
            "version",
            sqlite_where=text("status = 'SHADOW'"),
            postgresql_where=text("status = 'SHADOW'"),
        ),
        CheckConstraint("scope IN ('CUSTOMER', 'GLOBAL')", name="scope"),
        CheckConstraint(_in_list("status", (s.value for s in ModelStatus)), name="status"),
        CheckConstraint(
            "(scope = 'GLOBAL' AND customer_id IS NULL) OR (scope = 'CUSTOMER' AND customer_id IS NOT NULL)",
            name="scope_customer",
        ),
    )

    # Ordered by registration: listing is newest first by id.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str | None] = mapped_column(
        String(CUSTOMER_ID_MAX), ForeignKey("customers.customer_id")
    )
    version: Mapped[str] = mapped_column(String(MODEL_VERSION_MAX))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    training_window_start: Mapped[datetime]
    training_window_end: Mapped[datetime]
    sample_count: Mapped[int] = mapped_column(Integer)
    # JSON object of metric name → value.
    metrics: Mapped[str] = mapped_column(Text)
    activated_at: Mapped[datetime | None]
    # The model that was active when this one was activated: where a rollback returns to.
    previous_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("risk_models.id"))
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    # SHA-256 of ``artifact`` (hex), written with it: a server loads no artifact that does not match it.
    artifact_sha256: Mapped[str] = mapped_column(String(64))


class SqlRiskModelGeneration(Base):
    """One row counting changes of active models; servers compare it to decide whether to reload."""

    __tablename__ = "risk_model_generation"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime]


TRANSACTIONS = cast(Table, SqlRiskTransaction.__table__)
PROFILES = cast(Table, SqlRiskProfile.__table__)
# What a profile write sets (besides the key and the version, which moves on by one).
PROFILE_VALUES = (
    "state",
    "transaction_count",
    "first_seen",
    "last_seen",
    "declines",
    "reviews",
    "updated_at",
)
MODELS = cast(Table, SqlRiskModel.__table__)
GENERATION = cast(Table, SqlRiskModelGeneration.__table__)


def chunks(items: Sequence[_Item], size: int) -> Iterator[Sequence[_Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def summed_rowcount(count: int) -> int:
    if count < 0:
        # Guards a driver change: psycopg 3 and sqlite3 both sum the counts of an executemany.
        raise RuntimeError("the database driver did not report how many rows it changed")
    return count


def insert_for(session: Session) -> Any:
    return schema_insert_for(session.get_bind().dialect.name)


def require_customers(session: Session, customer_ids: set[str]) -> None:
    """NotFound naming a missing customer, instead of a foreign key violation that reads as a conflict."""
    wanted = sorted(customer_ids)
    for chunk in chunks(wanted, CHUNK):
        known = set(
            session.scalars(select(SqlCustomer.customer_id).where(SqlCustomer.customer_id.in_(chunk)))
        )
        missing = [customer_id for customer_id in chunk if customer_id not in known]
        if missing:
            raise NotFound(
                "no such customer", reason="CUSTOMER_NOT_FOUND", metadata={"customer_id": missing[0]}
            )


def request_conflict(message: str) -> InvalidArgument:
    return InvalidArgument.field("request_id", message, reason="IDEMPOTENCY_CONFLICT")


def transaction_values(record: NewTransaction, source: TransactionSource, in_history: bool) -> dict[str, Any]:
    return {
        "transaction_id": record.transaction_id,
        "customer_id": record.customer_id,
        "event_time": utc(record.event_time),
        "amount_minor": record.amount_minor,
        "currency": record.currency,
        "merchant_id": record.merchant_id,
        "terminal_id": record.terminal_id,
        "mcc": record.mcc,
        "channel": record.channel.value,
        "latitude": record.latitude,
        "longitude": record.longitude,
        "source": source.value,
        "in_history": in_history,
    }


def profile_snapshot(row: SqlRiskProfile) -> ProfileSnapshot:
    return ProfileSnapshot(
        state=row.state,
        transaction_count=row.transaction_count,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        declines=row.declines,
        reviews=row.reviews,
    )


def reasons_json(reasons: Sequence[StoredReason]) -> str:
    """Reasons as stored: a JSON list of {"code", "message", "weight"}."""
    return json.dumps(
        [{"code": r.code, "message": r.message, "weight": r.weight} for r in reasons],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def reasons_from_json(raw: str | None) -> tuple[StoredReason, ...]:
    if not raw:
        return ()
    return tuple(
        StoredReason(item["code"], item["message"], float(item["weight"])) for item in json.loads(raw)
    )
