"""Fuzzing every posguard.v1 RPC with hypothesis: random and hostile requests never break the server.

The RPCs are read from the proto descriptors, so a new RPC is fuzzed without touching this file; requests are
built from the message descriptors (nested messages, repeated fields, maps, oneofs, open enums with unknown
numbers, extreme integers, nan and infinities, any unicode, very long strings). Each call carries the key of
a role allowed to make it, so requests get past authentication into validation, and the server is seeded
with real numbers, an enrolment, scored history and trained models whose ids the strategies use, so valid
requests get past "not found" into deeper code. A second test speaks the wire format directly: random
bytes, truncated messages, invalid UTF-8 in string fields, malformed encodings, and a message above the
server's receive limit.

Properties, for every call:
- no answer is INTERNAL or UNKNOWN (nor any per-item error of a stream);
- a rejected call (any code but OK, or a stream whose items were all refused) changes no row of any table,
  except the risk signals a refused dynamic code leaves on purpose (see ``SIGNAL_ROWS``), and except items
  a stream scored before an item that does not even parse ended it;
- the server keeps answering its health check with SERVING.

Runs are reproducible: hypothesis is derandomized and keeps no example database. They measure no time, so
they run with the rest of the suite, in parallel, not with the load tests one at a time.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import pkgutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, text

import posguard
import posguard.v1
from posguard.dynamic_codes import PERIOD_SECONDS
from posguard.v1 import admin_pb2, common_pb2, customer_ids_pb2, risk_pb2
from posguard_models.training import TrainingConfig, train
from posguard_server.api.access import ADMIN, SERVICE_NAMES, allowed_roles
from posguard_server.app import MAX_MESSAGE_BYTES
from posguard_server.domain.api_keys import Role
from posguard_server.pipeline.trainer import load_history, register
from posguard_server.store.db import Database
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.model_registry import SqlModelRegistry

if TYPE_CHECKING:
    from .conftest import RunningServer

# Examples per RPC: a base, and more for requests with more fields to get wrong (and right). Bounded so that
# the whole file stays near a minute on two shared cores.
MESSAGE_EXAMPLES_BASE = 30
MESSAGE_EXAMPLES_PER_FIELD = 6
MESSAGE_EXAMPLES_MAX = 120
WIRE_EXAMPLES = 20
CALL_TIMEOUT = 20.0
# Codes that mean the server failed rather than refused: a bug whatever the request.
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
BROKEN_NAMES = frozenset(code.name for code in BROKEN)
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


# -- the RPCs, from the descriptors --------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def kind(self) -> str:
        """The name of the ``grpc.Channel`` method that makes this kind of call."""
        sends, answers = ("stream" if s else "unary" for s in (self.client_streaming, self.server_streaming))
        return f"{sends}_{answers}"


def _all_rpcs() -> list[Rpc]:
    """Every RPC of every service of every generated posguard.v1 module, a new file's included."""
    rpcs: list[Rpc] = []
    for info in sorted(pkgutil.iter_modules(posguard.v1.__path__), key=lambda i: i.name):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"posguard.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(
                    Rpc(
                        f"/{service.full_name}/{method.name}",
                        message_factory.GetMessageClass(method.input_type),
                        message_factory.GetMessageClass(method.output_type),
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return rpcs


RPCS = _all_rpcs()


def _role_for(rpc: Rpc) -> Role:
    """ADMIN when it may call the RPC (it reaches the most code), else any role that may."""
    roles = allowed_roles(rpc.path)
    return ADMIN if ADMIN in roles else min(roles, key=lambda r: r.value)


def _leaf_fields(descriptor: Descriptor, depth: int = 0) -> int:
    """How many scalar fields a request has, through nested messages (a Timestamp counts as one)."""
    count = 0
    for f in descriptor.fields:
        if (
            f.message_type is not None
            and depth < 3
            and f.message_type.full_name != "google.protobuf.Timestamp"
        ):
            count += _leaf_fields(f.message_type, depth + 1)
        else:
            count += 1
    return count


def _message_examples(rpc: Rpc) -> int:
    fields = _leaf_fields(rpc.request.DESCRIPTOR)
    return min(MESSAGE_EXAMPLES_MAX, MESSAGE_EXAMPLES_BASE + MESSAGE_EXAMPLES_PER_FIELD * fields)


def _order(rpcs: Sequence[Rpc]) -> list[Rpc]:
    """Destructive RPCs last, so that the others meet the seeded numbers and keys still active."""
    return sorted(rpcs, key=lambda r: r.name.startswith(("Suspend", "Revoke", "Rotate", "Rollback")))


# -- the seeded world --------------------------------------------------------------------------------


@dataclass
class World:
    """A seeded server and the real values strategies draw from, so that requests reach deep code."""

    server: RunningServer
    numbers: list[str] = field(default_factory=list)
    customer_ids: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    old_codes: list[str] = field(default_factory=list)
    transaction_ids: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    issuers: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)

    def metadata(self, rpc: Rpc) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.server.key(_role_for(rpc))}"),)

    def live_code(self, index: int) -> str:
        """A code of an enrolment for now: valid unless already used, or the number is no longer active."""
        return posguard.dynamic_code(self.secrets[index % len(self.secrets)])


