"""Import a canonical transactions CSV (and outcomes) into the store: batched, idempotent, resumable.

Customers are found, or created with a fresh customer number, by their ``customer_ref`` linked as an external
ID in one namespace. Rows are inserted in batches that skip transaction ids already stored, so an interrupted
import is finished by running it again. Profiles of the customers touched are rebuilt from their full stored
history at the end, exactly as live scoring would have built them.

A row whose time ScoreTransaction would refuse (before 2000, or ahead of the clock: a year 9999 placeholder)
is rejected, not stored: the summary keeps its line and why, and the rest of the file is imported. A row that
cannot be read at all (a bad number, a missing field) still stops the import, naming its line: that is a
broken file, not a transaction the service refuses. Messages name no file; the caller prefixes its name once.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from posguard_models.features import Event, Profile
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.customers import ExternalRef
from posguard_server.domain.errors import NotFound
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.risk import (
    Channel,
    NewTransaction,
    Outcome,
    ProfileSnapshot,
    event_time_refusal,
)
from posguard_server.store.customers import NewCustomer, SqlCustomerStore
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.issuance import Issuance, SqlIssuanceStore
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.profiles import SqlProfileStore

if TYPE_CHECKING:
    from posguard_server.store.db import Database

REQUIRED_COLUMNS: Final = ("transaction_id", "customer_ref", "timestamp", "amount", "currency", "merchant_id")
DEFAULT_NAMESPACE: Final = "source"
ID_MAX: Final = 64
# Rejected rows whose line and reason a summary keeps; past these it only counts, so a file of millions of
# placeholder times cannot fill the memory with messages nobody reads.
REJECTIONS_KEPT: Final = 100


class ImportError_(ValueError):  # noqa: N801 - ImportError is a builtin
    """A row of the file cannot be imported; the message names the line and the column."""


@dataclass(frozen=True, slots=True)
class CsvTransaction:
    line: int
    customer_ref: str
    transaction: NewTransaction  # customer_id still empty: resolved at import
    is_fraud: bool | None
    scenario: int | None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row left out of the import: its line in the file, the column, the value as read and why."""

    line: int
    column: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.column} {self.value} {self.reason}"


@dataclass(slots=True)
class ImportSummary:
    rows: int = 0  # rows imported: ``new`` plus those already stored (rejected rows are not counted here)
    new: int = 0
    customers_created: int = 0
    profiles_rebuilt: int = 0
    rejected: int = 0  # rows refused, all of them
    rejections: list[Rejection] = field(default_factory=list)  # the first REJECTIONS_KEPT of them

    @property
    def read(self) -> int:
        """Rows read from the file: imported or rejected."""
        return self.rows + self.rejected

    def reject(self, rejection: Rejection) -> None:
        self.rejected += 1
        if len(self.rejections) < REJECTIONS_KEPT:
            self.rejections.append(rejection)

    def rejection_messages(self) -> list[str]:
        """One line per kept rejection, then the count ("1 row rejected"); empty when none was.

        Without the file's name: the caller prefixes it once to each line.
        """
        if not self.rejected:
            return []
        lines = [str(rejection) for rejection in self.rejections]
        unlisted = self.rejected - len(self.rejections)
        if unlisted:
            lines.append(f"... and {unlisted:,} more")
        lines.append(f"{_rows(self.rejected)} rejected, not imported: ScoreTransaction refuses their time")
        return lines


def _rows(count: int) -> str:
    """``count`` rows, in words: "1 row", "2 rows", "1,000 rows"."""
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


Progress = Callable[[int], None]


def open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00: past the last representable UTC time
        raise ValueError("it is after the year 9999 in UTC") from None


def read_transactions(path: Path) -> Iterator[CsvTransaction]:
    """Rows of a canonical transactions CSV, validated; a bad row raises naming its line and column."""
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ImportError_(f"missing column{'' if len(missing) == 1 else 's'} {', '.join(missing)}")
        for row in reader:
            yield _parse_row(row, reader.line_num)


