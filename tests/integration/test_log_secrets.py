"""No secret or personal datum reaches a log line or an error a client sees, even with every logger at DEBUG.

A full session (keys, holders, numbers of a decimal and a Base32 scheme, sub numbers, external ids, dynamic
codes, scoring, lifecycle, audit, bad requests and bad keys) runs against a real server twice: in process with
a DEBUG handler on the root logger, and as ``posguard-server --log-level DEBUG serve`` with its stderr kept.
Everything an operator or a caller can read afterwards is then searched for every secret the session made or
presented: API key tokens and their secrets, dynamic-code secrets (as given, Base32, hex, base64, raw bytes),
holder names and phones, full customer numbers (canonical, grouped, Crockford Base32 of the value) and full
dynamic codes. Masked numbers (first and last four symbols) are allowed.

The search ignores case and the separators people and formatters insert (spaces, hyphens, dots, underscores),
so "1564 2011 …" and "1564-2011-…" are found as well as the canonical form.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp

import posguard
from posguard.dynamic_codes import parse_secret
from posguard.v1 import admin_pb2, common_pb2, customer_ids_pb2, risk_pb2
from posguard_server.cli import main as server_cli
from posguard_server.domain.check_digits import compute
from posguard_server.domain.customers import mask

if TYPE_CHECKING:
    from .conftest import RunningServer

V = customer_ids_pb2
R = risk_pb2
Selector = common_pb2.CustomerSelector
EXT = common_pb2.ExternalId
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SERVING_LINE = re.compile(r"posguard serving on 127\.0\.0\.1:(\d+)")
# Holders unlike anything a log line holds by chance, so a hit is a leak and not a coincidence.
HOLDERS = (("Zebulon Quixfield-Marrow", "+86 138 0013 8417"), ("Ottilie Vanderzwaag", "+44 (20) 7946-0958"))
ISSUERS = [
    {"issuer": "default", "country": "156", "region": "4201", "institution": "102"},
    # Short alphanumeric numbers: the Base32 rendering must be kept out of logs as well.
    {"issuer": "b32", "country": "156", "region": "4403", "institution": "305", "alphabet": "base32"},
]


# -- the search -----------------------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s\-_.=]")


def squash(text: str) -> str:
    """What the search compares: lower case, without separators."""
    return _SEPARATORS.sub("", text).lower()


def crockford(value: int) -> str:
    digits = ""
    while True:
        value, rest = divmod(value, 32)
        digits = CROCKFORD[rest] + digits
        if not value:
            return digits


@dataclass
class Secrets:
    """Every secret form the session produced or presented, by what it is (for the failure message)."""

    forms: dict[str, str] = field(default_factory=dict)  # squashed form -> label

    def add(self, label: str, *values: str) -> None:
        for value in values:
            form = squash(value)
            # Short forms would match by chance (and a masked number is short once its stars count as text).
            assert len(form) >= 10, f"{label}: {value!r} is too short to search for"
            self.forms[form] = label

    def number(self, number: str, display: str = "") -> None:
        self.add(f"customer number {mask(number)}", number, display or number)
        if number.isdigit():
            self.add(f"customer number {mask(number)} in Crockford Base32", crockford(int(number)))

    def api_key(self, token: str) -> None:
        self.add("API key token", token)
        self.add("API key secret", token.split("_", 2)[-1])

    def dynamic_secret(self, secret: str) -> None:
        _, key = parse_secret(secret)
        self.add("dynamic-code secret", secret, secret.rsplit(".", 1)[1])
        self.add("dynamic-code key (Base32)", base64.b32encode(key).decode())
        self.add("dynamic-code key (hex)", key.hex())
        self.add(
            "dynamic-code key (base64)",
            base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode(),
        )
        self.add("dynamic-code key (raw bytes)", repr(key)[2:-1], key.decode("latin-1"))

    def find(self, texts: list[str]) -> list[tuple[str, str]]:
        """(label, text) for every text holding a secret."""
        leaks = []
        for text in texts:
            flat = squash(text)
            leaks.extend((label, text) for form, label in self.forms.items() if form in flat)
        return leaks


def test_the_search_finds_planted_secrets_and_passes_masked_numbers() -> None:
    secrets = Secrets()
    number = "15642011028374651920"
    secrets.number(number, "1564 2011 0283 7465 1920")
    secrets.add("holder name", "Zebulon Quixfield-Marrow")
    key = bytes(range(32))
    secrets.dynamic_secret("pgd1.0123456789." + base64.b32encode(key).decode().rstrip("="))
    secrets.api_key("pgk_0123456789ab_" + "s3cr3t-Part_of-the-key-" * 2)
    planted = [
        "INFO posguard_server.access: /posguard.v1.CustomerIds/VerifyCustomerId 1564-2011-0283-7465-1920",
        f"DEBUG sqlalchemy.engine.Engine: Row ('{crockford(int(number)).lower()}',)",
        "ERROR x: key " + key.hex().upper(),
        f"DEBUG y: {key!r}",
        "WARNING z: ZEBULON QUIXFIELD MARROW called",
        "INFO k: bearer s3cr3t-Part_of-the-key-s3cr3t-Part_of-the-key-",
    ]
    found = secrets.find(planted)
    assert {text for _, text in found} == set(planted)
    clean = [f"INFO posguard_server.access: verified {mask(number)} caller=0123456789ab", "1564 2011"]
    assert secrets.find(clean) == []


# -- what is collected --------------------------------------------------------------------------------------


_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class Capture(logging.Handler):
    """Every record, formatted with its traceback, plus any structured extras a JSON formatter would print."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.loggers: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken log call must not break the RPC that made it; keep its raw parts
            text = f"UNFORMATTABLE {record.name} {record.msg!r} {record.args!r}"
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        self.lines.append(f"{text} {extras!r}" if extras else text)
        self.loggers.add(record.name)


