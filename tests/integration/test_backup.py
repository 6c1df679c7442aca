"""``posguard-server backup`` and ``restore``: a backup of a serving server, restored and served again.

The tests run on SQLite and on PostgreSQL (and one moves a backup between the two); sources are populated
through a real server and the command line, restored databases are checked through a real server on them.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import stat
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, inspect, select

import posguard
from posguard.dynamic_codes import PERIOD_SECONDS
from posguard.v1 import admin_pb2, common_pb2, customer_ids_pb2, risk_pb2
from posguard_server.config import Settings
from posguard_server.domain import keyring
from posguard_server.domain.api_keys import Role, create_key, parse_token, secret_matches
from posguard_server.pipeline.backup import BackupError, backup, restore, table_member
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.db import Database
from posguard_server.store.migrate import current_revision, head_revision, upgrade
from posguard_server.store.risk_tables import SqlRiskTransaction
from posguard_server.store.scratch import scratch_postgres_database

if TYPE_CHECKING:
    from .conftest import Cli, RunningServer

pytestmark = pytest.mark.timeout(120)

SAMPLE = Path(__file__).parents[1] / "data" / "handbook_sample.csv.gz"
# Three customers with enough history for models of their own, trained small: the test stays fast.
HISTORY_CUSTOMERS = ("HB000111", "HB001003", "HB001362")
HISTORY_ROWS_EACH = 60
SMALL = ("--customer-min-history", "30", "--customer-estimators", "10", "--n-estimators", "20")
EXT = common_pb2.ExternalId
Selector = common_pb2.CustomerSelector


@pytest.fixture
def target_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty database on the same backend as ``database_url``, to restore into."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/target/posguard.db"
        return
    with scratch_postgres_database(database_url, "posguard_r") as url:
        yield url


def _history(tmp_path: Path) -> Path:
    """A few customers' rows of the sample history, as a canonical transactions CSV."""
    taken: dict[str, int] = {}
    out = tmp_path / "history.csv"
    with gzip.open(SAMPLE, "rt", newline="") as source, out.open("w", newline="") as target:
        reader = csv.DictReader(source)
        assert reader.fieldnames is not None
        writer = csv.DictWriter(target, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            ref = row["customer_ref"]
            if ref in HISTORY_CUSTOMERS and taken.get(ref, 0) < HISTORY_ROWS_EACH:
                taken[ref] = taken.get(ref, 0) + 1
                writer.writerow(row)
    assert set(taken) == set(HISTORY_CUSTOMERS)
    return out


def _env(url: str, data_dir: Path) -> dict[str, str]:
    return {"POSGUARD_DATABASE_URL": url, "POSGUARD_DATA_DIR": str(data_dir)}


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def _transaction(transaction_id: str, amount_minor: int, **selector: Any) -> risk_pb2.Transaction:
    return risk_pb2.Transaction(
        transaction_id=transaction_id,
        amount=common_pb2.Money(amount_minor=amount_minor, currency="EUR"),
        merchant_id="T001694",
        terminal_id="T001694",
        mcc="5411",
        channel=common_pb2.CHANNEL_POS,
        event_time=_now(),
        **selector,
    )


def _all_pages(call: Callable[..., Any], field: str, **request: Any) -> list[Any]:
    items: list[Any] = []
    token = ""
    while True:
        page = call(page_size=1000, page_token=token, **request)
        items.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return items


def _state(admin: posguard.Client) -> dict[str, list[Any]]:
    """Everything the Admin and CustomerIds APIs list, as messages that compare field by field."""
    return {
        "customers": _all_pages(admin.list_customers, "customers"),
        "api_keys": _all_pages(admin.list_api_keys, "keys", include_revoked=True),
        "models": _all_pages(admin.list_models, "models"),
        "audit": _all_pages(admin.list_audit_events, "events"),
    }


def _without_replayed(answer: risk_pb2.ScoreTransactionResponse) -> risk_pb2.ScoreTransactionResponse:
    copy = risk_pb2.ScoreTransactionResponse()
    copy.CopyFrom(answer)
    copy.ClearField("replayed")
    return copy


def test_a_backup_of_a_serving_server_restores_everything_it_served(
    database_url: str, target_url: str, tmp_path: Path, server_factory: Callable[..., RunningServer], cli: Cli
) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    source_env, target_env = _env(database_url, source_dir), _env(target_url, target_dir)
    archive = tmp_path / "backups" / "posguard.zip"
    archive.parent.mkdir()

    # -- populate: history and models from the command line, everything else through a serving server.
    upgrade(database_url)
    imported = cli("import", "transactions", str(_history(tmp_path)), env=source_env, timeout=90)
    assert imported.returncode == 0, imported.stderr
    trained = cli("train", *SMALL, env=source_env, timeout=90)
    assert trained.returncode == 0, trained.stderr
    assert "3 customer models" in trained.stdout

    source = server_factory(database_url=database_url, data_dir=source_dir)
    admin_token = source.key(Role.ADMIN)
    with posguard.Client(source.target, api_key=admin_token, timeout=10) as admin:
        gateway_token = admin.create_api_key(name="till 7", role=admin_pb2.ROLE_GATEWAY).token
        revoked = admin.create_api_key(name="old till", role=admin_pb2.ROLE_GATEWAY).key
        admin.revoke_api_key(key_id=revoked.key_id, reason="till replaced")
        with posguard.Client(source.target, api_key=gateway_token, timeout=10) as gateway:
            holder = customer_ids_pb2.Holder(name="Ada Lovelace", phone="+44 20 7946 0000")
            ada = gateway.issue_customer_id(holder=holder, external_ids=[EXT(namespace="bank", value="a-1")])
            bob = gateway.issue_customer_id(holder=customer_ids_pb2.Holder(name="Bob"))
            carol = gateway.issue_customer_id()
            ada_number = ada.customer.primary.number
            sub = gateway.issue_sub_id(primary_number=ada_number, label="family card").sub_number
            gateway.link_external_id(
                customer=Selector(customer_id=carol.customer.customer_id),
                external_id=EXT(namespace="crm", value="7"),
            )
            admin.suspend_customer_id(number=bob.customer.primary.number, reason="card lost")
            rotated = admin.rotate_customer_id(number=carol.customer.primary.number, reason="number leaked")
            enrolled = gateway.enroll_dynamic_codes(number=ada_number)
            code = posguard.dynamic_code(enrolled.secret)
            assert gateway.redeem_dynamic_code(code=code, merchant_id="m-1").redeemed
            redeemed_at = time.time()
            forged = ada_number[:-1] + str((int(ada_number[-1]) + 1) % 10)
            assert not gateway.verify_customer_id(number=forged).valid  # a failure: a risk signal, audited
            scored = {}
            for index, selector in enumerate(
                [{"external_id": EXT(namespace="source", value=ref)} for ref in HISTORY_CUSTOMERS]
                + [{"customer_number": ada_number}, {"customer_number": sub.number}]
            ):
                transaction = _transaction(f"live-{index}", 1_000 + 4_000 * index, **selector)
                scored[transaction.transaction_id] = (
                    transaction,
                    gateway.score_transaction(transaction=transaction),
                )
            assert scored["live-0"][1].model.scope == risk_pb2.MODEL_SCOPE_CUSTOMER
            gateway.report_outcome(
                transaction_id="live-4", outcome=risk_pb2.OUTCOME_FRAUD, note="card stolen"
            )
        numbers = [
            ada_number,
            sub.number,
            bob.customer.primary.number,
            rotated.previous_number,
            rotated.customer.primary.number,
            forged,
        ]
        verified = [admin.verify_customer_id(number=number) for number in numbers]

        # -- back up while the server serves; a read in flight on another thread is answered meanwhile.
        reads: list[int] = []
        stop = threading.Event()

        def read_while_backing_up() -> None:
            with posguard.Client(source.target, api_key=admin_token, timeout=10) as reader:
                while not stop.is_set():
                    reads.append(
                        len(reader.get_customer(customer=Selector(number=ada_number)).customer.sub_numbers)
                    )
                    stop.wait(0.02)

        reader = threading.Thread(target=read_while_backing_up)
        reader.start()
        try:
            made = cli("backup", str(archive), env=source_env)
        finally:
            stop.set()
            reader.join(timeout=20)
        assert made.returncode == 0, made.stderr
        assert reads
        assert set(reads) == {1}
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
        assert "mode 0600" in made.stdout
        before = _state(admin)

    manifest = json.loads(zipfile.ZipFile(archive).read("manifest.json"))
    assert manifest["format_version"] == 1
    assert manifest["schema_revision"] == head_revision()
    counts = {table["name"]: table["rows"] for table in manifest["tables"]}
    assert counts["customers"] == 6  # three imported, three issued
    assert counts["audit_events"] == len(before["audit"])
    assert counts["risk_models"] == len(before["models"]) == 4  # the global model and three customer ones
    assert counts["api_keys"] == 3
    assert counts["dynamic_enrollments"] == counts["dynamic_code_uses"] == counts["risk_outcome_reports"] == 1
    assert counts["risk_transactions"] == 3 * HISTORY_ROWS_EACH + len(scored)
    gateway_secret = parse_token(gateway_token)
    assert gateway_secret is not None
    assert gateway_secret[1] not in made.stdout + made.stderr

    # -- a database with data is refused, and nothing changes in it.
    ring_before = (source_dir / "number_keys.json").read_bytes()
    refused = cli("restore", str(archive), env=source_env)
    assert refused.returncode == 1
    assert "not empty" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (source_dir / "number_keys.json").read_bytes() == ring_before
    with posguard.Client(source.target, api_key=admin_token, timeout=10) as admin:
        assert _state(admin) == before

    # -- restore into an empty database and a fresh data directory, and serve it.
    restored_run = cli("restore", str(archive), env=target_env, timeout=90)
    assert restored_run.returncode == 0, restored_run.stderr
    ring_file = target_dir / "number_keys.json"
    assert ring_file.read_bytes() == ring_before
    assert stat.S_IMODE(ring_file.stat().st_mode) == 0o600

    restored = server_factory(database_url=target_url, data_dir=target_dir)
    with (
        posguard.Client(restored.target, api_key=admin_token, timeout=10) as admin,  # the old key works
        posguard.Client(restored.target, api_key=gateway_token, timeout=10) as gateway,
    ):
        assert _state(admin) == before  # customers, numbers, sub numbers, links, keys, models, audit events
        assert admin.verify_audit_log().intact
        assert [admin.verify_customer_id(number=number) for number in numbers] == verified
        assert verified[0].valid
        assert verified[1].primary_number == ada_number
        assert verified[3].successor_number == rotated.customer.primary.number
        with_holder = admin.get_customer(customer=Selector(number=ada_number), include_holder=True).customer
        assert (with_holder.holder.name, with_holder.holder.phone) == (holder.name, holder.phone)
        assert gateway.resolve_external_id(external_id=EXT(namespace="bank", value="a-1")).customer_id == (
            ada.customer.customer_id
        )
        replay = gateway.redeem_dynamic_code(code=code, merchant_id="m-1")
        assert not replay.redeemed
        if time.time() - redeemed_at < PERIOD_SECONDS:  # still inside its window: refused as used
            assert replay.reason == customer_ids_pb2.REDEMPTION_REASON_ALREADY_USED
        ahead = posguard.dynamic_code(enrolled.secret, at=time.time() + PERIOD_SECONDS)
        assert gateway.redeem_dynamic_code(code=ahead, merchant_id="m-1").redeemed  # the secret decrypts

        for transaction, answer in scored.values():
            replayed = gateway.score_transaction(transaction=transaction)
            assert replayed.replayed
            assert _without_replayed(replayed) == _without_replayed(answer)
        listed = admin.list_models(active_only=True).models
        assert {model.version for model in listed} == {model.version for model in before["models"]}
        fresh = _transaction(
            "after-restore", 250_000, external_id=EXT(namespace="source", value=HISTORY_CUSTOMERS[1])
        )
        on_restored = gateway.score_transaction(transaction=fresh)
        assert on_restored.model.scope == risk_pb2.MODEL_SCOPE_CUSTOMER
        issued_after = gateway.issue_customer_id().customer  # ids and counters go on past the restored ones
        assert issued_after.primary.number not in {c.primary.number for c in before["customers"]}

    # The same new transaction on the source, in the same state, gets the same answer from the same model.
    with posguard.Client(source.target, api_key=gateway_token, timeout=10) as gateway:
        on_source = gateway.score_transaction(transaction=fresh)
    assert (on_source.risk_score, on_source.decision, on_source.model) == (
        on_restored.risk_score,
        on_restored.decision,
        on_restored.model,
    )
    audit = cli("audit", "verify", env=target_env)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    checked = re.search(r"intact: (\d+) events checked", audit.stdout)
    assert checked is not None, audit.stdout
    assert int(checked.group(1)) > len(before["audit"])  # the restored chain, and the events added since
    database = Database(target_url)
    try:
        with database.session(read_only=True) as session:
            assert (
                session.scalar(select(func.count()).select_from(SqlRiskTransaction))
                == counts["risk_transactions"] + 1
            )
    finally:
        database.dispose()


def test_a_backup_under_concurrent_writes_is_one_snapshot(
    database_url: str, target_url: str, tmp_path: Path, server_factory: Callable[..., RunningServer], cli: Cli
) -> None:
    """Customers issued one after another while the backup runs: it holds exactly the first k, with their
    audit events and links, never a customer without its event or the other way round."""
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    upgrade(database_url)
    source = server_factory(database_url=database_url, data_dir=source_dir)
    gateway_token, admin_token = source.key(Role.GATEWAY), source.key(Role.ADMIN)
    issued: list[str] = []
    stop = threading.Event()

    def issue() -> None:
        with posguard.Client(source.target, api_key=gateway_token, timeout=10) as client:
            while not stop.is_set():
                external = EXT(namespace="crm", value=str(len(issued)))
                issued.append(client.issue_customer_id(external_ids=[external]).customer.customer_id)

    writer = threading.Thread(target=issue)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while len(issued) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        at_start = len(issued)
        made = cli("backup", str(tmp_path / "busy.zip"), env=_env(database_url, source_dir))
        at_end = len(issued)
    finally:
        stop.set()
        writer.join(timeout=20)
    assert made.returncode == 0, made.stderr
    assert at_end > at_start >= 5  # writers were not held up by the backup

    restore(Settings(database_url=target_url, data_dir=target_dir), tmp_path / "busy.zip")
    restored = server_factory(database_url=target_url, data_dir=target_dir)
    with posguard.Client(restored.target, api_key=admin_token, timeout=10) as admin:
        customers = [c.customer_id for c in _all_pages(admin.list_customers, "customers")]
        events = _all_pages(admin.list_audit_events, "events", action="customer.issued")
        assert admin.verify_audit_log().intact
        assert at_start <= len(customers) <= len(issued)
        assert sorted(customers) == sorted(issued[: len(customers)])
        assert len(events) == len(customers)
        last = len(customers) - 1
        assert (
            admin.resolve_external_id(external_id=EXT(namespace="crm", value=str(last))).customer_id
            == (issued[last])
        )


def _rewrite(archive: Path, out: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """A well-formed ZIP with members changed by ``change``, or left out where it returns None (its CRCs
    right, so only our checks notice)."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            changed = change(info.filename, source.read(info.filename))
            if changed is not None:
                target.writestr(info.filename, changed)


def _flip_byte_inside(archive: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(archive) as opened:
        offset = opened.getinfo(member).header_offset
    data = bytearray(archive.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length + 3] ^= 0xFF
    out.write_bytes(bytes(data))


def test_a_damaged_archive_or_another_key_ring_is_refused_and_changes_nothing(
    database_url: str, target_url: str, tmp_path: Path, cli: Cli
) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    upgrade(database_url)
    source = Settings(database_url=database_url, data_dir=source_dir)
    target = Settings(database_url=target_url, data_dir=target_dir)
    database = Database(database_url)
    try:
        SqlAuditStore(database).append(
            actor="test", action="number_key.rotated", subject="version 2", details={}, now=datetime.now(UTC)
        )
    finally:
        database.dispose()
    keyring.save(keyring.new_ring().rotated(), source.number_key_file)  # a ring of two versions
    archive = tmp_path / "good.zip"
    assert backup(source, archive).key_versions == (1, 2)
    with pytest.raises(BackupError, match="already exists"):
        backup(source, archive)  # a backup never replaces a file

    damaged: dict[str, Path] = {}
    damaged["flipped"] = tmp_path / "flipped.zip"
    _flip_byte_inside(archive, "tables/audit_events.jsonl", damaged["flipped"])
    damaged["truncated"] = tmp_path / "truncated.zip"
    damaged["truncated"].write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    damaged["tampered"] = tmp_path / "tampered.zip"
    _rewrite(
        archive,
        damaged["tampered"],
        lambda name, data: (
            data.replace(b"number_key.rotated", b"number_key.removed") if "audit" in name else data
        ),
    )
    damaged["other keys"] = tmp_path / "other-keys.zip"

    def other_ring(name: str, data: bytes) -> bytes:
        if name != "number_keys.json":
            return data
        return keyring.to_settings(keyring.new_ring().rotated()).encode()

    _rewrite(archive, damaged["other keys"], other_ring)
    for problem, path in damaged.items():
        with pytest.raises(BackupError, match="damaged") as refused:
            restore(target, path)
        assert "nothing was changed" in str(refused.value), problem
        assert not target_dir.exists(), problem  # no key ring written, no database file made
    on_the_command_line = cli("restore", str(damaged["flipped"]), env=_env(target_url, target_dir))
    assert on_the_command_line.returncode == 1
    assert "damaged" in on_the_command_line.stderr
    assert "Traceback" not in on_the_command_line.stderr

    # A data directory that already has another ring keeps it, and the database stays untouched.
    other = keyring.new_ring()
    keyring.save(other, target.number_key_file)
    with pytest.raises(BackupError, match="different number key ring"):
        restore(target, archive)
    assert keyring.load(target.number_key_file).keys == other.keys
    assert sorted(path.name for path in target_dir.iterdir()) == ["number_keys.json"]
    restored = Database(target_url)
    try:
        assert current_revision(restored.engine) is None

        target.number_key_file.unlink()
        assert restore(target, archive).key_ring.startswith("written")
        assert keyring.load(target.number_key_file).keys == keyring.load(source.number_key_file).keys
        report = SqlAuditStore(restored).verify()
        assert (report.intact, report.entries_checked) == (True, 1)
    finally:
        restored.dispose()


def test_a_backup_of_an_older_schema_is_restored_through_its_revision_then_migrated(
    database_url: str, target_url: str, tmp_path: Path
) -> None:
    """An archive from the release before the shadow-score columns, into a database already at head."""
    upgrade(database_url)
    source = Settings(database_url=database_url, data_dir=tmp_path / "source")
    database = Database(database_url)
    try:
        key, token = create_key(SqlApiKeyStore(database), name="ops", role=Role.ADMIN, created_by="test")
    finally:
        database.dispose()
    keyring.save(keyring.new_ring(), source.number_key_file)
    current = tmp_path / "current.zip"
    backup(source, current)

    # What revisions after 0005 added, read from the migrations themselves: an archive made at 0005 lacks it.
    then, now = _schema_at("0005", tmp_path / "at-0005.db"), _schema_at("head", tmp_path / "at-head.db")
    tables_added_later = now.keys() - then.keys()
    added_later = {table: now[table] - columns for table, columns in then.items() if now[table] - columns}
    assert tables_added_later  # the test has something to drop
    assert added_later

    def as_0005(name: str, data: bytes) -> bytes | None:
        if name in {table_member(table) for table in tables_added_later}:
            return None
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["schema_revision"] = "0005"
        manifest["tables"] = [t for t in manifest["tables"] if t["name"] not in tables_added_later]
        for table in manifest["tables"]:
            if table["name"] in added_later:
                assert table["rows"] == 0
                dropped = added_later[table["name"]]
                table["columns"] = [column for column in table["columns"] if column not in dropped]
        return json.dumps(manifest).encode()

    older = tmp_path / "older.zip"
    _rewrite(current, older, as_0005)
    upgrade(target_url)  # an operator ran `db upgrade` (or started a server) before restoring
    target = Settings(database_url=target_url, data_dir=tmp_path / "target")
    summary = restore(target, older)
    assert (summary.schema_revision, summary.migrated_to) == ("0005", head_revision())
    restored = Database(target_url)
    try:
        assert current_revision(restored.engine) == head_revision()
        found = SqlApiKeyStore(restored).find_for_auth(key.key_id)
        assert found is not None
        parsed = parse_token(token)
        assert parsed is not None
        assert secret_matches(parsed[1], found[1])
        assert current_revision(restored.engine) == head_revision()
    finally:
        restored.dispose()
    with pytest.raises(BackupError, match="not empty"):
        restore(target, older)


def _schema_at(revision: str, path: Path) -> dict[str, set[str]]:
    """The tables of the schema at ``revision``, each with its columns (on a scratch SQLite file)."""
    url = f"sqlite:///{path}"
    upgrade(url, revision)
    database = Database(url)
    try:
        inspector = inspect(database.engine)
        return {
            table: {column["name"] for column in inspector.get_columns(table)}
            for table in inspector.get_table_names()
            if table != "alembic_version"
        }
    finally:
        database.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_backup_moves_between_sqlite_and_postgresql(
    database_url: str, tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    """The embedded SQLite into PostgreSQL and back: bytes, timestamps, floats and ids survive both ways."""
    first = Settings(data_dir=tmp_path / "sqlite")
    source = server_factory(data_dir=first.data_dir)
    admin_token, gateway_token = source.key(Role.ADMIN), source.key(Role.GATEWAY)
    with (
        posguard.Client(source.target, api_key=admin_token, timeout=10) as admin,
        posguard.Client(source.target, api_key=gateway_token, timeout=10) as gateway,
    ):
        holder = customer_ids_pb2.Holder(name="Grace Hopper", phone="+1 555 0100")
        number = admin.issue_customer_id(holder=holder).customer.primary.number
        admin.enroll_dynamic_codes(number=number)
        transaction = _transaction("t-1", 12_345, customer_number=number)
        scored = gateway.score_transaction(transaction=transaction)
        before = _state(admin)
    source.stop()
    backup(first, tmp_path / "from-sqlite.zip")

    on_postgresql = Settings(database_url=database_url, data_dir=tmp_path / "postgresql")
    restore(on_postgresql, tmp_path / "from-sqlite.zip")
    backup(on_postgresql, tmp_path / "from-postgresql.zip")
    back = Settings(data_dir=tmp_path / "sqlite-again")
    restore(back, tmp_path / "from-postgresql.zip")

    for settings in (on_postgresql, back):
        served = server_factory(database_url=settings.database_url, data_dir=settings.data_dir)
        with (
            posguard.Client(served.target, api_key=admin_token, timeout=10) as admin,
            posguard.Client(served.target, api_key=gateway_token, timeout=10) as gateway,
        ):
            assert _state(admin) == before
            customer = admin.get_customer(customer=Selector(number=number), include_holder=True).customer
            assert (customer.holder.name, customer.holder.phone) == (holder.name, holder.phone)
            code = gateway.issue_dynamic_code(number=number).code  # the enrolment's secret decrypts
            assert gateway.redeem_dynamic_code(code=code, merchant_id="m-1").redeemed
            replayed = gateway.score_transaction(transaction=transaction)
            assert replayed.replayed
            assert _without_replayed(replayed) == _without_replayed(scored)
            admin.issue_customer_id()  # new ids after the restored ones
        served.stop()