def _parse_row(row: dict[str, str], line: int) -> CsvTransaction:
    def bad(column: str, why: str) -> ImportError_:
        return ImportError_(f"line {line}: {column} {why}")

    def text(column: str, *, required: bool = False) -> str:
        value = (row.get(column) or "").strip()
        if required and not value:
            raise bad(column, "is empty")
        if len(value) > ID_MAX:
            raise bad(column, f"is longer than {ID_MAX} characters")
        return value

    try:
        event_time = parse_time(text("timestamp", required=True))
    except ValueError as error:
        raise bad("timestamp", f"is not an ISO 8601 time with a zone ({error})") from None
    currency = text("currency", required=True).upper()
    exponent = minor_exponent(currency)
    if exponent is None:
        raise bad("currency", "is not an ISO 4217 code")
    try:
        amount = float(text("amount", required=True))
    except ValueError:
        raise bad("amount", "is not a number") from None
    if not math.isfinite(amount) or amount < 0:
        raise bad("amount", "must be a finite amount, not negative")
    mcc = text("mcc")
    if mcc and not (len(mcc) == 4 and mcc.isdigit()):
        raise bad("mcc", "must be 4 digits")
    channel_name = text("channel").lower()
    try:
        channel = Channel(channel_name) if channel_name else Channel.UNSPECIFIED
    except ValueError:
        raise bad("channel", "is not POS, ONLINE or MOBILE") from None
    lat, lon = _coordinate(row, "lat", 90.0, bad), _coordinate(row, "lon", 180.0, bad)
    fraud_text = text("is_fraud")
    scenario_text = text("fraud_scenario")
    return CsvTransaction(
        line=line,
        customer_ref=text("customer_ref", required=True),
        transaction=NewTransaction(
            transaction_id=text("transaction_id", required=True),
            customer_id="",
            event_time=event_time,
            amount_minor=round(amount * 10**exponent),
            currency=currency,
            merchant_id=text("merchant_id", required=True),
            terminal_id=text("terminal_id"),
            mcc=mcc,
            channel=channel,
            latitude=lat,
            longitude=lon,
        ),
        is_fraud=(fraud_text == "1") if fraud_text else None,
        scenario=int(scenario_text) if scenario_text.isdigit() else None,
    )


