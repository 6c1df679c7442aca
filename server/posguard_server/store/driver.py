"""SQLAlchemy Core statements run through the database driver itself (sqlite3, psycopg), for the gateway hot
paths.

On a lone score SQLAlchemy's own work was most of the writer's time: on SQLite about 100 µs of CPU to begin
and commit a Core transaction (pool check-out, reset, events) against 5 µs through the driver, and 25–45 µs to
execute an indexed one-row statement against 5 µs; on PostgreSQL a transaction of five indexed reads took
650–720 µs of CPU through Core against 350–420 µs through psycopg (measured in isolation).
``DriverConnection`` keeps the Core statements as the one definition of each statement and runs them on a
driver connection: each statement is compiled once for its database, with its parameters' bind processors
and its columns' result processors taken from SQLAlchemy's types (so a value is written and read back
exactly as a Core execution would), and the driver keeps the prepared statements (psycopg prepares a
statement on the server once it has run a few times).

It serves ``Database.statements_unit`` (the scoring unit, redemptions, verifications, IssueCustomerId, and
the read-only units of customer look-ups and dynamic-code issues), and supports what they use: SELECTs (rows
with the columns' names as attributes), INSERT and UPDATE with one set of parameters or many (``rowcount``
summed; psycopg sends many in one pipeline), expanding ``IN`` lists, and SQL written for the driver
(``execute_sql``). An ``IN`` list is padded to a power of two by repeating its last value, which
changes no result and keeps the number of distinct statement texts small.

A unit sends the statements of one step together (``DriverConnection.together``): on PostgreSQL they are
queued in psycopg's pipeline mode and travel in one round trip, and their results are read when the step
reads them (``Later``). Each statement sent alone would be a round trip of its own: a scoring batch made
eleven, which is what one writer per process waits for when the database is on another machine.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar, cast

from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, CompoundSelect, Select
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, ValuesBase

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy import Connection

# What the gateway units' statements run on: a Core connection, or this module's.
Runs: TypeAlias = "Connection | DriverConnection"

SQLITE: Dialect = SQLiteDialect_pysqlite()
# Positional parameters (``%s``), as sqlite3's are (``?``): the statement's values go in one list.
POSTGRESQL: Dialect = PGDialect_psycopg(paramstyle="format")  # type: ignore[no-untyped-call]
_PLACEHOLDERS = {"qmark": "?", "format": "%s"}
_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")
# A list with no values: ``x IN (SELECT NULL WHERE 1 = 0)`` is false and ``x NOT IN (...)`` true, as they
# must be, in both databases' SQL.
_EMPTY_LIST = "SELECT NULL WHERE 1 = 0"

_T = TypeVar("_T")
_Processor = Callable[[Any], Any] | None
# One set of parameters, or many (an executemany).
_Parameters = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def executemany(self, sql: Any, parameters: Any, /) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class DriverConnectionLike(Protocol):
    """What both drivers' connections offer: ``sqlite3.Connection`` and ``psycopg.Connection``."""

    def execute(self, sql: Any, parameters: Any, /) -> Any: ...

    def cursor(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement compiled once: its SQL in pieces around its expanding lists, and how to bind and read."""

    pieces: tuple[str, ...]  # len(expanding) + 1 texts: the SQL split at each expanding list
    placeholder: str  # the driver's for one value
    names: tuple[str, ...]  # the parameters in order; an expanding list's name stands for its values
    expanding: frozenset[str]
    defaults: Mapping[str, Any]  # values bound in the statement itself (``version + 1``)
    binds: Mapping[str, _Processor]
    row: _RowMakers | None  # a SELECT's row makers
    texts: dict[tuple[int, ...], str]  # the SQL by the padded sizes of its lists

    def sql(self, sizes: tuple[int, ...]) -> str:
        text = self.texts.get(sizes)
        if text is None:
            parts = [self.pieces[0]]
            for size, piece in zip(sizes, self.pieces[1:], strict=True):
                parts.append(", ".join([self.placeholder] * size) if size else _EMPTY_LIST)
                parts.append(piece)
            text = self.texts[sizes] = "".join(parts)
        return text


def _compile(statement: ClauseElement, keys: Sequence[str] | None, dialect: Dialect) -> _Compiled:
    # As an executemany, an INSERT asks for no generated key back (PostgreSQL would add RETURNING for it).
    compiled = cast(
        SQLCompiler,
        statement.compile(
            dialect=dialect,
            column_keys=list(keys) if keys is not None else None,
            for_executemany=isinstance(statement, Insert),
        ),
    )
    if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
        # A column default computed in Python per row; the scoring unit supplies every value instead.
        raise TypeError("a statement run through the driver must be given every defaulted column")
    if getattr(compiled, "returning", None):
        raise TypeError("RETURNING is not supported through the driver")
    positions = compiled.positiontup or []
    expanding = frozenset(name for name in positions if compiled.binds[name].expanding)
    # Each list's placeholder stands where the list's name is in the parameters' order.
    if _POSTCOMPILE.findall(compiled.string) != [name for name in positions if name in expanding]:
        raise TypeError("the expanding lists are not where their parameters are")
    # The dialect's own form of each type (its DATETIME writes and reads SQLite's text) does the converting.
    binds = {
        name: compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in positions
    }
    # Values the statement binds itself (``version + 1``); a parameter given by the caller wins.
    bound = [(name, compiled.binds[name]) for name in positions]
    defaults = {name: bind.effective_value for name, bind in bound if not bind.required}
    row = _RowMakers(statement, dialect) if isinstance(statement, (Select, CompoundSelect)) else None
    return _Compiled(
        tuple(_POSTCOMPILE.split(compiled.string)[::2]),
        _PLACEHOLDERS[dialect.paramstyle],
        tuple(positions),
        expanding,
        defaults,
        binds,
        row,
        {},
    )


class _RowMakers:
    """A SELECT's rows as named tuples, its columns' result processors applied.

    A processor may depend on the type the driver says a column has (psycopg's numeric types), so the maker
    is made for the types of the first result, and again only if a result comes with other types.
    """

    def __init__(self, statement: Select[Any] | CompoundSelect[Any], dialect: Dialect) -> None:
        self._columns = list(statement.selected_columns)
        names = [getattr(column, "key", None) or f"column_{n}" for n, column in enumerate(self._columns)]
        self._kind: Any = namedtuple("Row", names, rename=True)  # type: ignore[misc]  # one class a statement
        self._dialect = dialect
        self._makers: dict[tuple[Any, ...], Callable[[Sequence[Any]], Any]] = {}

    def for_result(self, description: Sequence[Sequence[Any]]) -> Callable[[Sequence[Any]], Any]:
        types = tuple(column[1] for column in description)  # DB-API: (name, type_code, ...)
        make = self._makers.get(types)
        if make is None:
            make = self._makers[types] = self._maker(types)
        return make

    def _maker(self, types: tuple[Any, ...]) -> Callable[[Sequence[Any]], Any]:
        dialect, kind = self._dialect, self._kind
        processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, type_code)
            for column, type_code in zip(self._columns, types, strict=True)
        ]
        if not any(processors):
            return kind._make  # type: ignore[no-any-return]

        def make(values: Sequence[Any]) -> Any:
            pairs = zip(processors, values, strict=True)
            return kind._make([value if p is None or value is None else p(value) for p, value in pairs])

        return make


def _padded(values: Sequence[Any]) -> list[Any]:
    size = len(values)
    if size == 0:
        return []
    target = 1 << (size - 1).bit_length()
    return [*values, *([values[-1]] * (target - size))]


class Later(Generic[_T]):
    """A value made from the results of statements already sent, once, when it is first asked for.

    A step of a unit sends its statements inside ``DriverConnection.together()`` and asks for the values
    after it: the statements then share one round trip on PostgreSQL. Asked for inside the block, a value is
    still right: reading a result sends what is queued and waits (one round trip more).
    """

    __slots__ = ("_make", "_value")

    _UNMADE: Any = object()

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._value: Any = Later._UNMADE

    @classmethod
    def known(cls, value: _T) -> Later[_T]:
        """A value that needed no statement."""
        later = cls(_no_make)
        later._value = value
        return later

    def get(self) -> _T:
        if self._value is Later._UNMADE:
            self._value = self._make()
        return cast(_T, self._value)


def _no_make() -> Any:
    raise AssertionError("a known value is made already")


class DriverResult:
    """What ``execute`` returns: the rows of a SELECT, or the rows a DML statement changed.

    A statement sent inside ``DriverConnection.together()`` on PostgreSQL is answered later: its rows and
    row count are read from its cursor when first asked for.
    """

    __slots__ = ("_pending", "_rowcount", "_rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._rowcount = rowcount
        self._pending: tuple[DriverConnection, Any, _RowMakers | None, int] | None = None

    @classmethod
    def sent(cls, owner: DriverConnection, cursor: Any, row: _RowMakers | None, batch: int) -> DriverResult:
        result = cls([], -1)
        result._pending = (owner, cursor, row, batch)
        return result

    def _answered(self) -> None:
        if self._pending is None:
            return
        owner, cursor, row, batch = self._pending
        self._pending = None
        owner.wait_for(batch)
        if row is None:
            self._rowcount = cursor.rowcount
        else:
            make = row.for_result(cursor.description)
            self._rows = [make(values) for values in cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        self._answered()
        return self._rowcount

    def __iter__(self) -> Iterator[Any]:
        self._answered()
        return iter(self._rows)

    def one(self) -> Any:
        self._answered()
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def one_or_none(self) -> Any:
        self._answered()
        if len(self._rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self._rows)}")
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        self._answered()
        return list(self._rows)


class DriverConnection:
    """Runs Core statements on one open driver connection (in a transaction its owner began and ends).

    ``dialect`` is ``SQLITE`` for a ``sqlite3`` connection, ``POSTGRESQL`` for a ``psycopg`` one.
    """

    def __init__(
        self, connection: DriverConnectionLike, dialect: Dialect = SQLITE, *, begin: Sequence[str] = ()
    ) -> None:
        self._connection = connection
        self.dialect = dialect
        self._pipeline: Any = None  # psycopg's Pipeline, inside together()
        self._batch = 0  # counts the pipeline's syncs: a result sent in the current batch is not in yet
        # ``begin``: statements (BEGIN, then any SET LOCAL) that begin the owner's transaction with its first
        # statement, sent just before it (in the same round trip inside together()); ``end`` ends it. The
        # connection is in autocommit.
        self._begin = tuple(begin)
        self._begun = False

    def _send_begin(self) -> None:
        self._begun = True
        for command in self._begin:
            self._connection.execute(command, None)

    def end(self, command: str) -> None:
        """``COMMIT`` or ``ROLLBACK`` the transaction ``begin`` began, if a statement began it."""
        if self._begun:
            self._begun = False
            self._connection.execute(command, None)

    @contextmanager
    def together(self) -> Iterator[None]:
        """Send the block's statements together, answered when it ends: on PostgreSQL in one round trip
        (psycopg's pipeline mode). An error of one of them is raised where the block ends, or where a result
        is read. sqlite3 runs each statement when it is given (no round trips to save)."""
        if self.dialect is SQLITE or self._pipeline is not None:
            yield
            return
        with cast("psycopg.Connection[Any]", self._connection).pipeline() as pipeline:
            self._pipeline = pipeline
            try:
                yield
            finally:
                self._pipeline = None
                self._batch += 1

    def wait_for(self, batch: int) -> None:
        """Have the results of the statements sent in ``batch`` read: inside ``together()``, send them."""
        if self._pipeline is not None and batch == self._batch:
            self._batch += 1
            self._pipeline.sync()

    def execute(self, statement: ClauseElement, parameters: _Parameters = None) -> DriverResult:
        if self._opens_alone():
            with self.together():
                return self.execute(statement, parameters)
        if parameters is None or isinstance(parameters, Mapping):
            return self._one(statement, parameters or {})
        if not parameters:
            return DriverResult([], 0)
        return self._many(statement, parameters)

    def execute_sql(self, sql: str, values: Sequence[Any]) -> None:
        """Run ``sql``, written for this connection's driver (its placeholders, its types), with ``values``;
        nothing is read back. For a statement Core would build slower than it runs (see its callers)."""
        if self._opens_alone():
            with self.together():
                self.execute_sql(sql, values)
            return
        if self._begin and not self._begun:
            self._send_begin()
        self._connection.execute(sql, values)

    def _opens_alone(self) -> bool:
        """Whether this statement, the unit's first, is given outside a block on PostgreSQL: it is then sent
        in a block of its own with the statements that begin the unit, one round trip instead of one each."""
        return bool(self._begin) and not self._begun and self._pipeline is None and self.dialect is not SQLITE

    def _one(self, statement: ClauseElement, parameters: Mapping[str, Any]) -> DriverResult:
        # An INSERT or UPDATE sets the columns it is given; a SELECT's parameters are in its text.
        compiled = _compiled(
            statement, tuple(parameters) if isinstance(statement, ValuesBase) else None, self.dialect
        )
        values: list[Any] = []
        sizes: list[int] = []
        for name in compiled.names:
            process = compiled.binds[name]
            value = parameters[name] if name in parameters else compiled.defaults[name]
            if name in compiled.expanding:
                items = _padded(value)
                sizes.append(len(items))
                if process is not None:
                    items = [None if item is None else process(item) for item in items]
                values.extend(items)
            else:
                values.append(value if process is None or value is None else process(value))
        if self._begin and not self._begun:
            self._send_begin()
        cursor = self._connection.execute(compiled.sql(tuple(sizes)), values)
        if self._pipeline is not None:
            return DriverResult.sent(self, cursor, compiled.row, self._batch)
        if compiled.row is None:
            return DriverResult([], cursor.rowcount)
        make = compiled.row.for_result(cursor.description)
        return DriverResult([make(row) for row in cursor.fetchall()], -1)

    def _many(self, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> DriverResult:
        keys = tuple(rows[0])
        compiled = _compiled(statement, keys, self.dialect)
        if compiled.expanding or compiled.row is not None:
            raise TypeError("many sets of parameters are for INSERT and UPDATE without lists")
        binds = [
            (name, compiled.binds[name], name in compiled.defaults, compiled.defaults.get(name))
            for name in compiled.names
        ]
        sets = []
        for row in rows:
            values = []
            for name, process, has_default, default in binds:
                value = row[name] if not has_default or name in row else default
                values.append(value if process is None or value is None else process(value))
            sets.append(values)
        if self._begin and not self._begun:
            self._send_begin()
        cursor: _Cursor = self._connection.cursor()
        cursor.executemany(compiled.sql(()), sets)
        if self._pipeline is not None:
            return DriverResult.sent(self, cursor, None, self._batch)
        return DriverResult([], cursor.rowcount)


# Compiled statements by (statement, the keys an INSERT or UPDATE was given, database): statements are
# module-level constants, so this stays as small as the set of statements the units run.
_CACHE: dict[tuple[int, tuple[str, ...] | None, str], tuple[ClauseElement, _Compiled]] = {}


def _compiled(statement: ClauseElement, keys: tuple[str, ...] | None, dialect: Dialect) -> _Compiled:
    key = (id(statement), keys, dialect.name)
    cached = _CACHE.get(key)
    if cached is None or cached[0] is not statement:
        # The statement is kept beside its compiled form, so its id cannot be reused by another object.
        cached = _CACHE[key] = (statement, _compile(statement, keys, dialect))
    return cached[1]
