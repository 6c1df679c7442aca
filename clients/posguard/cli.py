"""``posguard``: talk to a running posguard server from a shell, one command per RPC.

    posguard --api-key pgk_... verify "1564 2011 0212 3456 7890"
    posguard --json keys list --all

Answers go to stdout (readable text, or JSON with ``--json``); errors go to stderr. The exit status says
how it went, in the table ``posguard-server`` shares (docs/cli.md):

    0  done, and the answer is yes
    1  the call failed or was refused (any gRPC error), or the server could not be reached
    2  usage error: a bad option or value
    3  the call worked but the answer is no: a number that does not verify, a refused dynamic code, a
       DECLINE, an audit log with a break
    4  the call worked and the transaction is held for REVIEW
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf import json_format, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import posguard
from posguard import _channel, errors
from posguard.v1 import admin_pb2, cases_pb2, common_pb2, customer_ids_pb2, policy_pb2, risk_pb2

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from google.protobuf.descriptor import EnumDescriptor
    from google.protobuf.message import Message

    # ParamType is generic only in recent click releases; at run time the plain class works on every 8.x.
    _ParamType = click.ParamType[Any, Any]
else:
    _ParamType = click.ParamType

M = TypeVar("M", bound="Message")


class EnumName(_ParamType):
    """An enum value by its short lower-case name (``pos`` for ``CHANNEL_POS``), read from the descriptor so
    new values in the contract show up here without a table to keep in step."""

    name = "choice"

    def __init__(self, enum: EnumDescriptor, *, exclude: tuple[str, ...] = ()) -> None:
        prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
        names = {v.name.removeprefix(prefix).lower(): v.number for v in enum.values if v.number}
        self.numbers = {name: number for name, number in names.items() if name not in exclude}

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.numbers) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        number = self.numbers.get(str(value).lower())
        if number is None:
            self.fail(f"{value!r} is not one of {', '.join(self.numbers)}", param, ctx)
        return number


class ExternalIdParam(_ParamType):
    """``NS:VALUE`` split at the last colon, because namespaces may themselves hold colons (``crm:acme``)."""

    name = "NS:VALUE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, common_pb2.ExternalId):
            return value
        namespace, _, external = str(value).rpartition(":")
        if not namespace or not external:
            self.fail(f"{value!r} is not NS:VALUE (e.g. bank:12345)", param, ctx)
        return common_pb2.ExternalId(namespace=namespace, value=external)


class Iso8601(_ParamType):
    """A point in time; one written without an offset is taken as UTC, the contract's only time zone."""

    name = "ISO8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses ``nan`` and ``inf``: ``nan`` passes every comparison click makes, and
    an infinite deadline makes gRPC fail the call at once with a misleading DEADLINE_EXCEEDED."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# Exit statuses, shared with posguard-server (docs/cli.md); click exits 2 on usage errors by itself.
EXIT_FAILED = 1
EXIT_NO = 3
EXIT_REVIEW = 4

# Bounds of the proto integer types, so an out-of-range value is a usage error naming its option rather
# than a ValueError from the protobuf runtime.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

CHANNEL = EnumName(common_pb2.Channel.DESCRIPTOR)
EXTERNAL = ExternalIdParam()
# NONE is a scope the server reports for rule decisions; no model lives there.
SCOPE = EnumName(risk_pb2.ModelScope.DESCRIPTOR, exclude=("none",))