def _seed(server: RunningServer) -> World:
    """Customers in every state, an enrolment, a linked external id, scored history, outcomes, models."""
    world = World(server)
    holder = customer_ids_pb2.Holder(name="Ada Lovelace", phone="+44 20 7946 0000")
    admin = posguard.Client(server.target, api_key=server.key(Role.ADMIN), timeout=30)
    gateway = posguard.Client(server.target, api_key=server.key(Role.GATEWAY), timeout=60)
    with admin, gateway:
        issued = [
            admin.issue_customer_id(
                holder=holder, external_ids=[common_pb2.ExternalId(namespace="bank", value=f"acct-{i}")]
            ).customer
            for i in range(5)
        ]
        active, enrolled, suspended, revoked, rotated = (c.primary.number for c in issued)
        world.customer_ids = [c.customer_id for c in issued]
        world.issuers = sorted({c.primary.issuer for c in issued})
        world.secrets = [admin.enroll_dynamic_codes(number=n).secret for n in (active, enrolled)]
        world.old_codes = [
            posguard.dynamic_code(s, at=time.time() - k * PERIOD_SECONDS)
            for s in world.secrets
            for k in (2, 9)
        ]
        sub = admin.issue_sub_id(
            primary_number=active, scope=customer_ids_pb2.SubScope(merchant_id="m-1"), label="family"
        ).sub_number.number
        admin.link_external_id(
            customer=common_pb2.CustomerSelector(number=enrolled),
            external_id=common_pb2.ExternalId(namespace="wallet", value="w-1"),
        )
        admin.suspend_customer_id(number=suspended, reason="card lost")
        admin.revoke_customer_id(number=revoked, reason="closed")
        successor = admin.rotate_customer_id(number=rotated, reason="leaked").customer.primary.number
        world.numbers = [active, enrolled, suspended, revoked, rotated, successor, sub]

        # History for two customers, so that the trainer fits their own forests as well as a global one.
        now = datetime.now(UTC)
        history = []
        for i in range(48):
            txn = risk_pb2.Transaction(
                transaction_id=f"seed-{i}",
                customer_number=(active, enrolled)[i % 2],
                amount=common_pb2.Money(amount_minor=1_000 + 137 * (i % 11), currency="CNY"),
                merchant_id=f"m-{i % 3}",
                terminal_id=f"t-{i % 4}",
                mcc="5411",
                channel=common_pb2.CHANNEL_POS,
            )
            txn.event_time.FromDatetime(now - timedelta(days=20) + timedelta(hours=9 * i))
            history.append(risk_pb2.ScoreTransactionsRequest(transaction=txn))
        scored = list(gateway.score_transactions(iter(history)))
        assert all(r.HasField("result") for r in scored), scored
        world.transaction_ids = [f"seed-{i}" for i in range(len(history))]
        gateway.report_outcome(transaction_id="seed-1", outcome=risk_pb2.OUTCOME_FRAUD)

        victim = admin.create_api_key(name="revocable", role=admin_pb2.ROLE_GATEWAY).key
        world.key_ids = [victim.key_id, "0123456789ab"]
        world.page_tokens = [
            admin.list_customers(page_size=1).next_page_token,
            admin.list_api_keys(page_size=1).next_page_token,
            admin.list_audit_events(page_size=1).next_page_token,
        ]
        world.audit = [e.action for e in admin.list_audit_events(page_size=20).events]

    # Tiny real runs: one active, one candidate, so promotion and rollback have real models to move.
    database = server.server.database
    history_store, registry = SqlHistoryStore(database), SqlModelRegistry(database)
    small = {"n_estimators": 8, "max_samples": 32, "customer_estimators": 4, "customer_min_history": 10}
    for seed, version in enumerate(("fz-1", "fz-2")):
        trained = train(load_history(history_store), TrainingConfig(seed=seed, **small))
        register(registry, trained, version=version, activate=seed == 0, actor="fuzz")
    world.versions = ["fz-1", "fz-2"]
    models = posguard.Client(server.target, api_key=server.key(Role.TRAINER))
    with models:
        world.page_tokens.append(models.list_models(page_size=1).next_page_token)
    world.page_tokens = [t for t in world.page_tokens if t]
    return world


