"""Deadlines end the work of a call and write nothing; request bytes that do not parse are INVALID_ARGUMENT.

To make a call outlive its deadline on the server deterministically, the test holds SQLite's write lock
from a connection of its own: the server's unit of work waits for the lock, the client's deadline passes,
the test lets go, and the server must then roll back instead of committing.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import posguard
from posguard.errors import DeadlineExceededError
from posguard.v1 import common_pb2, customer_ids_pb2, risk_pb2

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import RunningServer


def _db_file(server: RunningServer) -> str:
    return str(server.settings.data_dir / "posguard.db")


def _rows(server: RunningServer, table: str) -> int:
    with sqlite3.connect(_db_file(server)) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _everything(server: RunningServer) -> dict[str, int]:
    with sqlite3.connect(_db_file(server)) as db:
        tables = [
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
    return {table: _rows(server, table) for table in tables}


@contextmanager
def _write_lock_held(server: RunningServer, seconds: float) -> Iterator[None]:
    """Hold SQLite's write lock for ``seconds`` after the block (the server's writes wait meanwhile)."""
    db = sqlite3.connect(_db_file(server), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        time.sleep(seconds)
    finally:
        db.execute("ROLLBACK")
        db.close()


def _settle(server: RunningServer) -> None:
    """Give the server's worker thread time to take the lock and reach its commit (or not)."""
    time.sleep(1.0)


def test_an_issuance_past_its_deadline_rolls_back_and_its_retry_issues_once(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        client.issue_customer_id(holder=customer_ids_pb2.Holder(name="Warm Up"))  # caches the key
        before = _everything(server)
        request_id = "rq-" + uuid.uuid4().hex
        with _write_lock_held(server, 0.8), pytest.raises(DeadlineExceededError):
            client.issue_customer_id(
                request_id=request_id, holder=customer_ids_pb2.Holder(name="Late Caller"), timeout=0.5
            )
        _settle(server)
        assert _everything(server) == before, "work past the deadline was written"

        retried = client.issue_customer_id(
            request_id=request_id, holder=customer_ids_pb2.Holder(name="Late Caller")
        )
        again = client.issue_customer_id(
            request_id=request_id, holder=customer_ids_pb2.Holder(name="Late Caller")
        )
        # A late write the snapshot above missed (a slow machine) would make the retry a replay.
        assert not retried.replayed
        assert again.replayed
        assert again.customer.customer_id == retried.customer.customer_id
        assert _rows(server, "customers") == before["customers"] + 1


def test_a_score_past_its_deadline_is_not_stored_and_its_retry_scores_once(server: RunningServer) -> None:
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        number = client.issue_customer_id().customer.primary.number
        transaction = risk_pb2.Transaction(
            transaction_id="tx-" + uuid.uuid4().hex,
            customer_number=number,
            amount=common_pb2.Money(amount_minor=4_200, currency="CNY"),
            merchant_id="m-1",
            terminal_id="t-1",
            mcc="5411",
            channel=common_pb2.CHANNEL_POS,
        )
        transaction.event_time.GetCurrentTime()
        before = _everything(server)
        with _write_lock_held(server, 0.8), pytest.raises(DeadlineExceededError):
            client.score_transaction(transaction=transaction, timeout=0.5)
        _settle(server)
        assert _everything(server) == before, "a score past its deadline was written"

        first = client.score_transaction(transaction=transaction)
        second = client.score_transaction(transaction=transaction)
        assert not first.replayed  # a late write the snapshot above missed would make this a replay
        assert second.replayed
        assert second.risk_score == first.risk_score
        assert _rows(server, "risk_transactions") == before["risk_transactions"] + 1


# -- request bytes that do not parse ------------------------------------------------------------------

_ISSUE = "/posguard.v1.CustomerIds/IssueCustomerId"
_VERIFY = "/posguard.v1.CustomerIds/VerifyCustomerId"
_STREAM = "/posguard.v1.Risk/ScoreTransactions"

# Field 1 (number, a string) holding bytes that are not UTF-8: tag 0x0a, length 2.
_BAD_UTF8 = b"\x0a\x02\xff\xfe"
# A length-delimited field that claims more bytes than there are.
_TRUNCATED = b"\x0a\x40abc"


def _raw_unary(server: RunningServer, method: str, payload: bytes, key: str | None) -> grpc.RpcError:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            call(payload, timeout=10, metadata=metadata)
    return raised.value


def _violations(error: grpc.RpcError) -> list[str]:
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


@pytest.mark.parametrize(
    "payload", [_BAD_UTF8, _TRUNCATED, b"\xff\xff\xff"], ids=["utf8", "truncated", "junk"]
)
def test_request_bytes_that_do_not_parse_are_invalid_argument(server: RunningServer, payload: bytes) -> None:
    key = server.key("admin")
    before = _everything(server)
    for method in (_ISSUE, _VERIFY):
        error = _raw_unary(server, method, payload, key)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
        assert _violations(error) == ["request"]
    assert _everything(server) == before


def test_garbage_without_a_key_is_unauthenticated_first(server: RunningServer) -> None:
    error = _raw_unary(server, _ISSUE, _BAD_UTF8, None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_stream_item_that_does_not_parse_ends_the_stream_as_invalid_argument(server: RunningServer) -> None:
    key = server.key("gateway")
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(_STREAM, request_serializer=None, response_deserializer=None)
        responses = call(iter([_BAD_UTF8]), timeout=10, metadata=(("authorization", f"Bearer {key}"),))
        with pytest.raises(grpc.RpcError) as raised:
            list(responses)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(raised.value) == ["request"]
    with posguard.Client(server.target, api_key=key) as client:  # and the server is still serving
        assert client.issue_customer_id().customer.customer_id
