"""A small write a server makes to find out whether the database still takes writes (``api.health``).

One row, rewritten in place, so the table never grows however many servers probe; whichever server wrote last
is all it holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, cast

from sqlalchemy import CheckConstraint, Integer
from sqlalchemy.orm import Mapped, mapped_column

from posguard_server.store.schema import Base, insert_for

if TYPE_CHECKING:
    from sqlalchemy import Table

    from posguard_server.store.db import Database

_ROW = 1


class SqlWriteProbe(Base):
    """When a server last wrote to find out whether it can."""

    __tablename__ = "write_probe"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    probed_at: Mapped[datetime]


_table = cast("Table", SqlWriteProbe.__table__)


class SqlWriteProbeStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self._insert = insert_for(database.dialect)

    def probe(self, now: datetime) -> None:
        """Write and commit the probe row; raises as any write does when the database refuses it."""
        statement = self._insert(_table).values(id=_ROW, probed_at=now)
        with self._db.session() as session:
            session.execute(statement.on_conflict_do_update(index_elements=["id"], set_={"probed_at": now}))