# -- database fingerprint ----------------------------------------------------------------------------


# A refused dynamic code is a risk signal the server records on purpose, also when it refuses the call (a
# transaction naming a code no enrolment matches is NOT_FOUND): the attempt, the enrolment's refusal counters
# and an audit event (so the audit head moves). So is a call naming a customer that does not exist (a guess,
# audited as lookup.missed). Every other row must stay as it was.
SIGNAL_ROWS = {
    "dynamic_code_attempts": "reason <> 'ok'",
    "audit_events": "action IN ('dynamic_code.refused', 'caller.refused', 'lookup.missed', 'guessing.spike')",
    # A guess counts toward the key's failure limit (enumeration defence).
    "caller_failures": "1 = 1",
}
SIGNAL_COLUMNS = {
    "dynamic_enrollments": {
        "refusals",
        "replays",
        "last_refused_at",
        "guess_window_started_at",
        "guess_window_failures",
    },
    "audit_head": {"sequence", "hash"},
}


@dataclass(frozen=True)
class Table:
    name: str
    order: list[str]  # the primary key, or every column
    columns: list[str]

    def select(self, *, without_signals: bool) -> str:
        columns = self.columns
        where = ""
        if without_signals:
            columns = [c for c in columns if c not in SIGNAL_COLUMNS.get(self.name, set())]
            if self.name in SIGNAL_ROWS:
                where = f" WHERE NOT ({SIGNAL_ROWS[self.name]})"
        shown = ", ".join(f'"{c}"' for c in columns) or "1"
        order = ", ".join(f'"{c}"' for c in self.order)
        # Only our own table and column names are put into the statement.
        return f'SELECT {shown} FROM "{self.name}"{where} ORDER BY {order}'


def _tables(database: Database) -> list[Table]:
    inspector = inspect(database.engine)
    tables = []
    for name in sorted(inspector.get_table_names()):
        if name == "write_probe":
            continue  # the server's own probe of the database (api.health), written by no call
        columns = [c["name"] for c in inspector.get_columns(name)]
        order = inspector.get_pk_constraint(name).get("constrained_columns") or columns
        tables.append(Table(name, order, columns))
    return tables


def fingerprint(database: Database, tables: list[Table], *, without_signals: bool) -> dict[str, str]:
    """A hash of every row of every table, per table (so a failure can say which table changed)."""
    prints: dict[str, str] = {}
    with database.session(read_only=True) as session:
        for table in tables:
            rows = session.execute(text(table.select(without_signals=without_signals))).all()
            prints[table.name] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return prints


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


# -- strategies for any message -------------------------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Characters that trip up text handling: NUL and other controls, bidi overrides, BOM, zero-width joiners,
# separators that str.split() takes for spaces, look-alike and non-ASCII digits NFKC folds to ASCII.
TRICKY_CHARS = "\x00\x07\x1b\x7f\x85\u00a0\u200b\u200d\u202e\u2028\u2029\ufeff\uffff１٣⑳ǅﬁ\U0001f600𝟗"
HOSTILE_TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.text(st.sampled_from(TRICKY_CHARS), min_size=1, max_size=12),
    # Just past, and far past, the limits the server documents (32, 64, 100, 128, 256, 500 characters ...).
    st.builds(
        lambda c, n: c * n,
        st.sampled_from(["x", "7", "\x00", "é", "𝕏", "\u202e", " "]),
        st.sampled_from([33, 65, 101, 129, 257, 501, 1001, 4097, 100_000]),
    ),
    st.sampled_from(["", " ", "-", "0", "-1", "NaN", "null", "%s%n", "' OR 1=1 --", "../../etc/passwd"]),
)
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=16)
NOW_OFFSET = st.integers(-30 * 86_400, 4 * 60)  # event times the server accepts: the past, minutes ahead


def _mutate(value: str, position: int, char: str, how: int) -> str:
    """A real value with one character replaced, inserted, dropped, or the whole of it case-swapped."""
    if not value:
        return char
    i = position % len(value)
    if how == 0:
        return value[:i] + char + value[i + 1 :]
    if how == 1:
        return value[:i] + char + value[i:]
    if how == 2:
        return value[:i] + value[i + 1 :]
    return value.swapcase()