def _coordinate(
    row: dict[str, str], column: str, limit: float, bad: Callable[[str, str], ImportError_]
) -> float | None:
    value = (row.get(column) or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise bad(column, "is not a number") from None
    if not math.isfinite(number) or abs(number) > limit:
        raise bad(column, f"must be within ±{limit:g}")
    return number


def _batches(rows: Iterable[CsvTransaction], size: int) -> Iterator[list[CsvTransaction]]:
    batch: list[CsvTransaction] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Importer:
    def __init__(
        self,
        history: SqlHistoryStore,
        profiles: SqlProfileStore,
        outcomes: SqlOutcomeStore,
        customers: SqlCustomerStore,
        issuance: SqlIssuanceStore,
        numbering: Numbering,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        actor: str = "import",
    ) -> None:
        self._history = history
        self._profiles = profiles
        self._outcomes = outcomes
        self._customers = customers
        self._issuance = issuance
        self._numbering = numbering
        self._namespace = namespace
        self._actor = actor
        self._known: dict[str, str] = {}

    @classmethod
    def on(
        cls,
        database: Database,
        numbering: Numbering,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        actor: str = "import",
    ) -> Importer:
        """An importer on the stores of ``database``."""
        return cls(
            SqlHistoryStore(database),
            SqlProfileStore(database),
            SqlOutcomeStore(database),
            SqlCustomerStore(database),
            SqlIssuanceStore(database),
            numbering,
            namespace=namespace,
            actor=actor,
        )

    def customer_for(self, ref: str) -> tuple[str, bool]:
        """The customer id of ``ref``, creating the customer on first sight; ``(id, created)``."""
        if ref in self._known:
            return self._known[ref], False
        external = ExternalRef(self._namespace, ref)
        try:
            customer_id = self._customers.get(external=external).customer.customer_id
            created = False
        except NotFound:
            scheme = self._numbering.scheme()
            assert scheme is not None  # the default issuer always exists
            new = NewCustomer(
                customer_id="cus_" + secrets.token_hex(12),
                issuer=scheme.issuer,
                prefix=scheme.prefix(),
                holder_ciphertext=None,
                holder_key_version=None,
                external_ids=(external,),
            )
            # A deterministic request id makes a resumed import find, not duplicate, the customer.
            digest = hashlib.sha256(f"{self._namespace}\x00{ref}".encode()).hexdigest()
            issued = self._issuance.issue(
                Issuance(
                    new,
                    make_number=lambda p, c: self._numbering.make_number(scheme, p, c),
                    request_id=f"import-{digest[:48]}",
                    fingerprint=digest,
                    actor=self._actor,
                    now=datetime.now(UTC),
                )
            )
            customer_id, created = issued.stored.customer.customer_id, not issued.replayed
        self._known[ref] = customer_id
        return customer_id, created

    def import_rows(
        self,
        rows: Iterable[CsvTransaction],
        *,
        batch_size: int = 5000,
        progress: Progress | None = None,
        now: datetime | None = None,
    ) -> ImportSummary:
        """Import ``rows``, rejecting those whose time ScoreTransaction would refuse at ``now``.

        A rejected row creates no customer and stores nothing; ``progress`` still counts it, as a row read.
        """
        summary = ImportSummary()
        touched: set[str] = set()
        checked_at = datetime.now(UTC) if now is None else now
        for batch in _batches(rows, batch_size):
            records = []
            for row in batch:
                refusal = event_time_refusal(row.transaction.event_time, checked_at)
                if refusal is not None:
                    shown = row.transaction.event_time.isoformat()
                    summary.reject(Rejection(row.line, "timestamp", shown, refusal))
                    continue
                customer_id, created = self.customer_for(row.customer_ref)
                summary.customers_created += created
                touched.add(customer_id)
                records.append(replace(row.transaction, customer_id=customer_id))
            if records:
                summary.new += self._history.import_transactions(records)
            summary.rows += len(records)
            if progress is not None:
                progress(len(batch))
        summary.profiles_rebuilt = self.rebuild_profiles(sorted(touched))
        return summary

    def rebuild_profiles(self, customer_ids: Sequence[str]) -> int:
        """Recompute the profiles of these customers from their whole stored history, in time order."""
        rebuilt = 0
        for start in range(0, len(customer_ids), 2000):
            chunk = customer_ids[start : start + 2000]
            snapshots: list[tuple[str, ProfileSnapshot]] = []
            for batch in self._history.history(customer_ids=chunk, exclude_labelled_fraud=False):
                profiles: dict[str, tuple[Profile, datetime, datetime]] = {}
                for i, customer_id in enumerate(batch.customer_ids):
                    time, currency = batch.event_times[i], batch.currencies[i]
                    entry = profiles.get(customer_id)
                    if entry is None:
                        entry = (Profile(), time, time)
                    profile, first, _ = entry
                    exponent = minor_exponent(currency) or 0
                    event = Event.of(
                        time.timestamp(),
                        batch.amounts_minor[i] / 10**exponent,
                        batch.terminal_ids[i],
                        batch.merchant_ids[i],
                        batch.latitudes[i],
                        batch.longitudes[i],
                    )
                    profile.update(event)
                    profiles[customer_id] = (profile, first, time)
                for customer_id, (profile, first, last) in profiles.items():
                    snapshots.append(
                        (customer_id, ProfileSnapshot(profile.to_bytes(), profile.count, first, last))
                    )
            self._profiles.put_profiles(snapshots, now=datetime.now(UTC))
            rebuilt += len(snapshots)
        return rebuilt

    def import_outcomes(
        self,
        rows: Iterable[tuple[str, Outcome, datetime]],
        *,
        batch_size: int = 5000,
        progress: Progress | None = None,
    ) -> tuple[int, int]:
        """Set outcomes; ``(rows, matched)`` where matched counts transaction ids found in the store."""
        total = matched = 0
        batch: list[tuple[str, Outcome, datetime]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_size:
                matched += self._outcomes.bulk_outcomes(batch)
                total += len(batch)
                if progress is not None:
                    progress(len(batch))
                batch = []
        if batch:
            matched += self._outcomes.bulk_outcomes(batch)
            total += len(batch)
            if progress is not None:
                progress(len(batch))
        return total, matched


def read_outcomes(path: Path, *, delay: timedelta) -> Iterator[tuple[str, Outcome, datetime]]:
    """Outcomes from a CSV: ``transaction_id,outcome[,reported_at]``, or a labelled transactions CSV.

    A labelled transactions CSV (with ``is_fraud``) reports its fraud rows as FRAUD, ``delay`` after the
    transaction, which is how late labels arrive in practice.
    """
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "outcome" in columns:
            for row in reader:
                try:
                    outcome = Outcome((row.get("outcome") or "").strip().upper())
                    reported = (row.get("reported_at") or "").strip()
                    at = parse_time(reported) if reported else datetime.now(UTC)
                except ValueError as error:
                    raise ImportError_(f"line {reader.line_num}: {error}") from None
                yield (row["transaction_id"].strip(), outcome, at)
        elif "is_fraud" in columns and "timestamp" in columns:
            for row in reader:
                if (row.get("is_fraud") or "").strip() == "1":
                    try:
                        at = parse_time(row["timestamp"].strip()) + delay
                    except ValueError as error:
                        raise ImportError_(f"line {reader.line_num}: timestamp {error}") from None
                    yield (row["transaction_id"].strip(), Outcome.FRAUD, at)
        else:
            raise ImportError_("needs an outcome column, or is_fraud and timestamp")