@contextmanager
def everything_at_debug() -> Iterator[Capture]:
    """A DEBUG handler on the root logger, with every logger (ours, grpc, sqlalchemy, alembic) let through."""
    capture = Capture()
    root = logging.getLogger()
    names = {
        "posguard_server",
        "posguard_server.access",
        "sqlalchemy",
        "sqlalchemy.engine",
        "grpc",
        "alembic",
    }
    loggers = [root, *(logging.getLogger(n) for n in names | set(root.manager.loggerDict))]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers if isinstance(lg, logging.Logger)]
    for lg, _, _ in saved:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root.addHandler(capture)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled


@dataclass
class Session:
    """What one session left readable: error texts clients got, audit entries, and the secrets to look for."""

    target: str
    admin_token: str
    secrets: Secrets = field(default_factory=Secrets)
    answers: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)

    def client(self, token: str | None) -> posguard.Client:
        return posguard.Client(self.target, api_key=token, timeout=15)

    def refused(
        self, expected: grpc.StatusCode, call: Callable[..., Any], /, *args: Any, **fields: Any
    ) -> None:
        """Make a call that must fail with ``expected`` and keep everything the error told the client."""
        with pytest.raises(posguard.PosguardError) as raised:
            call(*args, **fields)
        error = raised.value
        assert error.code == expected, str(error)
        self.answers.append(str(error))
        self.answers.extend([error.message, error.reason, *error.metadata.keys(), *error.metadata.values()])
        self.answers.extend(f"{v.field}: {v.description}" for v in error.field_violations)


_clock = [datetime.now(UTC) - timedelta(days=1)]


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def txn(**fields: Any) -> R.Transaction:
    _clock[0] += timedelta(minutes=5)
    base: dict[str, Any] = {
        "transaction_id": "tx-" + uuid.uuid4().hex,
        "amount": common_pb2.Money(amount_minor=12_50, currency="CNY"),
        "merchant_id": "m-1",
        "terminal_id": "t-1",
        "mcc": "5411",
        "event_time": stamp(_clock[0]),
        "channel": common_pb2.CHANNEL_POS,
    }
    return R.Transaction(**{**base, **fields})