def _near_real(values: Sequence[str]) -> st.SearchStrategy[str]:
    real = st.sampled_from(list(values))
    return st.one_of(
        real,
        real,  # twice: most of the time the value itself, to get past validation
        st.builds(
            _mutate,
            real,
            st.integers(0, 64),
            st.sampled_from(" -0１٣\x00\u200b" + TRICKY_CHARS[:6]),
            st.integers(0, 3),
        ),
    )


def _plausible_strings(world: World) -> dict[str, st.SearchStrategy[str]]:
    """Plausible values by field name: what a well-behaved client would send, often real."""
    numbers = world.numbers + [n[:4] + " " + n[4:8] + "-" + n[8:] for n in world.numbers]
    codes = st.one_of(
        st.builds(world.live_code, st.integers(0, 3)),
        _near_real(world.old_codes),
        st.text(st.sampled_from("0123456789"), min_size=18, max_size=18),
    )
    ids = _near_real(world.customer_ids)
    counter = itertools.count()
    fresh = st.builds(lambda: f"fz-{next(counter)}")
    texts = st.one_of(st.sampled_from(["card lost", "fuzz", "r"]), PRINTABLE)
    hints: dict[str, st.SearchStrategy[str]] = {
        # Some ids shared by every RPC (a request_id is scoped to its method), some never seen before.
        "request_id": st.one_of(fresh, st.sampled_from(["fz-a", "fz-b", "fz-c"])),
        "customer_id": ids,
        "code": codes,
        "dynamic_code": codes,
        "namespace": st.sampled_from(["bank", "wallet", "source"]),
        "value": st.sampled_from(["acct-0", "acct-1", "w-1", "nobody"]),
        "merchant_id": st.sampled_from(["m-0", "m-1", "m-2", "m-9"]),
        "terminal_id": st.sampled_from(["", "t-0", "t-1", "t-9"]),
        "currency": st.sampled_from(["CNY", "EUR", "USD", "JPY"]),
        "mcc": st.sampled_from(["", "5411", "0000"]),
        "transaction_id": st.one_of(fresh, _near_real(world.transaction_ids), PRINTABLE),
        "version": st.sampled_from([*world.versions, "nope"]),
        "key_id": _near_real(world.key_ids),
        "page_token": st.one_of(st.just(""), _near_real(world.page_tokens or ["e30"])),
        "issuer": st.sampled_from(["", *world.issuers]),
        "merchant_part": st.sampled_from(["", "1234"]),
        "phone": st.sampled_from(["", "+8613800138000"]),
        "action": st.sampled_from(["", *world.audit]),
        "actor": st.sampled_from(["", *world.key_ids]),
        "subject": st.sampled_from(["", "fz-1", world.numbers[0][:4] + "*" * 12 + world.numbers[0][-4:]]),
        "name": texts,
        "reason": texts,
        "note": st.one_of(texts, st.just("line\nbreak\ttab")),
        "label": texts,
    }
    for name in ("number", "customer_number", "primary_number", "expected_number"):
        hints[name] = _near_real(numbers)
    return hints


