"""Customers and numbers as posguard.v1 messages (and the enums between the two worlds)."""

from __future__ import annotations

from posguard.v1 import common_pb2, customer_ids_pb2
from posguard_server.api.convert import timestamp
from posguard_server.domain.customers import Customer, CustomerNumber, Holder, NumberKind, NumberStatus
from posguard_server.domain.numbers import Scheme

STATUS_TO_PROTO: dict[NumberStatus, common_pb2.NumberStatus.ValueType] = {
    NumberStatus.ACTIVE: common_pb2.NUMBER_STATUS_ACTIVE,
    NumberStatus.SUSPENDED: common_pb2.NUMBER_STATUS_SUSPENDED,
    NumberStatus.REVOKED: common_pb2.NUMBER_STATUS_REVOKED,
    NumberStatus.ROTATED: common_pb2.NUMBER_STATUS_ROTATED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
KIND_TO_PROTO: dict[NumberKind, common_pb2.NumberKind.ValueType] = {
    NumberKind.STATIC: common_pb2.NUMBER_KIND_STATIC,
    NumberKind.SUB: common_pb2.NUMBER_KIND_SUB,
}
CHANNEL_NAMES: dict[common_pb2.Channel.ValueType, str] = {
    common_pb2.CHANNEL_POS: "pos",
    common_pb2.CHANNEL_ONLINE: "online",
    common_pb2.CHANNEL_MOBILE: "mobile",
}


def customer_number(number: CustomerNumber, scheme: Scheme | None) -> customer_ids_pb2.CustomerNumber:
    channel = {v: k for k, v in CHANNEL_NAMES.items()}.get(
        number.scope_channel, common_pb2.CHANNEL_UNSPECIFIED
    )
    return customer_ids_pb2.CustomerNumber(
        number=number.number,
        display=scheme.display(number.number) if scheme else number.number,
        kind=KIND_TO_PROTO[number.kind],
        status=STATUS_TO_PROTO[number.status],
        issuer=number.issuer,
        key_version=number.key_version,
        issued_at=timestamp(number.issued_at),
        status_changed_at=timestamp(number.status_changed_at),
        status_reason=number.status_reason,
        successor_number=number.successor_number,
        primary_number=number.primary_number,
        scope=customer_ids_pb2.SubScope(merchant_id=number.scope_merchant_id, channel=channel)
        if number.kind is NumberKind.SUB
        else None,
        label=number.label,
    )


def customer(
    value: Customer, scheme: Scheme | None, holder: Holder | None = None
) -> customer_ids_pb2.Customer:
    return customer_ids_pb2.Customer(
        customer_id=value.customer_id,
        primary=customer_number(value.primary, scheme),
        sub_numbers=[customer_number(n, scheme) for n in value.sub_numbers],
        external_ids=[
            common_pb2.ExternalId(namespace=e.namespace, value=e.value) for e in value.external_ids
        ],
        holder=customer_ids_pb2.Holder(name=holder.name, phone=holder.phone) if holder else None,
        dynamic_codes_enrolled=value.dynamic_codes_enrolled,
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
    )
