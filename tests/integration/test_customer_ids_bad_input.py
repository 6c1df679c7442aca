"""Each implemented CustomerIds RPC answers bad input with INVALID_ARGUMENT naming the field; no change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select

import posguard
from posguard.v1 import common_pb2, customer_ids_pb2
from posguard_server.store.customers import (
    SqlCustomer,
    SqlCustomerNumber,
    SqlExternalId,
    SqlVerificationFailure,
)

if TYPE_CHECKING:
    from .conftest import RunningServer

V = customer_ids_pb2
GOOD = "1564 2011 0200 0000 0000"  # replaced by a real number in the test
EXT = common_pb2.ExternalId

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("issue_customer_id", {"issuer": "nope"}, "issuer"),
    ("issue_customer_id", {"issuer": "x" * 33}, "issuer"),
    ("issue_customer_id", {"merchant_part": "12"}, "merchant_part"),
    ("issue_customer_id", {"holder": V.Holder(name="n" * 201)}, "holder.name"),
    ("issue_customer_id", {"holder": V.Holder(name="bell\x07")}, "holder.name"),
    ("issue_customer_id", {"holder": V.Holder(phone="call me")}, "holder.phone"),
    ("issue_customer_id", {"external_ids": [EXT(namespace="", value="1")]}, "external_ids[0].namespace"),
    ("issue_customer_id", {"external_ids": [EXT(namespace="Bank", value="1")]}, "external_ids[0].namespace"),
    (
        "issue_customer_id",
        {"external_ids": [EXT(namespace="bank", value="v" * 257)]},
        "external_ids[0].value",
    ),
    ("issue_customer_id", {"external_ids": [EXT(namespace="bank", value="1")] * 2}, "external_ids[1]"),
    (
        "issue_customer_id",
        {"external_ids": [EXT(namespace="bank", value=str(i)) for i in range(21)]},
        "external_ids",
    ),
    ("issue_customer_id", {"request_id": "r" * 129}, "request_id"),
    ("verify_customer_id", {"number": ""}, "number"),
    ("verify_customer_id", {"number": "1" * 65}, "number"),
    ("verify_customer_id", {"number": GOOD, "merchant_id": "m" * 65}, "merchant_id"),
    ("verify_customer_id", {"number": GOOD, "channel": 42}, "channel"),
    ("get_customer", {}, "customer"),
    ("get_customer", {"customer": common_pb2.CustomerSelector(number="12")}, "customer.number"),
    ("get_customer", {"customer": common_pb2.CustomerSelector(customer_id="c" * 33)}, "customer.customer_id"),
    ("list_customers", {"page_size": -1}, "page_size"),
    ("list_customers", {"page_token": "not-a-token"}, "page_token"),
    ("list_customers", {"status": 17}, "status"),
    (
        "list_customers",
        {"created_after": Timestamp(seconds=100), "created_before": Timestamp(seconds=50)},
        "created_before",
    ),
    ("list_customers", {"created_after": Timestamp(seconds=10**13)}, "created_after"),
    ("suspend_customer_id", {"number": GOOD, "reason": ""}, "reason"),
    ("suspend_customer_id", {"number": "12345", "reason": "x"}, "number"),
    ("reactivate_customer_id", {"number": GOOD, "reason": "r" * 501}, "reason"),
    ("revoke_customer_id", {"number": "", "reason": "x"}, "number"),
    ("rotate_customer_id", {"number": GOOD[:-1] + "9", "reason": "x"}, "number"),
    ("issue_sub_id", {"primary_number": "123"}, "primary_number"),
    ("issue_sub_id", {"primary_number": GOOD, "label": "l" * 101}, "label"),
    ("issue_sub_id", {"primary_number": GOOD, "scope": V.SubScope(channel=9)}, "scope.channel"),
    (
        "issue_sub_id",
        {"primary_number": GOOD, "scope": V.SubScope(merchant_id="m" * 65)},
        "scope.merchant_id",
    ),
    ("link_external_id", {"external_id": EXT(namespace="bank", value="1")}, "customer"),
    ("link_external_id", {"customer": common_pb2.CustomerSelector(number=GOOD)}, "external_id.namespace"),
    (
        "link_external_id",
        {
            "customer": common_pb2.CustomerSelector(number="42"),
            "external_id": EXT(namespace="bank", value="1"),
        },
        "customer.number",
    ),
    ("resolve_external_id", {}, "query"),
    ("resolve_external_id", {"number": "42"}, "number"),
    ("resolve_external_id", {"customer_id": "c1", "namespace": "Not Valid"}, "namespace"),
    ("resolve_external_id", {"external_id": EXT(namespace="bank", value="")}, "external_id.value"),
]


def snapshot(server: RunningServer) -> tuple[int, ...]:
    with server.server.database.session(read_only=True) as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (SqlCustomer, SqlCustomerNumber, SqlExternalId, SqlVerificationFailure)
        )


@pytest.mark.parametrize(("method", "fields", "field"), CASES, ids=[f"{m}-{f}" for m, _, f in CASES])
def test_bad_input_is_invalid_argument_and_changes_nothing(
    server: RunningServer, method: str, fields: dict[str, Any], field: str
) -> None:
    with posguard.Client(server.target, api_key=server.key("admin")) as client:
        real = client.issue_customer_id().customer.primary.number
        fields = {k: (real if v == GOOD else v) for k, v in fields.items()}
        if "customer" in fields and fields["customer"].number == GOOD:
            fields["customer"] = common_pb2.CustomerSelector(number=real)
        if method == "rotate_customer_id":
            fields["number"] = real[:-1] + str((int(real[-1]) + 1) % 10)  # wrong check digits
        before = snapshot(server)
        with pytest.raises(posguard.InvalidArgumentError) as caught:
            getattr(client, method)(**fields)
        assert caught.value.reason == "INVALID_ARGUMENT"
        assert field in [v.field for v in caught.value.field_violations]
        assert snapshot(server) == before