@dataclass
class Strategies:
    """Builds a strategy for any message type from its descriptor.

    ``hostility`` is the chance that a field gets a hostile value rather than a plausible one. Every choice
    is drawn so that hypothesis's favourite value, 0, is the plausible one: its draws lean hard towards 0,
    and shrinking then makes every field plausible but the ones a failure needs.
    """

    world: World
    hints: dict[str, st.SearchStrategy[str]]
    every_string: st.SearchStrategy[str]

    @classmethod
    def of(cls, world: World) -> Strategies:
        hints = _plausible_strings(world)
        return cls(world, hints, st.one_of(*hints.values()))

    def scalar(self, field_descriptor: FieldDescriptor, hostile: bool) -> st.SearchStrategy[Any]:
        t = field_descriptor.type
        if t in INT_RANGES:
            low, high = INT_RANGES[t]
            if hostile:
                extremes = st.sampled_from([low, high, low + 1, high - 1, -1, 0, 1])
                return st.one_of(extremes, st.integers(low, high))
            # Positive: zero is the usual "missing" and hostile values cover it.
            return st.integers(1, min(high, 1_000_000)) | st.integers(1, 5)
        if t == FieldDescriptor.TYPE_DOUBLE:
            return st.floats(allow_nan=True, allow_infinity=True) if hostile else st.floats(-90, 90)
        if t == FieldDescriptor.TYPE_FLOAT:
            if hostile:
                return st.floats(allow_nan=True, allow_infinity=True, width=32)
            return st.floats(-90, 90, width=32)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in field_descriptor.enum_type.values]
            if hostile:  # proto3 enums are open: any int32 travels, and the server must refuse unknown ones
                return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
            # Mostly a value other than UNSPECIFIED: required enums refuse the zero value.
            return st.sampled_from(known[1:] or known) | st.sampled_from(known)
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64 if hostile else 16)
        if t == FieldDescriptor.TYPE_STRING:
            if hostile:
                return HOSTILE_TEXT
            return self.hints.get(field_descriptor.name, self.every_string)
        raise AssertionError(f"no strategy for field type {t} of {field_descriptor.full_name}")

    def message(self, descriptor: Descriptor, hostility: float) -> st.SearchStrategy[Message]:
        @st.composite
        def build(draw: st.DrawFn) -> Message:
            # Sometimes sparse: optional fields left empty get past checks that tie fields together.
            sparsity = draw(st.sampled_from([0.03, 0.3]))
            return self._build(draw, descriptor, hostility, sparsity, 0)

        return build()

    def _value(
        self, draw: st.DrawFn, f: FieldDescriptor, hostility: float, sparsity: float, depth: int
    ) -> Any:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return self._build(draw, f.message_type, hostility, sparsity, depth + 1)
        return draw(self.scalar(f, _chance(draw, hostility)))

    def _build(
        self, draw: st.DrawFn, descriptor: Descriptor, hostility: float, sparsity: float, depth: int
    ) -> Message:
        hostile = _chance(draw, hostility)
        if descriptor.full_name == "google.protobuf.Timestamp" and not hostile:
            return _timestamp(draw(NOW_OFFSET), draw(st.integers(0, 999_999_999)))
        message = message_factory.GetMessageClass(descriptor)()
        if depth > 4:  # recursive message types end here
            return message
        unset = 0.5 if hostile else min(0.5, sparsity + hostility)
        # One member, or none, of each oneof: setting several would leave only the last anyway.
        chosen = {
            oneof.name: None if _chance(draw, unset / 2) else draw(st.sampled_from(list(oneof.fields))).name
            for oneof in descriptor.oneofs
        }
        for f in descriptor.fields:
            if f.containing_oneof is not None:
                if chosen[f.containing_oneof.name] != f.name:
                    continue
            elif _chance(draw, unset):
                continue
            target = getattr(message, f.name)
            if f.is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry:
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                for _ in range(draw(st.integers(0, 3))):
                    key = self._value(draw, key_f, hostility, sparsity, depth)
                    value = self._value(draw, value_f, hostility, sparsity, depth)
                    if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                        target[key].CopyFrom(value)
                    else:
                        target[key] = value
            elif f.is_repeated:
                size = draw(st.sampled_from([1, 0, 2, 3, 21] if hostile else [1, 0, 2]))
                items = [self._value(draw, f, hostility, sparsity, depth) for _ in range(size)]
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in items:
                        target.add().CopyFrom(item)
                else:
                    target.extend(items)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(self._value(draw, f, hostility, sparsity, depth))
            else:
                setattr(message, f.name, self._value(draw, f, hostility, sparsity, depth))
        return message


def _chance(draw: st.DrawFn, probability: float) -> bool:
    """True with about ``probability``.

    True only for draws in a band around the middle of the range: hypothesis favours the bounds (and
    shrinks towards the lower one), which then stand for False.
    """
    if probability <= 0 or probability >= 1:
        return probability >= 1
    return abs(draw(st.integers(0, 1000)) - 500) < 500 * probability


def _timestamp(offset: int, nanos: int) -> Timestamp:
    return Timestamp(seconds=int(time.time()) + offset, nanos=nanos)


# The chance of each field being hostile: valid-looking (twice as often: deep code needs every field right),
# nearly valid, a fifth broken, anything goes.
HOSTILITY = st.sampled_from([0.0, 0.0, 0.02, 0.2, 1.0])


# -- the wire format, by hand ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return _key(number, 2) + _varint(len(payload)) + payload


