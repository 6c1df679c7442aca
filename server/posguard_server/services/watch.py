"""The number watch, run by the server in the background: a pass every ``interval`` (see store.watch).

Every server process runs it; the passes take turns on the watch's state row, and one made less than half an
interval after another does nothing, so replicas add no work. A pass that fails is logged and the next one
counts the same use again (nothing of a failed pass is kept).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from posguard_server.domain.cases import Case
from posguard_server.domain.customers import mask
from posguard_server.domain.risk import StoredReason
from posguard_server.domain.watch import Counts, Thresholds, judge, next_usual
from posguard_server.store.watch import SqlNumberWatchStore

log = logging.getLogger(__name__)


class NumberWatch:
    def __init__(
        self, store: SqlNumberWatchStore, thresholds: Thresholds, *, interval_seconds: float
    ) -> None:
        self._store = store
        self._thresholds = thresholds
        self.interval = timedelta(seconds=interval_seconds)

    def run_once(self, now: datetime | None = None) -> list[Case]:
        """One pass now: the cases it opened for numbers used abnormally."""
        opened = self._store.watch(
            now=now or datetime.now(UTC), interval=self.interval, judge=self._judge, next_usual=next_usual
        )
        for case in opened:
            log.warning(
                "number watch opened case %s for %s: %s",
                case.case_id,
                mask(case.number),
                ", ".join(r.code for r in case.reasons),
            )
        return opened

    async def run_forever(self) -> None:
        """A pass every interval until cancelled."""
        while True:
            await asyncio.sleep(self.interval.total_seconds())
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:
                log.exception("number watch pass failed; the next one counts its window again")

    def _judge(
        self, window: Mapping[str, Counts], usual: Mapping[str, Counts], length: timedelta
    ) -> dict[str, tuple[StoredReason, ...]]:
        return judge(window, usual, self._thresholds, window_words=f"in {length.total_seconds():.0f} s")