def forged_number(number: str) -> str:
    """A well-formed number with valid check digits that was never issued."""
    body = number[:-6] + str((int(number[-6:-2]) + 1) % 10_000).zfill(4)
    return body + compute(body)


def run_session(session: Session) -> None:
    """One story, told in order; codes are redeemed right after they are made (one step of skew is fine)."""
    s, seen = session, session.secrets
    ok = grpc.StatusCode  # the status each refusal must end with
    with s.client(s.admin_token) as admin:
        seen.api_key(s.admin_token)
        tokens = {}
        for role in (admin_pb2.ROLE_GATEWAY, admin_pb2.ROLE_AUDITOR, admin_pb2.ROLE_TRAINER):
            created = admin.create_api_key(name=f"role {role}", role=role)
            seen.api_key(created.token)
            tokens[role] = created.token
        doomed = admin.create_api_key(name="lost till", role=admin_pb2.ROLE_GATEWAY)
        seen.api_key(doomed.token)
        s.refused(ok.INVALID_ARGUMENT, admin.create_api_key, name="", role=admin_pb2.ROLE_UNSPECIFIED)
        s.refused(ok.NOT_FOUND, admin.revoke_api_key, key_id="0123456789ab", reason="gone")
        admin.list_api_keys(include_revoked=True)

    # Wrong keys: a wrong secret for a real key id, a key from nowhere, a bare secret, and garbage.
    key_id = s.admin_token.split("_")[1]
    wrong = [
        f"pgk_{key_id}_{'W' * 20}WrongSecretGuess{uuid.uuid4().hex}",
        f"pgk_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}{uuid.uuid4().hex}",
        s.admin_token.split("_", 2)[2],
        "not-a-posguard-key-" + uuid.uuid4().hex,
    ]
    for token in wrong:
        seen.add("presented wrong API key", token)
        with s.client(token) as stranger:
            s.refused(ok.UNAUTHENTICATED, stranger.verify_customer_id, number="1564 2011 0283 7465 1920")
    with s.client(None) as anonymous:
        s.refused(ok.UNAUTHENTICATED, anonymous.list_api_keys)

    gateway_token = tokens[admin_pb2.ROLE_GATEWAY]
    with s.client(gateway_token) as gateway, s.client(s.admin_token) as admin:
        # Numbers with holders and external ids, from both schemes.
        customers = []
        for (name, phone), issuer in zip(HOLDERS, ("", "b32"), strict=True):
            seen.add("holder name", name)
            seen.add("holder phone", phone, re.sub(r"\D", "", phone))
            issued = gateway.issue_customer_id(
                issuer=issuer,
                holder=V.Holder(name=name, phone=phone),
                external_ids=[EXT(namespace="bank", value=f"acct-{uuid.uuid4().hex[:8]}")],
            )
            customers.append(issued.customer)
            seen.number(issued.customer.primary.number, issued.customer.primary.display)
        decimal, b32 = customers
        number = decimal.primary.number
        s.refused(ok.PERMISSION_DENIED, gateway.list_customers)
        s.refused(
            ok.INVALID_ARGUMENT, gateway.issue_customer_id, issuer="nowhere", holder=V.Holder(name="x" * 300)
        )
        s.refused(
            ok.INVALID_ARGUMENT,
            gateway.issue_customer_id,
            holder=V.Holder(name=HOLDERS[0][0] + "\x07", phone=HOLDERS[0][1] + " ext. 12"),
        )
        s.refused(
            ok.ALREADY_EXISTS,
            gateway.issue_customer_id,
            holder=V.Holder(name=HOLDERS[1][0]),
            external_ids=[decimal.external_ids[0]],
        )
        admin.get_customer(customer=Selector(number=number), include_holder=True)
        gateway.get_customer(customer=Selector(number=b32.primary.number.lower()), include_holder=True)
        admin.list_customers()

        # Verification: as stored, as displayed, in lower case; a typo, a forgery, garbage, an overlong input.
        assert gateway.verify_customer_id(number=decimal.primary.display).valid
        assert gateway.verify_customer_id(number=b32.primary.display.lower()).valid
        typo = number[:5] + str((int(number[5]) + 1) % 10) + number[6:]
        forged = forged_number(number)
        seen.add("presented customer number", typo, forged)
        assert not gateway.verify_customer_id(number=typo).valid
        assert not gateway.verify_customer_id(number=forged).valid
        assert not gateway.verify_customer_id(number=number[:-1]).valid
        s.refused(ok.INVALID_ARGUMENT, gateway.verify_customer_id, number=number * 4)
        s.refused(ok.NOT_FOUND, gateway.get_customer, customer=Selector(number=forged))
        s.refused(ok.INVALID_ARGUMENT, gateway.get_customer, customer=Selector(number=typo))

        # Sub numbers and external ids.
        sub = gateway.issue_sub_id(
            primary_number=number, scope=V.SubScope(merchant_id="m-42"), label="family"
        )
        seen.number(sub.sub_number.number, sub.sub_number.display)
        assert not gateway.verify_customer_id(number=sub.sub_number.number, merchant_id="m-7").valid
        s.refused(ok.NOT_FOUND, gateway.issue_sub_id, primary_number=forged)
        s.refused(ok.FAILED_PRECONDITION, gateway.issue_sub_id, primary_number=sub.sub_number.number)
        gateway.link_external_id(
            customer=Selector(number=number), external_id=EXT(namespace="crm", value="c-9")
        )
        s.refused(
            ok.ALREADY_EXISTS,
            gateway.link_external_id,
            customer=Selector(number=b32.primary.number),
            external_id=EXT(namespace="crm", value="c-9"),
        )
        gateway.resolve_external_id(external_id=EXT(namespace="crm", value="c-9"))
        gateway.resolve_external_id(number=sub.sub_number.display)
        s.refused(ok.NOT_FOUND, gateway.resolve_external_id, number=forged)
        s.refused(
            ok.INVALID_ARGUMENT, gateway.resolve_external_id, external_id=EXT(namespace="Bad NS", value="")
        )

        # Dynamic codes: enrol (the secret), offline and server codes, redeem, replay, refusals, re-enrol.
        enrolled = gateway.enroll_dynamic_codes(number=number)
        seen.dynamic_secret(enrolled.secret)
        seen.add("dynamic-code provisioning URI", enrolled.provisioning_uri)
        s.refused(ok.FAILED_PRECONDITION, gateway.enroll_dynamic_codes, number=number)
        offline = posguard.dynamic_code(enrolled.secret)
        served = gateway.issue_dynamic_code(number=number).code
        seen.add("dynamic code", offline, served)
        assert gateway.redeem_dynamic_code(code=offline, merchant_id="m-1", expected_number=number).redeemed
        replay = gateway.redeem_dynamic_code(code=offline, merchant_id="m-1")
        assert replay.reason == V.REDEMPTION_REASON_ALREADY_USED
        wrong_customer = gateway.redeem_dynamic_code(
            code=served, merchant_id="m-1", expected_number=b32.primary.number
        )
        assert wrong_customer.reason == V.REDEMPTION_REASON_WRONG_CUSTOMER
        unknown_code = offline[:10] + str((int(offline[10:]) + 1) % 10**8).zfill(8)
        seen.add("presented dynamic code", unknown_code)
        assert not gateway.redeem_dynamic_code(code=unknown_code, merchant_id="m-1").redeemed
        s.refused(ok.INVALID_ARGUMENT, gateway.redeem_dynamic_code, code=offline + "7", merchant_id="")
        s.refused(ok.FAILED_PRECONDITION, gateway.issue_dynamic_code, number=b32.primary.number)
        s.refused(ok.NOT_FOUND, gateway.enroll_dynamic_codes, number=forged)
        again = gateway.enroll_dynamic_codes(number=number, replace_existing=True)
        seen.dynamic_secret(again.secret)
        seen.add("dynamic-code provisioning URI", again.provisioning_uri)

        # Scoring: by number, external id and dynamic code; a stream with a bad item; refusals; outcomes.
        first = gateway.score_transaction(transaction=txn(customer_number=decimal.primary.display))
        gateway.score_transaction(transaction=txn(external_id=decimal.external_ids[0]))
        by_code = posguard.dynamic_code(again.secret)
        seen.add("dynamic code", by_code)
        gateway.score_transaction(transaction=txn(dynamic_code=by_code))
        replayed = gateway.score_transaction(transaction=txn(dynamic_code=by_code))
        assert replayed.decision == R.DECISION_DECLINE
        s.refused(ok.NOT_FOUND, gateway.score_transaction, transaction=txn(customer_number=forged))
        s.refused(ok.INVALID_ARGUMENT, gateway.score_transaction, transaction=txn(customer_number=typo))
        s.refused(
            ok.INVALID_ARGUMENT,
            gateway.score_transaction,
            transaction=txn(
                dynamic_code=by_code[:-1], amount=common_pb2.Money(amount_minor=-5, currency="XXQ")
            ),
        )
        stream = [
            R.ScoreTransactionsRequest(transaction=txn(customer_number=b32.primary.number)),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=forged)),
            R.ScoreTransactionsRequest(transaction=txn(customer_number=typo, merchant_id="")),
        ]
        for item in gateway.score_transactions(stream):
            if item.HasField("error"):
                error = item.error
                s.answers.extend([error.code, error.reason, error.message])
                s.answers.extend(f"{v.field}: {v.description}" for v in error.field_violations)
        gateway.report_outcome(
            transaction_id=first.transaction_id, outcome=R.OUTCOME_FRAUD, note="card stolen"
        )
        s.refused(ok.NOT_FOUND, gateway.report_outcome, transaction_id="tx-none", outcome=R.OUTCOME_FRAUD)
        gateway.get_customer_risk_profile(customer=Selector(number=number))
        s.refused(ok.NOT_FOUND, gateway.get_customer_risk_profile, customer=Selector(number=forged))

        # Lifecycle: suspend, reactivate, rotate (a new number), revoke; illegal transitions.
        admin.suspend_customer_id(number=number, reason="card lost")
        assert not gateway.verify_customer_id(number=number).valid
        s.refused(ok.FAILED_PRECONDITION, admin.suspend_customer_id, number=number, reason="again")
        admin.reactivate_customer_id(number=number, reason="card found")
        rotated = admin.rotate_customer_id(number=number, reason="number leaked")
        seen.number(rotated.customer.primary.number, rotated.customer.primary.display)
        assert gateway.verify_customer_id(number=number).reason == V.VERIFICATION_REASON_ROTATED
        gateway.score_transaction(transaction=txn(customer_number=number))
        admin.revoke_customer_id(number=b32.primary.number, reason="closed")
        s.refused(
            ok.FAILED_PRECONDITION, admin.reactivate_customer_id, number=b32.primary.number, reason="oops"
        )
        s.refused(ok.INVALID_ARGUMENT, admin.rotate_customer_id, number=typo, reason="")
        s.refused(ok.NOT_FOUND, admin.revoke_customer_id, number=forged, reason="forged")
        gateway.score_transaction(transaction=txn(customer_number=b32.primary.display))

        # Keys: revoke one and try it.
        admin.revoke_api_key(key_id=doomed.key.key_id, reason="till stolen")
    with s.client(doomed.token) as stolen:
        s.refused(ok.UNAUTHENTICATED, stolen.issue_customer_id)

    # The audit trail, as an auditor reads it.
    with s.client(tokens[admin_pb2.ROLE_AUDITOR]) as auditor:
        token = ""
        while True:
            page = auditor.list_audit_events(page_token=token)
            s.audit.extend(f"{e.actor} {e.action} {e.subject} {dict(e.details)}" for e in page.events)
            token = page.next_page_token
            if not token:
                break
        assert auditor.verify_audit_log().intact
        s.refused(ok.INVALID_ARGUMENT, auditor.list_audit_events, page_token="garbage-token")
        s.refused(ok.PERMISSION_DENIED, auditor.get_customer, customer=Selector(number=number))
    with s.client(tokens[admin_pb2.ROLE_TRAINER]) as trainer:
        trainer.list_models()
        s.refused(ok.INVALID_ARGUMENT, trainer.promote_model, version="v-none", reason="")
    assert len(s.audit) > 10


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def assert_no_leaks(secrets: Secrets, **sources: list[str]) -> None:
    leaks = [(name, label, text) for name, texts in sources.items() for label, text in secrets.find(texts)]
    # One example per kind of leak and place, so the message stays readable when a leak repeats per call.
    examples = {
        (name, re.sub(r"[0-9A-Z*]{4}\*+[0-9A-Z]{4}", "…", label), text[:60]): text
        for name, label, text in leaks
    }
    report = "\n".join(f"{name}: {label} in {text[:300]!r}" for (name, label, _), text in examples.items())
    assert not leaks, f"{len(leaks)} leaks, {len(examples)} kinds:\n{report}"