def _string_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """The field numbers leading to every string field, through nested messages and map entries."""
    paths: list[tuple[int, ...]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            paths.append((f.number,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            paths.extend((f.number, *inner) for inner in _string_paths(f.message_type, depth + 1))
    return paths


def _nested(path: tuple[int, ...], payload: bytes) -> bytes:
    for number in reversed(path):
        payload = _field(number, payload)
    return payload


# Byte strings that are not UTF-8: a stray continuation byte, an overlong NUL, a UTF-16 surrogate, a code
# point above U+10FFFF, a sequence cut short, bytes that never occur.
INVALID_UTF8 = [b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\xff\xfe"]
UNKNOWN_FIELD = 2**29 - 1  # the largest field number; no message of ours uses it
# Encodings no parser may accept: a varint of 11 bytes, lengths past the end (up to 4 GiB), the reserved
# wire types 6 and 7, field number 0, an end-group without a start, a cut varint and a cut fixed32, and
# unknown groups nested deeper than protobuf's recursion limit.
MALFORMED = [
    b"\x08" + b"\xff" * 10 + b"\x01",
    b"\x0a\x05ab",
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x0e",
    b"\x0f",
    b"\x00\x01",
    _key(7, 4),
    b"\x08",
    b"\x0d\x01\x02",
    _key(1000, 3) * 200 + _key(1000, 4) * 200,
]


def _truncated(payload: bytes, cut: int) -> bytes:
    return payload[: cut % len(payload)] if payload else payload


def wire_payloads(strategies: Strategies, rpc: Rpc) -> st.SearchStrategy[bytes]:
    descriptor = rpc.request.DESCRIPTOR
    valid = HOSTILITY.flatmap(lambda h: strategies.message(descriptor, h)).map(
        lambda m: m.SerializeToString()
    )
    options = [
        st.binary(max_size=256),
        st.builds(_truncated, valid, st.integers(0, 10_000)),
        st.sampled_from(MALFORMED),
        st.builds(bytes.__add__, valid, st.sampled_from(MALFORMED)),
        # Unknown fields of every wire type are legal and must be skipped.
        st.builds(
            lambda v, n, t: v + _key(n, t) + (_varint(n) if t == 0 else b"\x00" * {1: 8, 5: 4}.get(t, 0)),
            valid,
            st.integers(1000, UNKNOWN_FIELD),
            st.sampled_from([0, 1, 5]),
        ),
    ]
    paths = _string_paths(descriptor)
    if paths:
        # A valid message with one string field, at any depth, replaced by bytes that are not UTF-8.
        options.append(
            st.builds(
                lambda v, path, bad, first: _nested(path, bad) + v if first else v + _nested(path, bad),
                valid,
                st.sampled_from(paths),
                st.sampled_from(INVALID_UTF8),
                st.booleans(),
            )
        )
    return st.one_of(options)


# -- calling -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list[Any]


def call(channel: grpc.Channel, rpc: Rpc, requests: Sequence[Any], world: World, *, raw: bool) -> Answer:
    """Make the call; raw requests are bytes sent as they are, and responses come back as bytes."""
    make = getattr(channel, rpc.kind)
    multicallable = make(
        rpc.path,
        request_serializer=None if raw else rpc.request.SerializeToString,
        response_deserializer=None if raw else rpc.response.FromString,
    )
    argument = iter(requests) if rpc.client_streaming else requests[0]
    try:
        reply = multicallable(argument, metadata=world.metadata(rpc), timeout=CALL_TIMEOUT)
        responses = list(reply) if rpc.server_streaming else [reply]
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", [])
    if raw:
        responses = [rpc.response.FromString(r) for r in responses]
    return Answer(grpc.StatusCode.OK, "", responses)


def _stream_errors(message: Message) -> Iterator[common_pb2.StreamError]:
    """Every StreamError inside a response, at any depth."""
    for f, value in message.ListFields():
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for item in value if f.is_repeated and not isinstance(value, Message) else [value]:
            if isinstance(item, common_pb2.StreamError):
                yield item
            elif isinstance(item, Message):
                yield from _stream_errors(item)


def _decodable_prefix(rpc: Rpc, payloads: Sequence[bytes]) -> int:
    """How many payloads parse as the request type before the first that does not."""
    for i, payload in enumerate(payloads):
        try:
            rpc.request.FromString(payload)
        except Exception:  # DecodeError, or a string field that is not UTF-8
            return i
    return len(payloads)


def describe(requests: Sequence[Any], limit: int = 1500) -> str:
    """A readable, bounded repr of what was sent (very long strings would drown the report)."""
    parts = []
    for r in requests:
        shown = repr(r) if isinstance(r, bytes) else text_format.MessageToString(r, as_one_line=True)
        parts.append(shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} characters)")
    return " | ".join(parts) or "(no requests)"


@dataclass
class Prober:
    """Makes calls and checks the properties of each; one per test."""

    world: World
    channel: grpc.Channel
    tables: list[Table]
    calls: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, rpc: Rpc, outcome: str) -> None:
        counts = self.calls.setdefault(rpc.name, {})
        counts[outcome] = counts.get(outcome, 0) + 1

    def check(self, rpc: Rpc, requests: Sequence[Any], *, raw: bool) -> Answer:
        database = self.world.server.server.database
        # What follows earlier answers (a successful verification's counters) is written first, so that
        # all that can differ afterwards is this call's doing.
        self.world.server.run(self.world.server.server.flush())
        before = fingerprint(database, self.tables, without_signals=True)
        answer = call(self.channel, rpc, requests, self.world, raw=raw)
        self.count(rpc, answer.code.name)
        sent = describe(requests)
        assert answer.code not in BROKEN, (
            f"{rpc.path} answered {answer.code.name} ({answer.details}) to {sent}"
        )
        assert answer.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc.path} hung on {sent}"
        errors = [e for r in answer.responses for e in _stream_errors(r)]
        if rpc.client_streaming:
            for _ in range(len(answer.responses) - len(errors)):
                self.count(rpc, "item OK")
        for error in errors:
            self.count(rpc, f"item {error.code}")
        broken = [e for e in errors if e.code in BROKEN_NAMES]
        assert not broken, f"{rpc.path} answered items with {broken} to {sent}"
        if rpc.client_streaming and answer.code == grpc.StatusCode.OK:
            indexes = sorted(getattr(r, "index", i) for i, r in enumerate(answer.responses))
            assert indexes == list(range(len(requests))), f"{rpc.path}: answers {indexes} to {sent}"
        if answer.code == grpc.StatusCode.OK:
            # An accepted stream whose every item was refused is a refusal too.
            refused = rpc.client_streaming and len(errors) == len(answer.responses)
        else:
            # A stream is not one unit of work: items before one that does not even parse (which ends the
            # call) are scored and kept as they come, like the items of any stream cut short.
            refused = not (raw and rpc.client_streaming and _decodable_prefix(rpc, requests) > 0)
        if refused:
            changed = _changed(before, fingerprint(database, self.tables, without_signals=True))
            assert not changed, (
                f"{rpc.path} refused ({answer.code.name}: {answer.details or 'item errors'}) but changed "
                f"{changed}; sent {sent}"
            )
        return answer

    def serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _fuzz_each(prober: Prober, run: Callable[[Rpc], None]) -> None:
    """``run`` for every RPC; the server must still serve after each batch. All failures reported at once."""
    failures = []
    for rpc in _order(RPCS):
        try:
            run(rpc)
        except Exception as error:  # collected, so one run shows every broken RPC
            notes = "\n".join(getattr(error, "__notes__", []))
            failures.append(f"{rpc.path}: {type(error).__name__}: {error}\n{notes}")
        prober.serving()
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def world(server_factory: Callable[..., RunningServer]) -> World:
    # Without the number watch: its passes write on a clock of their own, and one between the snapshots of a
    # call would be taken for the call's doing.
    return _seed(server_factory(watch_interval_seconds=0))


@pytest.fixture
def prober(world: World) -> Iterator[Prober]:
    with grpc.insecure_channel(world.server.target) as channel:
        yield Prober(world, channel, _tables(world.server.server.database))


# -- the tests -----------------------------------------------------------------------------------------


def test_every_rpc_is_fuzzed_with_a_key_that_may_call_it() -> None:
    assert {r.path.split("/")[1] for r in RPCS} == {
        "posguard.v1.CustomerIds",
        "posguard.v1.Risk",
        "posguard.v1.Admin",
        "posguard.v1.Cases",
        "posguard.v1.Policy",
    }
    assert {r.path.split("/")[1] for r in RPCS} == set(SERVICE_NAMES)  # every service the server serves
    for rpc in RPCS:
        assert allowed_roles(rpc.path), f"{rpc.path} is in no role's matrix: the fuzzer could not reach it"


def test_random_and_hostile_messages_never_break_the_server(prober: Prober) -> None:
    strategies = Strategies.of(prober.world)

    def run(rpc: Rpc) -> None:
        @settings(FUZZ_SETTINGS, max_examples=_message_examples(rpc))
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            hostility = data.draw(HOSTILITY, label="hostility")
            count = data.draw(st.integers(0, 4), label="items") if rpc.client_streaming else 1
            requests = [
                data.draw(strategies.message(rpc.request.DESCRIPTOR, hostility)) for _ in range(count)
            ]
            prober.check(rpc, requests, raw=False)

        fuzz()

    _fuzz_each(prober, run)
    # Each RPC was reached past authentication, and nearly all got past validation at least once: a fuzzer
    # whose requests all bounce off validation would test little else. (An accepted stream says nothing by
    # itself: its items must get past validation.)
    shallow = []
    for rpc in RPCS:
        codes = prober.calls[rpc.name]
        assert not {"UNAUTHENTICATED", "PERMISSION_DENIED"} & codes.keys(), (rpc.name, codes)
        deeper = {c for c in codes if "INVALID_ARGUMENT" not in c} - (
            {"OK"} if rpc.client_streaming else set()
        )
        if not deeper:
            shallow.append(rpc.name)
    assert len(shallow) <= len(RPCS) // 10, f"only INVALID_ARGUMENT for {shallow}; all answers {prober.calls}"


def test_undecodable_truncated_and_oversized_bytes_never_break_the_server(prober: Prober) -> None:
    strategies = Strategies.of(prober.world)
    # One field just big enough to take the request over the server's receive limit.
    oversized = _field(UNKNOWN_FIELD, b"x" * MAX_MESSAGE_BYTES)

    def run(rpc: Rpc) -> None:
        answer = prober.check(rpc, [oversized], raw=True)
        assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc.path, answer.code, answer.details)

        @settings(FUZZ_SETTINGS, max_examples=WIRE_EXAMPLES)
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            payloads = wire_payloads(strategies, rpc)
            count = data.draw(st.integers(1, 3), label="items") if rpc.client_streaming else 1
            prober.check(rpc, [data.draw(payloads) for _ in range(count)], raw=True)

        fuzz()

    _fuzz_each(prober, run)


