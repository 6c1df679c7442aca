"""The number watch end to end: a number hammered through real gRPC calls is flagged, and its case rotates it.

The server's background passes are off (interval 0); the test makes each pass itself, so nothing depends on
timing. On SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

import posguard
from posguard.v1 import cases_pb2, common_pb2
from posguard_server.domain.customers import mask
from posguard_server.store.audit import SqlAuditEvent
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from .conftest import RunningServer

C = cases_pb2


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url, watch_interval_seconds=0)


def test_a_hammered_number_is_flagged_once_and_its_case_rotates_it(running: RunningServer) -> None:
    watch = running.server.watch
    assert watch is not None
    assert watch.run_once() == []  # the first pass takes its bearings
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=10) as gateway:
        numbers = [gateway.issue_customer_id().customer.primary.number for _ in range(6)]
        target, normal = numbers[0], numbers[1:]
        for number in normal:
            for _ in range(2):
                assert gateway.verify_customer_id(number=number).valid
        for _ in range(60):  # a script in a loop
            gateway.verify_customer_id(number=target, merchant_id="m-1")

        # Successes are counted just after their answers (at most 50 ms later): counted before this pass.
        running.run(running.server.flush())
        opened = watch.run_once()
        assert [mask(case.number) for case in opened] == [mask(target)]
        (case,) = opened
        assert [r.code for r in case.reasons] == ["WATCH_VERIFICATIONS"]
        assert "60 verifications" in case.reasons[0].message

        # Still hammered: the number keeps its one unresolved case.
        for _ in range(60):
            gateway.verify_customer_id(number=target)
        running.run(running.server.flush())
        assert watch.run_once() == []

    with posguard.Client(running.target, api_key=running.key("analyst"), timeout=10) as analyst:
        (listed,) = analyst.list_cases(kind=C.CASE_KIND_NUMBER_WATCH).cases
        assert listed.case_id == case.case_id
        assert listed.masked_number == mask(target)
        assert listed.status == C.CASE_STATUS_OPEN
        assert [c.case_id for c in analyst.list_cases(reason="WATCH_VERIFICATIONS").cases] == [case.case_id]
        with pytest.raises(posguard.InvalidArgumentError) as wrong_kind:
            analyst.resolve_case(case_id=case.case_id, resolution=C.CASE_RESOLUTION_FRAUD)
        assert [v.field for v in wrong_kind.value.field_violations] == ["resolution"]
        resolved = analyst.resolve_case(
            case_id=case.case_id, resolution=C.CASE_RESOLUTION_ROTATE, note="shared on a forum"
        ).case
        assert resolved.status == C.CASE_STATUS_RESOLVED
        assert resolved.resolution == C.CASE_RESOLUTION_ROTATE

    with posguard.Client(running.target, api_key=running.key("admin"), timeout=10) as admin:
        old = admin.verify_customer_id(number=target)
        assert old.status == common_pb2.NUMBER_STATUS_ROTATED
        customer = admin.get_customer(customer=common_pb2.CustomerSelector(number=target)).customer
        assert customer.primary.number != target
        assert customer.primary.status == common_pb2.NUMBER_STATUS_ACTIVE
    # Audited: the case's opening by the watch, the rotation and the resolution, by the analyst.
    analyst_id = running.key("analyst").split("_")[1]
    with running.server.database.session(read_only=True) as session:
        events = list(
            session.scalars(
                select(SqlAuditEvent)
                .where(SqlAuditEvent.action.in_(["case.opened", "customer.rotated", "case.resolved"]))
                .order_by(SqlAuditEvent.sequence)
            )
        )
    assert [(e.action, e.actor) for e in events] == [
        ("case.opened", "watch"),
        ("customer.rotated", analyst_id),
        ("case.resolved", analyst_id),
    ]
    assert events[1].subject == mask(target)
    assert case.case_id in events[1].details  # the rotation's reason names the case
    # The successor is a number of its own: hammering it again starts from nothing, and it is not flagged
    # while the old number's case is resolved.
    assert running.server.watch is not None
    assert running.server.watch.run_once() == []


def test_busy_numbers_together_flag_no_one(running: RunningServer) -> None:
    watch = running.server.watch
    assert watch is not None
    watch.run_once()
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=10) as gateway:
        numbers = [gateway.issue_customer_id().customer.primary.number for _ in range(4)]
        for _ in range(25):
            for number in numbers:
                gateway.verify_customer_id(number=number)
    running.run(running.server.flush())
    assert watch.run_once() == []