def write_issuers(directory: Path) -> Path:
    path = directory / "issuers.json"
    path.write_text(json.dumps(ISSUERS))
    return path


def test_nothing_secret_is_logged_or_told_in_process(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    with everything_at_debug() as capture:
        running = server_factory(issuers_file=write_issuers(tmp_path))
        session = Session(running.target, running.key("admin"))
        run_session(session)
        metrics = scrape(running.server.metrics_port)
        report = CliRunner().invoke(
            server_cli,
            [
                "--data-dir",
                str(running.settings.data_dir),
                "--issuers-file",
                str(running.settings.issuers_file),
                "--log-level",
                "DEBUG",
                "audit",
                "report",
                "--json",
            ],
        )
        running.stop()
    assert report.exit_code == 0, report.output

    # The capture saw the whole stack at DEBUG, so a clean result means something.
    assert {"posguard_server.access", "sqlalchemy.engine.Engine"} <= capture.loggers, capture.loggers
    assert any(line.startswith("DEBUG sqlalchemy.engine.Engine: Row") for line in capture.lines)
    assert len(session.answers) > 50
    assert_no_leaks(session.secrets, log=capture.lines, errors=session.answers, metrics=[metrics])
    # Audit entries name numbers masked, and never a holder, key, dynamic-code secret or code.
    assert_no_leaks(session.secrets, audit=session.audit)
    # The operator's report lists full numbers on purpose (to act on them); nothing else secret.
    personal = Secrets(
        {form: label for form, label in session.secrets.forms.items() if "number" not in label}
    )
    assert_no_leaks(personal, report=[report.output])


def test_nothing_secret_is_logged_by_a_serve_process_at_debug(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flags = [
        "--data-dir",
        str(data_dir),
        "--issuers-file",
        str(write_issuers(tmp_path)),
        "--log-level",
        "debug",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "posguard_server", *flags, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=True,
        )

    created = cli("keys", "create", "--role", "admin", "--json")
    admin_token = json.loads(created.stdout)["token"]
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("w") as stderr:
        # stderr goes to a file, not a pipe: at DEBUG the server writes far more than a pipe buffer holds.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "posguard_server",
                *flags,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "0",
                "serve",
            ],
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline and process.poll() is None:
            match = SERVING_LINE.search(stderr_path.read_text())
            port = int(match.group(1)) if match else None
            time.sleep(0.05)
        assert port is not None, stderr_path.read_text()[-3000:]
        session = Session(f"127.0.0.1:{port}", admin_token)
        run_session(session)
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    log = stderr_path.read_text().splitlines()
    # The process logged at DEBUG, calls included, so a clean result means something.
    assert any("DEBUG" in line for line in log)
    assert sum("posguard_server.access" in line for line in log) > 50
    assert_no_leaks(
        session.secrets, serve=log, keys_create=created.stderr.splitlines(), errors=session.answers
    )
    assert_no_leaks(session.secrets, audit=session.audit)