# -- regressions the fuzzer found ----------------------------------------------------------------------


def test_a_refused_score_neither_burns_the_dynamic_code_nor_takes_the_transaction_id(
    server: RunningServer,
) -> None:
    """A transaction naming a dynamic code is refused before the code is redeemed, or without keeping it.

    Scoring redeems the code first. A request_id already used for another transaction was refused only after
    the redemption, which burnt the customer's code (their real payment then declined as a replay); a code
    nobody has made the transaction id unusable for the retry with the code the cashier meant to type.
    """
    database = server.server.database
    tables = _tables(database)
    admin = posguard.Client(server.target, api_key=server.key(Role.ADMIN))
    gateway = posguard.Client(server.target, api_key=server.key(Role.GATEWAY))
    with admin, gateway:
        number = admin.issue_customer_id().customer.primary.number
        secret = admin.enroll_dynamic_codes(number=number).secret

        def payment(transaction_id: str, **customer: str) -> risk_pb2.Transaction:
            txn = risk_pb2.Transaction(
                transaction_id=transaction_id,
                amount=common_pb2.Money(amount_minor=1250, currency="CNY"),
                merchant_id="m-1",
                **customer,
            )
            txn.event_time.FromDatetime(datetime.now(UTC))
            return txn

        gateway.score_transaction(request_id="till-7", transaction=payment("t-1", customer_number=number))
        code = posguard.dynamic_code(secret)
        before = fingerprint(database, tables, without_signals=False)
        with pytest.raises(posguard.InvalidArgumentError) as refused:
            gateway.score_transaction(request_id="till-7", transaction=payment("t-2", dynamic_code=code))
        assert refused.value.reason == "IDEMPOTENCY_CONFLICT"
        assert _changed(before, fingerprint(database, tables, without_signals=False)) == []
        paid = gateway.score_transaction(transaction=payment("t-3", dynamic_code=code))
        assert paid.customer_id
        assert "DYNAMIC_CODE_REPLAYED" not in [r.code for r in paid.reasons]

        # A mistyped code: refused (and recorded as a risk signal), and the same transaction id then pays
        # with the right code (the next step's, as the current one is used).
        typo = code[:-1] + str((int(code[-1]) + 1) % 10)
        with pytest.raises(posguard.NotFoundError):
            gateway.score_transaction(transaction=payment("t-4", dynamic_code=typo))
        right = posguard.dynamic_code(secret, at=time.time() + PERIOD_SECONDS)
        retried = gateway.score_transaction(transaction=payment("t-4", dynamic_code=right))
        assert not retried.replayed
        assert "DYNAMIC_CODE_REPLAYED" not in [r.code for r in retried.reasons]