@dataclass(frozen=True, slots=True)
class Globals:
    """The global options, and the two things every command does with them."""

    target: str
    api_key: str | None
    timeout: float
    tls: posguard.TLS | None
    as_json: bool

    def client(self) -> posguard.Client:
        return posguard.Client(self.target, api_key=self.api_key, timeout=self.timeout, tls=self.tls or False)

    def run(
        self,
        call: Callable[[posguard.Client], M],
        *,
        verdict: Callable[[M], int] | None = None,
        listing: Listing | None = None,
    ) -> None:
        """Make the call and print its answer, or report its error and exit 1.

        ``verdict`` turns an answer into its exit status (a "no" is an answer, printed before exiting
        non-zero); ``listing`` names the repeated field of a list answer, for its empty and paged cases.
        """
        try:
            with self.client() as client:
                answer = call(client)
        except errors.PosguardError as error:
            self.fail(error)
        self.show(answer, listing)
        status = verdict(answer) if verdict is not None else 0
        if status:
            sys.exit(status)

    def show(self, answer: Message, listing: Listing | None = None) -> None:
        # Fields at their defaults are printed too, so ``valid: false`` or an empty list is there to read
        # (and a script's JSON always has the same keys) rather than left out.
        fields = json_format.MessageToDict(
            answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        if self.as_json:
            click.echo(json.dumps(fields, indent=2, ensure_ascii=False))
            return
        more = fields.pop("next_page_token", "") if listing is not None else ""
        lines = list(_text_lines(fields))
        for line in lines:
            click.echo(line)
        if listing is not None and not fields.get(listing.field):
            click.echo(listing.empty)
        elif not lines:
            click.echo("(empty answer)")
        if more:
            # Last, so that a person sees the list was cut off and how to go on.
            click.echo(f"more: --page-token {more}")

    def fail(self, error: errors.PosguardError) -> NoReturn:
        message = error.message
        if error.code == grpc.StatusCode.UNAUTHENTICATED and not self.api_key:
            # The server speaks of gRPC metadata; a person at a shell sets a variable or an option.
            message = "no API key: set POSGUARD_API_KEY or pass --api-key"
        if self.as_json:
            report = {
                "code": error.code.name,
                "reason": error.reason,
                "message": message,
                "field_violations": [
                    {"field": v.field, "description": v.description} for v in error.field_violations
                ],
            }
            click.echo(json.dumps(report, indent=2), err=True)
        else:
            reason = f" ({error.reason})" if error.reason else ""
            click.echo(f"error: {error.code.name}{reason}: {message}", err=True)
            for violation in error.field_violations:
                click.echo(f"  {violation.field}: {violation.description}", err=True)
        sys.exit(EXIT_FAILED)


@dataclass(frozen=True, slots=True)
class Listing:
    """A list answer: its repeated ``field``, and what to print when a page of it is ``empty``."""

    field: str
    empty: str


def _yes_or_no(yes: bool) -> int:
    return 0 if yes else EXIT_NO


def _decision_status(answer: risk_pb2.ScoreTransactionResponse) -> int:
    """APPROVE is a yes; DECLINE a no; REVIEW its own status, since a gateway handles it differently."""
    if answer.decision == risk_pb2.DECISION_DECLINE:
        return EXIT_NO
    if answer.decision == risk_pb2.DECISION_REVIEW:
        return EXIT_REVIEW
    return 0


def _text_lines(value: Any, indent: str = "") -> Iterator[str]:
    """YAML-like lines for a message as a dict; empty strings and lists are left out as noise, while false
    and zero stay because they carry meaning (``valid: false``, ``declines: 0``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item in ("", [], {}):
                continue
            if isinstance(item, dict | list):
                yield f"{indent}{key}:"
                yield from _text_lines(item, indent + "  ")
            else:
                yield f"{indent}{key}: {json.dumps(item) if isinstance(item, bool) else item}"
    else:
        for item in value:
            block = (
                list(_text_lines(item, indent + "  ")) if isinstance(item, dict) else [f"{indent}  {item}"]
            )
            for i, line in enumerate(block):
                yield f"{indent}- {line[len(indent) + 2 :]}" if i == 0 else line


def _one_of(what: str, **choices: Any) -> dict[str, Any]:
    """The one choice given, as a keyword for a oneof; anything else is a usage error."""
    given = {name: value for name, value in choices.items() if value is not None}
    if len(given) != 1:
        raise click.UsageError(f"give exactly one of {what}")
    return given


def _selector(what: str, **choices: Any) -> common_pb2.CustomerSelector:
    return common_pb2.CustomerSelector(**_one_of(what, **choices))


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _page_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--page-token", default="", help="Token from the previous page (its last line, 'more: ...')."
    )(command)
    return click.option(
        "--page-size", type=click.IntRange(0, INT32_MAX), default=0, help="0 = the server default."
    )(command)


@click.group("posguard", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--target",
    envvar="POSGUARD_TARGET",
    default=_channel.DEFAULT_TARGET,
    show_default=True,
    show_envvar=True,
    help="Server address, host:port.",
)
@click.option(
    "--api-key",
    envvar="POSGUARD_API_KEY",
    show_envvar=True,
    help="API key (pgk_...); prefer the variable, since flags show up in process lists.",
)
@click.option(
    "--timeout",
    envvar="POSGUARD_TIMEOUT",
    # A day is far beyond any call's need, and far below where gRPC's deadline arithmetic overflows.
    type=FiniteFloatRange(min=0, min_open=True, max=86_400),
    default=_channel.DEFAULT_TIMEOUT,
    show_default=True,
    show_envvar=True,
    help="Deadline of each call, in seconds.",
)
@click.option(
    "--tls/--no-tls",
    envvar="POSGUARD_TLS",
    default=None,
    show_envvar=True,
    help="Use TLS [default: on when a CA, client certificate or server name is given].",
)
@click.option(
    "--ca-file",
    envvar="POSGUARD_CA_FILE",
    type=click.Path(exists=True, dir_okay=False),
    show_envvar=True,
    help="PEM CA bundle to trust instead of the system roots.",
)
@click.option(
    "--cert-file",
    envvar="POSGUARD_CERT_FILE",
    type=click.Path(exists=True, dir_okay=False),
    show_envvar=True,
    help="PEM client certificate, for mutual TLS.",
)
@click.option(
    "--key-file",
    envvar="POSGUARD_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False),
    show_envvar=True,
    help="PEM private key of --cert-file.",
)
@click.option(
    "--server-name",
    envvar="POSGUARD_SERVER_NAME",
    show_envvar=True,
    help="Name to expect in the server's certificate, if not the target's host.",
)
@click.option(
    "--json",
    "as_json",
    envvar="POSGUARD_JSON",
    is_flag=True,
    show_envvar=True,
    help="Print answers and errors as JSON.",
)
@click.pass_context
def main(
    ctx: click.Context,
    target: str,
    api_key: str | None,
    timeout: float,
    tls: bool | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    server_name: str | None,
    as_json: bool,
) -> None:
    """Call a posguard server: customer numbers, transaction risk, keys, models and the audit log."""
    tls_config = None
    if tls if tls is not None else any((ca_file, cert_file, key_file, server_name)):
        try:
            tls_config = posguard.TLS(
                ca_file=ca_file, cert_file=cert_file, key_file=key_file, server_name=server_name
            )
        except ValueError as error:
            raise click.UsageError(str(error).replace("_file", "-file")) from None
    ctx.obj = Globals(target=target, api_key=api_key, timeout=timeout, tls=tls_config, as_json=as_json)


pass_globals = click.make_pass_decorator(Globals)


@main.command()
@click.option("--service", default="", help="Service to ask about; empty = the server as a whole.")
@pass_globals
def health(g: Globals, service: str) -> None:
    """Standard gRPC health check; exit 1 unless SERVING."""
    channel = _channel.open_channel(
        g.target, g.tls, insecure=grpc.insecure_channel, secure=grpc.secure_channel
    )
    try:
        with channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=g.timeout
            )
    except grpc.RpcError as error:
        g.fail(errors.from_rpc_error(error))
    if g.as_json:
        g.show(answer)
    else:
        click.echo(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit(1)


# --- customer numbers ---------------------------------------------------------------------------------------


@main.command()
@click.option("--issuer", default="", help="Issuer whose scheme to use; empty = the server's default.")
@click.option("--merchant-part", default="", help="Merchant digits, for schemes that have them.")
@click.option("--holder-name", default=None, help="Holder's name, stored encrypted.")
@click.option("--holder-phone", default=None, help="Holder's phone (E.164), stored encrypted.")
@click.option("--external", type=EXTERNAL, multiple=True, help="External id to link; repeatable.")
@pass_globals
def issue(
    g: Globals,
    issuer: str,
    merchant_part: str,
    holder_name: str | None,
    holder_phone: str | None,
    external: tuple[common_pb2.ExternalId, ...],
) -> None:
    """Create a customer with a new primary number."""
    holder = None
    if holder_name is not None or holder_phone is not None:
        holder = customer_ids_pb2.Holder(name=holder_name or "", phone=holder_phone or "")
    g.run(
        lambda c: c.issue_customer_id(
            issuer=issuer, merchant_part=merchant_part, holder=holder, external_ids=list(external)
        )
    )


@main.command()
@click.argument("number")
@click.option("--merchant-id", default="", help="Merchant where it is presented, to check a sub's scope.")
@click.option("--channel", type=CHANNEL, default=None, help="Channel where it is presented.")
@pass_globals
def verify(g: Globals, number: str, merchant_id: str, channel: common_pb2.Channel.ValueType | None) -> None:
    """Check a number: format, state and scope; exit 3 when it does not verify."""
    g.run(
        lambda c: c.verify_customer_id(number=number, merchant_id=merchant_id, channel=channel),
        verdict=lambda answer: _yes_or_no(answer.valid),
    )


@main.command()
@click.argument("number", required=False)
@click.option("--customer-id", help="The customer's posguard id.")
@click.option("--external", type=EXTERNAL, help="An external id linked to the customer.")
@click.option("--include-holder", is_flag=True, help="Also show holder details (admin keys only).")
@pass_globals
def get(
    g: Globals,
    number: str | None,
    customer_id: str | None,
    external: common_pb2.ExternalId | None,
    include_holder: bool,
) -> None:
    """Show a customer, its numbers and external ids."""
    selector = _selector(
        "NUMBER, --customer-id or --external", number=number, customer_id=customer_id, external_id=external
    )
    g.run(lambda c: c.get_customer(customer=selector, include_holder=include_holder))


@main.command()
@click.option(
    "--status",
    type=EnumName(common_pb2.NumberStatus.DESCRIPTOR),
    default=None,
    help="Only customers whose primary number is in this state.",
)
@click.option("--issuer", default="", help="Only customers of this issuer.")
@_page_options
@pass_globals
def customers(g: Globals, status: int | None, issuer: str, page_size: int, page_token: str) -> None:
    """List customers, oldest first, one page at a time."""
    g.run(
        lambda c: c.list_customers(status=status, issuer=issuer, page_size=page_size, page_token=page_token),
        listing=Listing("customers", "no customers match"),
    )


def _lifecycle(name: str, doc: str, method: str) -> None:
    """The four transitions differ only in RPC, so one definition makes all of them."""

    @main.command(name, help=doc)
    @click.argument("number")
    @click.option("--reason", required=True, help="Why; recorded in the audit log.")
    @pass_globals
    def command(g: Globals, number: str, reason: str) -> None:
        g.run(lambda c: getattr(c, method)(number=number, reason=reason))


_lifecycle("suspend", "Suspend an ACTIVE number until it is reactivated.", "suspend_customer_id")
_lifecycle("reactivate", "Return a SUSPENDED number to ACTIVE.", "reactivate_customer_id")
_lifecycle("revoke", "Revoke a number for good.", "revoke_customer_id")
_lifecycle("rotate", "Replace a primary number with a new one.", "rotate_customer_id")


@main.command()
@click.argument("primary_number")
@click.option("--merchant-id", default="", help="The only merchant that may accept it.")
@click.option("--channel", type=CHANNEL, default=None, help="The only channel it may be used on.")
@click.option("--label", default="", help="A label for people, e.g. 'family card'.")
@pass_globals
def sub(
    g: Globals,
    primary_number: str,
    merchant_id: str,
    channel: common_pb2.Channel.ValueType | None,
    label: str,
) -> None:
    """Issue a sub number under a primary number."""
    scope = customer_ids_pb2.SubScope(
        merchant_id=merchant_id, channel=channel or common_pb2.CHANNEL_UNSPECIFIED
    )
    g.run(lambda c: c.issue_sub_id(primary_number=primary_number, scope=scope, label=label))


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="[NUMBER] NS:VALUE")
@click.option("--customer-id", help="The customer's posguard id, instead of NUMBER.")
@pass_globals
def link(g: Globals, args: tuple[str, ...], customer_id: str | None) -> None:
    """Link an external id to a customer."""
    if len(args) > 2:
        raise click.UsageError("expected [NUMBER] NS:VALUE")
    external = EXTERNAL.convert(args[-1], None, click.get_current_context())
    number = args[0] if len(args) == 2 else None
    selector = _selector("NUMBER or --customer-id", number=number, customer_id=customer_id)
    g.run(lambda c: c.link_external_id(customer=selector, external_id=external))


@main.command()
@click.argument("external", type=EXTERNAL, required=False, metavar="[NS:VALUE]")
@click.option("--number", help="Find the external ids of the customer owning this number.")
@click.option("--customer-id", help="Find the external ids of this customer.")
@click.option("--namespace", default="", help="Only external ids of this namespace.")
@pass_globals
def resolve(
    g: Globals,
    external: common_pb2.ExternalId | None,
    number: str | None,
    customer_id: str | None,
    namespace: str,
) -> None:
    """Map an external id to its customer, or back."""
    query = _one_of(
        "NS:VALUE, --number or --customer-id", external_id=external, number=number, customer_id=customer_id
    )
    g.run(lambda c: c.resolve_external_id(namespace=namespace, **query))


@main.command()
@click.argument("number")
@click.option("--replace", is_flag=True, help="Replace an existing enrolment; old codes stop working.")
@pass_globals
def enroll(g: Globals, number: str, replace: bool) -> None:
    """Enrol for dynamic codes (secret shown once)."""
    g.run(lambda c: c.enroll_dynamic_codes(number=number, replace_existing=replace))


@main.command()
@click.argument("number")
@pass_globals
def code(g: Globals, number: str) -> None:
    """Issue one dynamic payment code for an enrolled customer."""
    g.run(lambda c: c.issue_dynamic_code(number=number))


@main.command()
@click.argument("code")
@click.option("--expected-number", default="", help="Refuse the code unless it belongs to this number.")
@click.option("--merchant-id", required=True, help="The merchant redeeming it.")
@click.option("--terminal-id", default="", help="The terminal redeeming it.")
@pass_globals
def redeem(g: Globals, code: str, expected_number: str, merchant_id: str, terminal_id: str) -> None:
    """Redeem a dynamic code at a till; exit 3 when it is refused."""
    g.run(
        lambda c: c.redeem_dynamic_code(
            code=code, expected_number=expected_number, merchant_id=merchant_id, terminal_id=terminal_id
        ),
        verdict=lambda answer: _yes_or_no(answer.redeemed),
    )


# --- risk ---------------------------------------------------------------------------------------------------


@main.command()
@click.option("--transaction-id", required=True, help="The gateway's id of the transaction.")
@click.option("--number", help="Customer number of the payer.")
@click.option("--code", help="Dynamic code of the payer (scoring redeems it).")
@click.option("--external", type=EXTERNAL, help="External id of the payer.")
@click.option(
    "--amount-minor",
    type=click.IntRange(1, INT64_MAX),
    required=True,
    help="Amount in minor units (cents, fen); positive.",
)
@click.option("--currency", required=True, help="ISO 4217 code, e.g. CNY.")
@click.option("--merchant-id", required=True, help="The merchant.")
@click.option("--terminal-id", default="", help="The terminal.")
@click.option("--mcc", default="", help="Merchant category code, 4 digits.")
@click.option(
    "--time",
    "event_time",
    type=Iso8601(),
    required=True,
    help="When it happened, e.g. 2025-01-31T12:00:00Z (UTC if no offset is given).",
)
@click.option("--channel", type=CHANNEL, default=None, help="How it was paid.")
@click.option("--lat", type=FiniteFloatRange(-90, 90), default=None, help="Latitude in degrees.")
@click.option("--lon", type=FiniteFloatRange(-180, 180), default=None, help="Longitude in degrees.")
@pass_globals
def score(
    g: Globals,
    transaction_id: str,
    number: str | None,
    code: str | None,
    external: common_pb2.ExternalId | None,
    amount_minor: int,
    currency: str,
    merchant_id: str,
    terminal_id: str,
    mcc: str,
    event_time: datetime,
    channel: common_pb2.Channel.ValueType | None,
    lat: float | None,
    lon: float | None,
) -> None:
    """Score one transaction: risk score, decision and reasons.

    Exit 0 for APPROVE, 3 for DECLINE, 4 for REVIEW. Running the same command again replays the first
    answer (replayed: true) and changes nothing.
    """
    if (lat is None) != (lon is None):
        raise click.UsageError("give --lat and --lon together")
    payer = _one_of(
        "--number, --code or --external", customer_number=number, dynamic_code=code, external_id=external
    )
    transaction = risk_pb2.Transaction(
        transaction_id=transaction_id,
        amount=common_pb2.Money(amount_minor=amount_minor, currency=currency),
        merchant_id=merchant_id,
        terminal_id=terminal_id,
        mcc=mcc,
        event_time=_timestamp(event_time),
        channel=channel or common_pb2.CHANNEL_UNSPECIFIED,
        location=common_pb2.Location(latitude=lat, longitude=lon)
        if lat is not None and lon is not None
        else None,
        **payer,
    )
    # The server answers a transaction id it has seen with the stored answer when the transaction is the same
    # (a fingerprint of every field), whatever the request_id. So a re-run replays only if it sends the same
    # transaction: hence --time is required (a default of "now" would make every run a different
    # transaction, refused as IDEMPOTENCY_CONFLICT), and the request_id is derived from the transaction
    # rather than drawn at random, so that the whole request is the same. It is unique exactly when the
    # transaction is, since the transaction id is part of it.
    digest = hashlib.sha256(transaction.SerializeToString(deterministic=True)).hexdigest()
    g.run(
        lambda c: c.score_transaction(request_id=f"cli-score-{digest}", transaction=transaction),
        verdict=_decision_status,
    )


@main.command()
@click.argument("transaction_id")
@click.argument("outcome", type=EnumName(risk_pb2.Outcome.DESCRIPTOR))
@click.option("--note", default="", help="Case number or analyst's note.")
@pass_globals
def outcome(g: Globals, transaction_id: str, outcome: int, note: str) -> None:
    """Report what a scored transaction turned out to be."""
    g.run(lambda c: c.report_outcome(transaction_id=transaction_id, outcome=outcome, note=note))


@main.command()
@click.argument("number", required=False)
@click.option("--customer-id", help="The customer's posguard id.")
@click.option("--external", type=EXTERNAL, help="An external id linked to the customer.")
@pass_globals
def profile(
    g: Globals, number: str | None, customer_id: str | None, external: common_pb2.ExternalId | None
) -> None:
    """Show a customer's risk profile."""
    selector = _selector(
        "NUMBER, --customer-id or --external", number=number, customer_id=customer_id, external_id=external
    )
    g.run(lambda c: c.get_customer_risk_profile(customer=selector))


# --- review cases -------------------------------------------------------------------------------------------


@main.group()
def cases() -> None:
    """Work the review queue: list, show, assign and resolve cases (analyst and admin keys)."""


@cases.command("list")
@click.option(
    "--status",
    type=EnumName(cases_pb2.CaseStatus.DESCRIPTOR),
    default=None,
    help="Only cases in this status.",
)
@click.option("--kind", type=EnumName(cases_pb2.CaseKind.DESCRIPTOR), default=None, help="Only this kind.")
@click.option("--assignee", default="", help="Only cases assigned to this person.")
@click.option("--reason", default="", help="Only cases with this reason code, e.g. RISK_SCORE_HIGH.")
@click.option("--opened-after", type=Iso8601(), default=None, help="Only cases opened at or after this time.")
@click.option("--opened-before", type=Iso8601(), default=None, help="Only cases opened before this time.")
@_page_options
@pass_globals
def cases_list(
    g: Globals,
    status: int | None,
    kind: int | None,
    assignee: str,
    reason: str,
    opened_after: datetime | None,
    opened_before: datetime | None,
    page_size: int,
    page_token: str,
) -> None:
    """List cases, oldest first."""
    g.run(
        lambda c: c.list_cases(
            status=status,
            kind=kind,
            assignee=assignee,
            reason=reason,
            opened_after=_timestamp(opened_after) if opened_after else None,
            opened_before=_timestamp(opened_before) if opened_before else None,
            page_size=page_size,
            page_token=page_token,
        ),
        listing=Listing("cases", "no cases match"),
    )


@cases.command("show")
@click.argument("case_id")
@pass_globals
def cases_show(g: Globals, case_id: str) -> None:
    """Show a case: its transaction with score and reasons, and the customer's recent transactions."""
    g.run(lambda c: c.get_case(case_id=case_id))


@cases.command("assign")
@click.argument("case_id")
@click.argument("assignee")
@pass_globals
def cases_assign(g: Globals, case_id: str, assignee: str) -> None:
    """Assign a case that is not resolved (again, to reassign it)."""
    g.run(lambda c: c.assign_case(case_id=case_id, assignee=assignee))


@cases.command("resolve")
@click.argument("case_id")
@click.argument("resolution", type=EnumName(cases_pb2.CaseResolution.DESCRIPTOR))
@click.option("--note", default="", help="What was found; recorded with the outcome.")
@pass_globals
def cases_resolve(g: Globals, case_id: str, resolution: int, note: str) -> None:
    """Resolve a case: fraud or legitimate (recorded as the transaction's outcome), rotate or dismiss (a
    number watch case; rotate gives the customer a new number)."""
    g.run(lambda c: c.resolve_case(case_id=case_id, resolution=resolution, note=note))


# --- admin --------------------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (admin keys only)."""


@keys.command("create")
@click.option("--role", type=EnumName(admin_pb2.Role.DESCRIPTOR), required=True, help="What the key may do.")
@click.option("--name", required=True, help="Who uses the key, e.g. 'gateway eu-west'.")
@pass_globals
def keys_create(g: Globals, role: int, name: str) -> None:
    """Create an API key; its token is shown only this once."""
    g.run(lambda c: c.create_api_key(role=role, name=name))


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Also list revoked keys.")
@click.option(
    "--role", type=EnumName(admin_pb2.Role.DESCRIPTOR), default=None, help="Only keys of this role."
)
@_page_options
@pass_globals
def keys_list(g: Globals, include_revoked: bool, role: int | None, page_size: int, page_token: str) -> None:
    """List API keys, oldest first, without their secrets."""
    g.run(
        lambda c: c.list_api_keys(
            include_revoked=include_revoked, role=role, page_size=page_size, page_token=page_token
        ),
        listing=Listing("keys", "no keys match"),
    )


@keys.command("revoke")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def keys_revoke(g: Globals, key_id: str, reason: str) -> None:
    """Revoke an API key for good."""
    g.run(lambda c: c.revoke_api_key(key_id=key_id, reason=reason))


@main.group()
def models() -> None:
    """List, promote and roll back scoring models."""


@models.command("list")
@click.option("--scope", type=SCOPE, default=None, help="Only models of this scope.")
@click.option("--customer", "customer_id", default="", help="Only models of this customer.")
@click.option("--active", "active_only", is_flag=True, help="Only the active version of each scope.")
@_page_options
@pass_globals
def models_list(
    g: Globals, scope: int | None, customer_id: str, active_only: bool, page_size: int, page_token: str
) -> None:
    """List model versions, newest first."""
    if customer_id and scope == risk_pb2.MODEL_SCOPE_GLOBAL:
        raise click.UsageError("--customer lists customer models; it cannot go with --scope global")
    g.run(
        lambda c: c.list_models(
            scope=scope,
            customer_id=customer_id,
            active_only=active_only,
            page_size=page_size,
            page_token=page_token,
        ),
        listing=Listing("models", "no models match"),
    )


def _scope_of(customer_id: str) -> risk_pb2.ModelScope.ValueType:
    """A customer's model when a customer is named, else the global one: the only two scopes that can be
    promoted or rolled back, so naming the scope as well could only contradict --customer."""
    return risk_pb2.MODEL_SCOPE_CUSTOMER if customer_id else risk_pb2.MODEL_SCOPE_GLOBAL


@models.command("promote")
@click.option("--version", required=True, help="The version to make active.")
@click.option("--customer", "customer_id", default="", help="Promote this customer's model; else global.")
@click.option("--force", is_flag=True, help="Promote even if it is worse than the active model.")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def models_promote(g: Globals, version: str, customer_id: str, force: bool, reason: str) -> None:
    """Make a model version active: one customer's model with --customer, else the whole training run."""
    g.run(
        lambda c: c.promote_model(
            scope=_scope_of(customer_id), version=version, customer_id=customer_id, force=force, reason=reason
        )
    )


@models.command("rollback")
@click.option("--customer", "customer_id", default="", help="Roll back this customer's model; else global.")
@click.option(
    "--version", default="", help="The training run to roll back (global only; default: the active one's)."
)
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def models_rollback(g: Globals, customer_id: str, version: str, reason: str) -> None:
    """Make the previously active version active again: one customer's model with --customer, else the
    whole training run."""
    if customer_id and version:
        raise click.UsageError("--version names a training run to roll back; it cannot go with --customer")
    g.run(
        lambda c: c.rollback_model(
            scope=_scope_of(customer_id), customer_id=customer_id, version=version, reason=reason
        )
    )


@main.group()
def audit() -> None:
    """Read and verify the hash-chained audit log."""


@audit.command("list")
@click.option("--action", default="", help="Only this action, e.g. customer.suspended.")
@click.option("--actor", default="", help="Only this actor (a key id or 'cli').")
@click.option("--subject", default="", help="Only this subject, exactly as events show it.")
@_page_options
@pass_globals
def audit_list(g: Globals, action: str, actor: str, subject: str, page_size: int, page_token: str) -> None:
    """List audit events, oldest first."""
    g.run(
        lambda c: c.list_audit_events(
            action=action, actor=actor, subject=subject, page_size=page_size, page_token=page_token
        ),
        listing=Listing("events", "no audit events match"),
    )


@audit.command("verify")
@click.option(
    "--from-sequence", type=click.IntRange(0, INT64_MAX), default=0, help="Start here; 0 = the start."
)
@pass_globals
def audit_verify(g: Globals, from_sequence: int) -> None:
    """Recompute the audit log's hash chain and report the first break; exit 3 if there is one."""
    g.run(
        lambda c: c.verify_audit_log(from_sequence=from_sequence),
        verdict=lambda answer: _yes_or_no(answer.intact),
    )


# --- lists and rules ------------------------------------------------------------------------------------

LIST_KIND = EnumName(policy_pb2.ListKind.DESCRIPTOR)
LIST_TYPE = EnumName(policy_pb2.ListType.DESCRIPTOR)
RULE_ACTION = EnumName(policy_pb2.RuleAction.DESCRIPTOR)
RULE_STATUS = EnumName(policy_pb2.RuleStatus.DESCRIPTOR)
MOMENT = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"])


def _utc_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A time given on the command line, read as UTC when it names no zone."""
    return _timestamp(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


@main.group()
def lists() -> None:
    """Deny and allow lists: create them, add and remove entries (admin keys change them)."""


@lists.command("create")
@click.argument("name")
@click.option("--kind", type=LIST_KIND, required=True, help="What the list holds.")
@click.option("--type", "list_type", type=LIST_TYPE, required=True, help="deny or allow.")
@click.option("--description", default="", help="What the list is for.")
@pass_globals
def lists_create(g: Globals, name: str, kind: int, list_type: int, description: str) -> None:
    """Create an empty list."""
    g.run(lambda c: c.create_list(name=name, kind=kind, type=list_type, description=description))


@lists.command("list")
@pass_globals
def lists_list(g: Globals) -> None:
    """Show every list with its count of unexpired entries."""
    g.run(lambda c: c.list_lists(), listing=Listing("lists", "no lists"))


@lists.command("add")
@click.argument("name")
@click.argument("value")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@click.option("--expires", type=MOMENT, default=None, help="When the entry stops matching (UTC).")
@pass_globals
def lists_add(g: Globals, name: str, value: str, reason: str, expires: datetime | None) -> None:
    """Add VALUE to list NAME (or replace its entry)."""
    request = policy_pb2.AddListEntryRequest(list_name=name, value=value, reason=reason)
    if expires is not None:
        request.expires_at.CopyFrom(_utc_timestamp(expires))
    g.run(lambda c: c.add_list_entry(request))


@lists.command("remove")
@click.argument("name")
@click.argument("value")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def lists_remove(g: Globals, name: str, value: str, reason: str) -> None:
    """Remove VALUE from list NAME; exit 3 if it was not there."""
    g.run(
        lambda c: c.remove_list_entry(list_name=name, value=value, reason=reason),
        verdict=lambda answer: _yes_or_no(answer.removed),
    )


@lists.command("entries")
@click.argument("name")
@click.option("--all", "include_expired", is_flag=True, help="Also show expired entries.")
@_page_options
@pass_globals
def lists_entries(g: Globals, name: str, include_expired: bool, page_size: int, page_token: str) -> None:
    """Show the entries of list NAME, oldest first."""
    g.run(
        lambda c: c.list_entries(
            list_name=name, include_expired=include_expired, page_size=page_size, page_token=page_token
        ),
        listing=Listing("entries", "no entries"),
    )


@main.group()
def rules() -> None:
    """Rules: create drafts, activate, retire, list and backtest them (admin keys change them)."""


@rules.command("create")
@click.argument("name")
@click.option("--condition", required=True, help="The condition, in the rule language (docs/rules.md).")
@click.option("--action", type=RULE_ACTION, required=True, help="What the rule does when it holds.")
@click.option("--reason", required=True, help="The sentence answers carry when it fires.")
@pass_globals
def rules_create(g: Globals, name: str, condition: str, action: int, reason: str) -> None:
    """Add a draft version of rule NAME."""
    g.run(lambda c: c.create_rule(name=name, condition=condition, action=action, reason=reason))


@rules.command("activate")
@click.argument("name")
@click.option("--version", type=click.IntRange(0, INT32_MAX), default=0, help="The draft; 0: the newest.")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def rules_activate(g: Globals, name: str, version: int, reason: str) -> None:
    """Make a draft version of rule NAME active (the active one is retired)."""
    g.run(lambda c: c.activate_rule(name=name, version=version, reason=reason))


@rules.command("retire")
@click.argument("name")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@pass_globals
def rules_retire(g: Globals, name: str, reason: str) -> None:
    """Retire the active version of rule NAME."""
    g.run(lambda c: c.retire_rule(name=name, reason=reason))


@rules.command("list")
@click.option("--name", default="", help="Only versions of this rule.")
@click.option("--status", type=RULE_STATUS, default=None, help="Only versions in this status.")
@pass_globals
def rules_list(g: Globals, name: str, status: int | None) -> None:
    """Show rule versions, by name, newest version first."""
    g.run(lambda c: c.list_rules(name=name, status=status), listing=Listing("rules", "no rules"))


@rules.command("backtest")
@click.option(
    "--rule", "rule_names", multiple=True, help="NAME or NAME@VERSION of a stored rule; repeatable."
)
@click.option("--condition", "conditions", multiple=True, help="A condition to try as is; repeatable.")
@click.option("--action", type=RULE_ACTION, default="decline", help="What --condition rules would do.")
@click.option("--list", "list_names", multiple=True, help="A list to replay; repeatable.")
@click.option("--start", type=MOMENT, required=True, help="From this event time (UTC).")
@click.option("--end", type=MOMENT, required=True, help="Up to this event time, excluded (UTC).")
@pass_globals
def rules_backtest(
    g: Globals,
    rule_names: tuple[str, ...],
    conditions: tuple[str, ...],
    action: policy_pb2.RuleAction.ValueType,
    list_names: tuple[str, ...],
    start: datetime,
    end: datetime,
) -> None:
    """Replay stored transactions through rules and lists: hits, fraud among them, changed decisions."""
    refs = []
    for text in rule_names:
        name, _, version = text.partition("@")
        if version and not version.isdigit():
            raise click.UsageError(f"--rule {text}: the version after @ must be a number")
        refs.append(policy_pb2.RuleRef(name=name, version=int(version or 0)))
    candidates = [
        policy_pb2.CandidateRule(name=f"CONDITION_{i + 1}", condition=text, action=action)
        for i, text in enumerate(conditions)
    ]
    g.run(
        lambda c: c.backtest_rules(
            rules=refs,
            conditions=candidates,
            lists=list(list_names),
            start_time=_utc_timestamp(start),
            end_time=_utc_timestamp(end),
        )
    )
