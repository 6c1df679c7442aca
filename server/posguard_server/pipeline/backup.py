"""Backup and restore: one archive with every table, the number key ring and a manifest.

The archive is a logical dump, not a copy of database files, so that it does not depend on the backend: a
backup of the embedded SQLite file restores into PostgreSQL (the way from a trial to production) and back,
and it can be checked member by member before anything is written. It is a ZIP file (the standard library
reads and writes it, and every member carries its own CRC-32)::

    manifest.json            format version, schema revision, time, per table: columns, rows, SHA-256
    number_keys.json         the number key ring, in the key file's own format
    tables/<table>.jsonl     one JSON array per row, columns in the manifest's order, ordered by primary key

Values that JSON has no type for are tagged: ``{"b": base64}`` for bytes, ``{"t": ISO 8601 UTC}`` for
timestamps, ``{"f": "inf"}`` for non-finite floats. Model artifacts live in the database (the registry's
``artifact`` column), so the tables are all the state there is besides the key ring.

Consistency: every table is read inside one transaction that sees one snapshot, while servers go on serving
(PostgreSQL: REPEATABLE READ, READ ONLY, as pg_dump does; SQLite in WAL mode: a deferred read transaction,
which sees the database as of its first read and blocks no writer). The key ring is read after the snapshot
is fixed: rotation only ever adds key versions, so the ring is at least as new as any number in the dump.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, Integer, MetaData, Table, bindparam, cast, func, insert, inspect, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import REGCLASS
from sqlalchemy.engine import make_url

from posguard_server.config import Settings
from posguard_server.domain import keyring
from posguard_server.domain.keyring import KeyRing
from posguard_server.store.db import Database, normalize_url
from posguard_server.store.migrate import alembic_config, migration_connection, upgrade
from posguard_server.store.tables import METADATA

FORMAT: Final = "posguard-backup"
FORMAT_VERSION: Final = 1
MANIFEST_MEMBER: Final = "manifest.json"
KEY_RING_MEMBER: Final = "number_keys.json"
# Alembic's bookkeeping: the manifest records the revision instead, and restore migrates to it.
_ALEMBIC_TABLE: Final = "alembic_version"
# Rows per read, per insert statement and per hashed chunk: bounded memory whatever the table size.
_BATCH: Final = 1000
_READ_CHUNK: Final = 1 << 20


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and never holds a value of a row."""


# -- the manifest ------------------------------------------------------------------------------------------


class TableEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    columns: list[str] = Field(min_length=1)
    rows: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class KeyRingEntry(BaseModel):
    """What the ring holds, for a person reading the manifest; the keys are only in their own member."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    versions: list[int]
    current: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    format_version: int
    created_at: AwareDatetime
    posguard_version: str
    schema_revision: str
    source_database: str
    # In foreign-key order: a restore inserts them in this order.
    tables: list[TableEntry]
    key_ring: KeyRingEntry | None


def table_member(name: str) -> str:
    return f"tables/{name}.jsonl"


@dataclass(frozen=True, slots=True)
class BackupSummary:
    path: Path
    schema_revision: str
    tables: int
    rows: int
    key_versions: tuple[int, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class RestoreSummary:
    schema_revision: str
    migrated_to: str
    tables: int
    rows: int
    key_ring: str
    seconds: float


# -- backup ------------------------------------------------------------------------------------------------


def backup(settings: Settings, path: Path) -> BackupSummary:
    """Write the database and the number key ring of ``settings`` to a new archive at ``path`` (mode 0600)."""
    started = time.perf_counter()
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise BackupError(f"{path} already exists: back up to a new file")
    if not path.parent.is_dir():
        raise BackupError(f"the directory {path.parent} does not exist")
    url = settings.effective_database_url
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        # Opening it would create an empty database; there is nothing to back up.
        raise BackupError(f"there is no database at {sqlite_file}")
    database = Database(url, pool_size=1, max_overflow=0)
    try:
        manifest = _write_archive(database, settings, path)
    finally:
        database.dispose()
    return BackupSummary(
        path=path,
        schema_revision=manifest.schema_revision,
        tables=len(manifest.tables),
        rows=sum(entry.rows for entry in manifest.tables),
        key_versions=tuple(manifest.key_ring.versions) if manifest.key_ring else (),
        seconds=time.perf_counter() - started,
    )


def _write_archive(database: Database, settings: Settings, path: Path) -> Manifest:
    # Written under a temporary name and published complete: a failed or interrupted backup never leaves a
    # truncated archive that looks like a backup. mkstemp creates the file 0600, before any byte is in it.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name != "nt":
            os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                manifest = _dump(database, settings, archive)
                archive.writestr(MANIFEST_MEMBER, manifest.model_dump_json(indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _publish(Path(temporary), path)
        return manifest
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _publish(temporary: Path, path: Path) -> None:
    try:
        # A link fails when the name exists, so a file that appeared meanwhile is never replaced.
        os.link(temporary, path)
    except FileExistsError:
        raise BackupError(f"{path} already exists: back up to a new file") from None
    except OSError:
        # No hard links on this file system: a rename, after checking again.
        if path.exists():
            raise BackupError(f"{path} already exists: back up to a new file") from None
        os.replace(temporary, path)
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _snapshot_options(dialect: str) -> dict[str, Any]:
    if dialect == "postgresql":
        # One snapshot for every table, taken at the first statement; READ ONLY so it takes no write lock.
        return {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    # SQLite: the read-only session begins a deferred transaction; in WAL mode that is a snapshot.
    return {}


def _dump(database: Database, settings: Settings, archive: zipfile.ZipFile) -> Manifest:
    created_at = datetime.now(UTC)
    tables = list(METADATA.sorted_tables)
    with database.session(read_only=True) as session:
        connection = session.connection(execution_options=_snapshot_options(database.dialect))
        # The first read fixes the snapshot; everything below, the revision included, comes from it.
        revision = MigrationContext.configure(connection).get_current_revision()
        head = _revisions()[-1]
        if revision != head:
            raise BackupError(
                f"the database schema is at revision {revision or 'none'}, not {head} as this posguard"
                " expects: run `posguard-server db upgrade` (or back up with the release that matches it)"
            )
        ring = _configured_ring(settings)
        if ring is None and connection.scalar(select(func.count()).select_from(METADATA.tables["customers"])):
            raise BackupError(
                f"no number key ring at {settings.number_key_file} (nor in POSGUARD_NUMBER_KEYS), but the"
                " database has customers: without the ring their numbers and holder details cannot be used"
            )
        entries = [_dump_table(connection, table, archive) for table in tables]
    key_entry = None
    if ring is not None:
        ring_text = keyring.to_settings(ring).encode("utf-8")
        archive.writestr(KEY_RING_MEMBER, ring_text)
        key_entry = KeyRingEntry(
            versions=sorted(ring.keys), current=ring.current, sha256=hashlib.sha256(ring_text).hexdigest()
        )
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        created_at=created_at,
        posguard_version=_posguard_version(),
        schema_revision=revision,
        source_database=database.dialect,
        tables=entries,
        key_ring=key_entry,
    )


def _posguard_version() -> str:
    try:
        return metadata.version("posguard")
    except metadata.PackageNotFoundError:
        return "unknown"


def _configured_ring(settings: Settings) -> KeyRing | None:
    """The ring servers use (the setting wins over the file, as at start), or None if there is none yet."""
    try:
        if settings.number_keys is not None:
            return keyring.from_settings(settings.number_keys.get_secret_value())
        return keyring.load(settings.number_key_file)
    except FileNotFoundError:
        return None
    except ValueError as error:  # wrong mode or malformed; the message names the file, never a key
        raise BackupError(str(error)) from None


def _dump_table(connection: Connection, table: Table, archive: zipfile.ZipFile) -> TableEntry:
    digest = hashlib.sha256()
    rows = 0
    # Primary-key order makes the dump reproducible and inserts self-references after what they point to.
    statement = select(table).order_by(*table.primary_key.columns).execution_options(yield_per=_BATCH)
    with archive.open(table_member(table.name), "w", force_zip64=True) as member:
        for partition in connection.execute(statement).partitions():
            chunk = "".join(_encode_row(row) + "\n" for row in partition).encode("utf-8")
            digest.update(chunk)
            member.write(chunk)
            rows += len(partition)
    return TableEntry(
        name=table.name,
        columns=[column.name for column in table.columns],
        rows=rows,
        sha256=digest.hexdigest(),
    )


def _encode_row(row: Sequence[Any]) -> str:
    return json.dumps([_encode(value) for value in row], ensure_ascii=False, separators=(",", ":"))


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, bytes | memoryview):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        # Naive values come from SQLite, which stores UTC without an offset (see schema.UTCDateTime).
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return {"t": aware.astimezone(UTC).isoformat()}
    raise BackupError(f"cannot back up a value of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((tag, payload),) = value.items()
        if tag == "b" and isinstance(payload, str):
            return base64.b64decode(payload, validate=True)
        if tag == "t" and isinstance(payload, str):
            moment = datetime.fromisoformat(payload)
            if moment.tzinfo is None:
                raise ValueError("a timestamp without a time zone")
            return moment
        if tag == "f" and isinstance(payload, str):
            return float(payload)
    if isinstance(value, dict | list):
        raise ValueError("an unknown value tag")
    return value


# -- restore -----------------------------------------------------------------------------------------------


def restore(settings: Settings, path: Path) -> RestoreSummary:
    """Restore the archive at ``path`` into the empty database and data directory of ``settings``.

    Everything is checked before anything is written: the archive (checksums, row counts, schema revision),
    the key ring against one already configured, and that the database holds no data. Then the ring is
    written, the schema is brought to the backup's revision, every table is loaded in one transaction and
    counted again, and the schema is migrated to this release's head.
    """
    started = time.perf_counter()
    with _reading(path), zipfile.ZipFile(path) as archive:
        manifest, ring = _verified(archive)
        ring_action = _check_ring(settings, ring)
        url = settings.effective_database_url
        database = Database(url, pool_size=1, max_overflow=0)
        try:
            current = _require_empty(database)
            if ring is not None and ring_action == "written":
                # Before the tables: a database with numbers but no ring would make a starting server
                # create a fresh ring, under which none of the restored numbers verify.
                keyring.save(ring, settings.number_key_file)
            _migrate(database, url, current, manifest.schema_revision)
            rows = _load(database, archive, manifest)
        finally:
            database.dispose()
    head = _revisions()[-1]
    upgrade(url, head)
    action = {
        "written": f"written to {settings.number_key_file} (mode 0600)",
        "present": f"already at {settings.number_key_file}",
        "configured": "the same as POSGUARD_NUMBER_KEYS",
        "none": "none in the backup",
    }[ring_action]
    return RestoreSummary(
        schema_revision=manifest.schema_revision,
        migrated_to=head,
        tables=len(manifest.tables),
        rows=rows,
        key_ring=action,
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged archive is one clear error, whichever layer (ZIP, deflate, JSON, our checks) notices."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BackupError(f"{path} is damaged ({type(error).__name__}); nothing was changed") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise BackupError(f"{path} has an invalid manifest ({problems}); nothing was changed") from None


def _verified(archive: zipfile.ZipFile) -> tuple[Manifest, KeyRing | None]:
    """The manifest and ring of an archive whose every member matches its checksum and row count."""
    names = set(archive.namelist())
    if MANIFEST_MEMBER not in names:
        raise BackupError("not a posguard backup: it has no manifest")
    raw = json.loads(archive.read(MANIFEST_MEMBER))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BackupError("not a posguard backup: its manifest names another format")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"backup format version {raw.get('format_version')!r} is not supported by this posguard"
            f" (it reads version {FORMAT_VERSION})"
        )
    manifest = Manifest.model_validate(raw)
    known = _revisions()
    if manifest.schema_revision not in known:
        raise BackupError(
            f"the backup is of schema revision {manifest.schema_revision}, which this posguard (head"
            f" {known[-1]}) does not know: restore it with the release that made it, or a newer one"
        )
    expected = {MANIFEST_MEMBER, *(table_member(entry.name) for entry in manifest.tables)}
    if manifest.key_ring is not None:
        expected.add(KEY_RING_MEMBER)
    if len({entry.name for entry in manifest.tables}) != len(manifest.tables):
        raise BackupError("damaged: the manifest lists a table twice")
    if names != expected:
        raise BackupError(f"damaged: members {sorted(names ^ expected)} differ from what the manifest lists")
    for entry in manifest.tables:
        digest = hashlib.sha256()
        lines = 0
        with archive.open(table_member(entry.name)) as member:
            while chunk := member.read(_READ_CHUNK):
                digest.update(chunk)
                lines += chunk.count(b"\n")
        if digest.hexdigest() != entry.sha256:
            raise BackupError(f"damaged: table {entry.name} does not match its checksum; nothing was changed")
        if lines != entry.rows:
            raise BackupError(f"damaged: table {entry.name} has {lines} rows, the manifest says {entry.rows}")
    if manifest.key_ring is None:
        return manifest, None
    ring_bytes = archive.read(KEY_RING_MEMBER)
    if hashlib.sha256(ring_bytes).hexdigest() != manifest.key_ring.sha256:
        raise BackupError("damaged: the number key ring does not match its checksum; nothing was changed")
    try:
        ring = keyring.from_settings(ring_bytes.decode("utf-8"))
    except ValueError as error:  # the message describes the problem, never the key material
        raise BackupError(f"damaged: {error}") from None
    if sorted(ring.keys) != manifest.key_ring.versions or ring.current != manifest.key_ring.current:
        raise BackupError("damaged: the number key ring differs from what the manifest says it holds")
    return manifest, ring


def _same_ring(first: KeyRing, second: KeyRing) -> bool:
    return first.current == second.current and dict(first.keys) == dict(second.keys)


def _check_ring(settings: Settings, ring: KeyRing | None) -> str:
    """What restore does with the ring: "written", "present", "configured" or "none"; refuses another."""
    if ring is None:
        return "none"
    try:
        if settings.number_keys is not None:
            if not _same_ring(keyring.from_settings(settings.number_keys.get_secret_value()), ring):
                raise BackupError(
                    "POSGUARD_NUMBER_KEYS holds a different number key ring than the backup: put the"
                    f" backup's ring ({KEY_RING_MEMBER} in the archive) into the secret store first;"
                    " nothing was changed"
                )
            return "configured"
        existing = keyring.load(settings.number_key_file)
    except FileNotFoundError:
        return "written"
    except ValueError as error:
        raise BackupError(f"{error}; nothing was changed") from None
    if not _same_ring(existing, ring):
        raise BackupError(
            f"{settings.number_key_file} holds a different number key ring than the backup, and it is not"
            " replaced: restore into a fresh data directory; nothing was changed"
        )
    return "present"


def _require_empty(database: Database) -> str | None:
    """The schema revision of a database without data (None if never migrated); refuses any other."""
    with database.session(read_only=True) as session:
        connection = session.connection()
        revision = MigrationContext.configure(connection).get_current_revision()
        tables = [name for name in inspect(connection).get_table_names() if name != _ALEMBIC_TABLE]
        if revision is None:
            if tables:
                raise BackupError(
                    f"the database has tables ({', '.join(sorted(tables))}) but no posguard schema revision:"
                    " restore only into an empty database; nothing was changed"
                )
            return None
        if revision not in _revisions():
            raise BackupError(
                f"the database is at schema revision {revision}, which this posguard does not know;"
                " nothing was changed"
            )
        _refuse_data(connection, _seed_rows(revision))
    return revision


def _refuse_data(connection: Connection, seeds: Mapping[str, tuple[str, ...]]) -> MetaData:
    """Refuse unless every table holds only what migrating a new database puts there; return the tables."""
    reflected = MetaData()
    reflected.reflect(connection)
    problems: list[str] = []
    for table in reflected.sorted_tables:
        if table.name == _ALEMBIC_TABLE:
            continue
        count = int(connection.scalar(select(func.count()).select_from(table)) or 0)
        seeded = seeds.get(table.name, ())
        if count and (count > len(seeded) or _comparable_rows(connection, table) != seeded):
            problems.append(f"{table.name} ({count} rows)")
    if problems:
        raise BackupError(
            f"the database is not empty: {', '.join(problems)}. Restore only into an empty database;"
            " nothing was changed"
        )
    return reflected


def _comparable_rows(connection: Connection, table: Table) -> tuple[str, ...]:
    return tuple(
        sorted(
            json.dumps({key: _encode(value) for key, value in row.items()}, sort_keys=True)
            for row in connection.execute(select(table)).mappings()
        )
    )


@lru_cache(maxsize=4)
def _seed_rows(revision: str) -> dict[str, tuple[str, ...]]:
    """The rows migrations put into a new database at ``revision`` (such as the audit log's genesis head).

    Found by migrating a scratch SQLite file, so "empty" keeps meaning "as freshly migrated" whatever later
    migrations seed.
    """
    with tempfile.TemporaryDirectory(prefix="posguard-seed-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'seed.db'}"
        upgrade(url, revision)
        database = Database(url, pool_size=1, max_overflow=0)
        try:
            with database.session(read_only=True) as session:
                connection = session.connection()
                reflected = MetaData()
                reflected.reflect(connection)
                seeds = {
                    table.name: _comparable_rows(connection, table)
                    for table in reflected.sorted_tables
                    if table.name != _ALEMBIC_TABLE
                }
        finally:
            database.dispose()
    return {name: rows for name, rows in seeds.items() if rows}


def _revisions() -> list[str]:
    """Every revision this posguard knows, oldest first (the history is linear)."""
    return [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()][
        ::-1
    ]


def _migrate(database: Database, url: str, current: str | None, target: str) -> None:
    """Bring the (empty) database to ``target``, down if a newer release migrated it already."""
    if current == target:
        return
    order = _revisions()
    if current is None or order.index(current) < order.index(target):
        upgrade(url, target)
        return
    with migration_connection(database) as connection:
        command.downgrade(alembic_config(connection), target)


def _load(database: Database, archive: zipfile.ZipFile, manifest: Manifest) -> int:
    """Insert every row in one transaction, count again, and move PostgreSQL's id sequences past the ids."""
    sqlite = database.dialect == "sqlite"
    total = 0
    # On SQLite the engine begins with BEGIN IMMEDIATE: the write lock is held from the first statement.
    with database.engine.connect() as connection, connection.begin():
        if not sqlite:
            _lock_all(connection)
        reflected = _refuse_data(connection, _seed_rows(manifest.schema_revision))
        tables = {table.name: table for table in reflected.sorted_tables if table.name != _ALEMBIC_TABLE}
        entries = {entry.name: entry for entry in manifest.tables}
        # Tables of other applications may share the database; they were just found empty and stay so.
        missing = sorted(set(entries) - set(tables))
        if missing:
            raise BackupError(
                f"the backup has tables that schema revision {manifest.schema_revision} does not:"
                f" {', '.join(missing)}; nothing was restored"
            )
        for name in _seed_rows(manifest.schema_revision):
            # The backup holds these rows as the source had them (the audit head, for one).
            connection.execute(tables[name].delete())
        for table in reflected.sorted_tables:
            if table.name not in entries:
                continue
            entry = entries[table.name]
            _load_table(connection, table, entry, archive, sqlite=sqlite)
            stored = int(connection.scalar(select(func.count()).select_from(table)) or 0)
            if stored != entry.rows:
                raise BackupError(
                    f"table {table.name} holds {stored} rows after loading, the backup {entry.rows};"
                    " nothing was restored"
                )
            total += stored
        if not sqlite:
            _reset_sequences(connection, [tables[name] for name in entries])
    return total


def _lock_all(connection: Connection) -> None:
    # Nothing may write between the emptiness check and the commit; the lock ends with the transaction.
    preparer = connection.dialect.identifier_preparer
    names = [name for name in inspect(connection).get_table_names() if name != _ALEMBIC_TABLE]
    if names:
        listed = ", ".join(preparer.quote(name) for name in names)
        connection.exec_driver_sql(f"LOCK TABLE {listed} IN ACCESS EXCLUSIVE MODE")


def _load_table(
    connection: Connection, table: Table, entry: TableEntry, archive: zipfile.ZipFile, *, sqlite: bool
) -> None:
    if set(entry.columns) != set(table.columns.keys()):
        raise BackupError(
            f"table {table.name}: the backup's columns differ from schema revision's"
            f" ({sorted(set(entry.columns) ^ set(table.columns.keys()))}); nothing was restored"
        )
    # A column pointing into its own table (a model and the one it replaced) is filled in afterwards, so no
    # row has to wait for another in the same table.
    later = [
        fk.parent.name
        for fk in table.foreign_keys
        if fk.column.table is table and fk.parent.nullable and not fk.parent.primary_key
    ]
    keys = [column.name for column in table.primary_key.columns]
    deferred: dict[str, list[dict[str, Any]]] = {name: [] for name in later}
    statement = insert(table)
    try:
        for batch in _rows(archive, entry, sqlite=sqlite):
            for row in batch:
                for name in later:
                    if row[name] is not None:
                        deferred[name].append({f"k_{key}": row[key] for key in keys} | {"v_value": row[name]})
                        row[name] = None
            connection.execute(statement, batch)
        where = [table.c[key] == bindparam(f"k_{key}") for key in keys]
        for name, updates in deferred.items():
            if updates:
                connection.execute(table.update().where(*where).values({name: bindparam("v_value")}), updates)
    except sa_exc.DBAPIError as error:
        # Only the driver's exception type: its message can quote the rows (numbers, key digests).
        failure = type(error.orig).__name__ if error.orig is not None else type(error).__name__
        raise BackupError(
            f"the database refused the rows of table {table.name} ({failure}); nothing was restored"
        ) from None


def _rows(archive: zipfile.ZipFile, entry: TableEntry, *, sqlite: bool) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    width = len(entry.columns)
    with archive.open(table_member(entry.name)) as raw, io.TextIOWrapper(raw, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                values = json.loads(line)
                if not isinstance(values, list) or len(values) != width:
                    raise ValueError(f"expected {width} values")
                decoded = [_decode(value) for value in values]
            except ValueError as error:  # JSONDecodeError included; neither message quotes the row
                raise BackupError(
                    f"table {entry.name}, row {number}: {error}; nothing was restored"
                ) from None
            if sqlite:
                # The UTC convention of schema.UTCDateTime: naive UTC text, so text order is time order.
                decoded = [
                    value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) else value
                    for value in decoded
                ]
            batch.append(dict(zip(entry.columns, decoded, strict=True)))
            if len(batch) >= _BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _reset_sequences(connection: Connection, tables: Sequence[Table]) -> None:
    """Move each id sequence (serial or identity) to the largest restored id, so new rows get new ids.

    Inserting explicit ids does not advance a PostgreSQL sequence; SQLite takes max(id) + 1 by itself.
    """
    preparer = connection.dialect.identifier_preparer
    for table in tables:
        for column in table.columns:
            if not isinstance(column.type, Integer):
                continue
            sequence = connection.scalar(
                select(func.pg_get_serial_sequence(preparer.format_table(table), column.name))
            )
            if sequence is None:
                continue
            largest = func.max(column)
            connection.execute(
                select(
                    func.setval(cast(sequence, REGCLASS), func.coalesce(largest, 1), largest.is_not(None))
                ).select_from(table)
            )


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)
