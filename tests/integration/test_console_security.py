"""The console's security properties, over HTTP against a real server (no browser).

No page or action without a session; each role's pages and actions exactly as its RPCs (this file's own table
of which RPC each page stands for, checked against ``api.access``); a form without its CSRF token refused and
changing nothing; a value with markup shown as text; the headers and cookie attributes; the key never shown
back; a revoked key's session ended.
"""

from __future__ import annotations

import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import func, select

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_server.api.access import allowed_roles
from posguard_server.domain.api_keys import Role
from posguard_server.domain.audit import AuditEvent
from posguard_server.store.audit import SqlAuditEvent, SqlAuditStore
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    from .conftest import Pki, RunningServer

# Which RPC each page and action stands for, written out here apart from the console's own declaration.
# "" is the overview (and signing out): every key that may sign in.
EXPECTED_RPC: dict[tuple[str, str], str] = {
    ("POST", "/signout"): "",
    ("GET", "/overview"): "",
    ("GET", "/overview/live"): "",
    ("GET", "/numbers"): "/posguard.v1.CustomerIds/GetCustomer",
    ("POST", "/numbers"): "/posguard.v1.CustomerIds/GetCustomer",
    ("POST", "/numbers/suspend"): "/posguard.v1.CustomerIds/SuspendCustomerId",
    ("POST", "/numbers/reactivate"): "/posguard.v1.CustomerIds/ReactivateCustomerId",
    ("POST", "/numbers/revoke"): "/posguard.v1.CustomerIds/RevokeCustomerId",
    ("POST", "/numbers/rotate"): "/posguard.v1.CustomerIds/RotateCustomerId",
    ("GET", "/customers/{customer_id}"): "/posguard.v1.CustomerIds/GetCustomer",
    ("GET", "/watch"): "/posguard.v1.Cases/ListCases",
    ("GET", "/cases"): "/posguard.v1.Cases/ListCases",
    ("GET", "/cases/{case_id}"): "/posguard.v1.Cases/GetCase",
    ("POST", "/cases/{case_id}/assign"): "/posguard.v1.Cases/AssignCase",
    ("POST", "/cases/{case_id}/resolve"): "/posguard.v1.Cases/ResolveCase",
    ("GET", "/policy"): "/posguard.v1.Policy/ListLists",
    ("POST", "/policy/lists"): "/posguard.v1.Policy/CreateList",
    ("GET", "/policy/lists/{list_name}"): "/posguard.v1.Policy/ListEntries",
    ("POST", "/policy/lists/{list_name}/add"): "/posguard.v1.Policy/AddListEntry",
    ("POST", "/policy/lists/{list_name}/remove"): "/posguard.v1.Policy/RemoveListEntry",
    ("GET", "/policy/rules"): "/posguard.v1.Policy/ListRules",
    ("POST", "/policy/rules"): "/posguard.v1.Policy/CreateRule",
    ("POST", "/policy/rules/{rule}/activate"): "/posguard.v1.Policy/ActivateRule",
    ("POST", "/policy/rules/{rule}/retire"): "/posguard.v1.Policy/RetireRule",
    ("GET", "/policy/backtest"): "/posguard.v1.Policy/BacktestRules",
    ("POST", "/policy/backtest"): "/posguard.v1.Policy/BacktestRules",
    ("GET", "/models"): "/posguard.v1.Admin/ListModels",
    ("GET", "/models/reports/{version}/{name}"): "/posguard.v1.Admin/ListModels",
    ("POST", "/models/promote"): "/posguard.v1.Admin/PromoteModel",
    ("POST", "/models/rollback"): "/posguard.v1.Admin/RollbackModel",
    ("GET", "/audit"): "/posguard.v1.Admin/ListAuditEvents",
    ("GET", "/audit/verify"): "/posguard.v1.Admin/VerifyAuditLog",
}
PEOPLE = (Role.ADMIN, Role.AUDITOR, Role.TRAINER, Role.ANALYST)
MARKUP = '<script>alert("x")</script><b>bold</b>'


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url)


def base_url(server: RunningServer, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.server.console_port}"


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def sign_in(server: RunningServer, role: Role | str, **client: Any) -> httpx.Client:
    """An HTTP client signed in with a key of ``role``."""
    http = httpx.Client(base_url=client.pop("base_url", base_url(server)), timeout=30, **client)
    form = http.get("/signin")
    answer = http.post("/signin", data={"csrf": csrf_of(form.text), "api_key": server.key(role)})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/overview"
    return http


@pytest.fixture
def signed_in(running: RunningServer) -> Iterator[Callable[[Role], httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(role: Role) -> httpx.Client:
        clients.append(sign_in(running, role))
        return clients[-1]

    yield make
    for http in clients:
        http.close()


def audit_length(server: RunningServer) -> int:
    with server.server.database.session(read_only=True) as session:
        return int(session.scalar(select(func.count()).select_from(SqlAuditEvent)) or 0)


def review_case(server: RunningServer) -> tuple[str, str, str]:
    """A customer with one transaction decided REVIEW (no model yet): (customer id, number, case id)."""
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=30) as client:
        customer = client.issue_customer_id().customer
        stamp = datetime.now(UTC) - timedelta(minutes=1)
        transaction = risk_pb2.Transaction(
            transaction_id="tx-" + uuid.uuid4().hex,
            customer_number=customer.primary.number,
            amount=common_pb2.Money(amount_minor=12_50, currency="CNY"),
            merchant_id="m-1",
            terminal_id="t-1",
            mcc="5411",
            channel=common_pb2.CHANNEL_POS,
        )
        transaction.event_time.FromDatetime(stamp)
        answer = client.score_transaction(transaction=transaction)
    assert answer.decision == risk_pb2.DECISION_REVIEW
    with posguard.Client(server.target, api_key=server.key("analyst"), timeout=30) as client:
        cases = client.list_cases().cases
    assert len(cases) == 1
    return customer.customer_id, customer.primary.number, cases[0].case_id


def concrete(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def test_the_console_declares_exactly_the_pages_this_test_knows(running: RunningServer) -> None:
    assert running.server.console is not None
    declared = {(method, path): rpc for method, path, rpc in running.server.console.routes}
    assert declared == EXPECTED_RPC


def test_no_page_or_action_without_a_session(running: RunningServer) -> None:
    customer_id, _, case_id = review_case(running)
    values = {"customer_id": customer_id, "case_id": case_id, "version": "r1", "name": "index.html"}
    values |= {"list_name": "blocked-terminals", "rule": "BIG_AMOUNT"}
    before = audit_length(running)
    with httpx.Client(base_url=base_url(running), timeout=30) as http:
        for method, path in EXPECTED_RPC:
            answer = http.request(method, concrete(path, values), data={"reason": "x", "resolution": "fraud"})
            assert answer.status_code == 303, (method, path)
            assert answer.headers["location"] == "/signin", (method, path)
            assert "<table" not in answer.text
        # An htmx poll is told to go to the sign-in page instead.
        polled = http.get("/overview/live", headers={"HX-Request": "true"})
        assert polled.status_code == 401
        assert polled.headers["hx-redirect"] == "/signin"
        # A made-up session cookie is no session.
        http.cookies.set("posguard_console", "made-up")
        assert http.get("/overview").status_code == 303
    assert audit_length(running) == before


@pytest.mark.parametrize("role", PEOPLE, ids=[r.value for r in PEOPLE])
def test_a_role_has_the_pages_and_actions_of_its_rpcs(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client], role: Role
) -> None:
    customer_id, _, case_id = review_case(running)
    values = {"customer_id": customer_id, "case_id": case_id, "version": "r1", "name": "index.html"}
    values |= {"list_name": "blocked-terminals", "rule": "BIG_AMOUNT"}
    http = signed_in(role)
    csrf = csrf_of(http.get("/overview").text)
    allowed_pages: set[str] = set()
    # Signing out last: every other request needs the session.
    for method, path in sorted(EXPECTED_RPC, key=lambda route: route[1] == "/signout"):
        rpc = EXPECTED_RPC[(method, path)]
        expected = rpc == "" or role in allowed_roles(rpc)
        # Actions get their token and nothing else: an allowed one is refused as bad input, not as denied.
        answer = http.request(method, concrete(path, values), data={"csrf": csrf})
        if expected:
            assert answer.status_code != 403, (role, method, path, answer.text)
            if path != "/signout":  # which does send the key to the sign-in page
                assert answer.headers.get("location") != "/signin", (role, method, path)
            if method == "GET":
                allowed_pages.add(path)
        else:
            assert answer.status_code == 403, (role, method, path)
            assert "may not use this page" in answer.text
    # The navigation offers exactly the pages the role may open (signed out above: sign in again).
    http = signed_in(role)
    offered = set(re.findall(r'<a href="(/[a-z]+)" accesskey', http.get("/overview").text))
    assert offered == {p for p in allowed_pages if p.count("/") == 1}


def test_a_gateway_key_cannot_sign_in(running: RunningServer) -> None:
    with httpx.Client(base_url=base_url(running), timeout=30) as http:
        form = http.get("/signin")
        answer = http.post("/signin", data={"csrf": csrf_of(form.text), "api_key": running.key("gateway")})
        assert answer.status_code == 403
        assert "have no console pages" in answer.text
        assert "posguard_console" not in http.cookies
        assert http.get("/overview").status_code == 303


def test_a_wrong_key_is_refused_and_never_shown_back(running: RunningServer) -> None:
    real = running.key("admin")
    key_id = real.split("_")[1]
    wrong = f"pgk_{key_id}_{'x' * 40}"
    with httpx.Client(base_url=base_url(running), timeout=30) as http:
        for attempt in (wrong, "<b>not a key</b>"):
            form = http.get("/signin")
            answer = http.post("/signin", data={"csrf": csrf_of(form.text), "api_key": attempt})
            assert answer.status_code == 401
            assert "That API key is not valid." in answer.text
            assert attempt not in answer.text
            assert "not a key" not in answer.text
    http = sign_in(running, "admin")
    try:
        secret = real.split("_", 2)[2]  # pgk_<key id>_<secret>; the secret may hold "_" itself
        for path in ("/overview", "/audit", "/models", "/numbers"):
            assert secret not in http.get(path).text
    finally:
        http.close()


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    _, _, case_id = review_case(running)
    http = signed_in(Role.ANALYST)
    other = signed_in(Role.ADMIN)
    before = audit_length(running)
    form = {"resolution": "fraud", "note": "n", "request_id": "console-1"}
    for token in (None, "", "wrong", csrf_of(http.get("/signin", follow_redirects=True).text) + "x"):
        data = form if token is None else {**form, "csrf": token}
        answer = http.post(f"/cases/{case_id}/resolve", data=data)
        assert answer.status_code == 403
        assert "The form was not sent from this console" in answer.text
    # Another session's token is not this session's.
    answer = http.post(f"/cases/{case_id}/resolve", data={**form, "csrf": csrf_of(other.get("/cases").text)})
    assert answer.status_code == 403
    assert audit_length(running) == before
    page = http.get(f"/cases/{case_id}").text
    assert re.search(r'id="case-status">open<', page)
    # With its token, the same form resolves the case.
    answer = http.post(f"/cases/{case_id}/resolve", data={**form, "csrf": csrf_of(page)})
    assert answer.status_code == 303
    assert re.search(r'id="case-status">resolved: fraud<', http.get(f"/cases/{case_id}").text)


def test_sign_in_needs_its_own_csrf_token(running: RunningServer) -> None:
    with httpx.Client(base_url=base_url(running), timeout=30) as http:
        # No sign-in cookie (a form posted from another site): refused.
        answer = http.post("/signin", data={"csrf": "anything", "api_key": running.key("admin")})
        assert answer.status_code == 403
        assert "posguard_console" not in http.cookies


def test_values_with_markup_are_shown_as_text(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    with posguard.Client(running.target, api_key=running.key("admin"), timeout=30) as client:
        customer = client.issue_customer_id(
            external_ids=[common_pb2.ExternalId(namespace="crm", value=MARKUP)]
        ).customer
    _, _, case_id = review_case(running)
    http = signed_in(Role.ADMIN)
    page = http.get(f"/customers/{customer.customer_id}").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>alert" not in page
    assert "<b>bold" not in page
    found = http.post(
        "/numbers",
        data={"csrf": csrf_of(page), "by": "external", "namespace": "crm", "value": MARKUP},
    )
    assert found.status_code == 200
    assert "<script>alert" not in found.text
    assert customer.customer_id in found.text
    # A note an analyst typed, shown on the case and in the audit log.
    csrf = csrf_of(page)
    http.post(
        f"/cases/{case_id}/resolve",
        data={"csrf": csrf, "resolution": "legitimate", "note": MARKUP, "request_id": "console-markup"},
    )
    for path in (f"/cases/{case_id}", "/audit?action=case.resolved"):
        shown = http.get(path).text
        assert "<script>alert" not in shown
        assert "&lt;script&gt;" in shown


def test_the_headers_are_set(running: RunningServer, signed_in: Callable[[Role], httpx.Client]) -> None:
    http = signed_in(Role.ADMIN)
    with httpx.Client(base_url=base_url(running), timeout=30) as anonymous:
        answers = {
            "signin": anonymous.get("/signin"),
            "page": http.get("/overview"),
            "fragment": http.get("/overview/live"),
            "static": http.get("/static/htmx.min.js"),
            "denied": anonymous.get("/audit"),
        }
    for name, answer in answers.items():
        headers = answer.headers
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy, name
        assert "script-src 'self'" in policy, name
        assert "unsafe-inline" not in policy, name
        assert "unsafe-eval" not in policy, name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert "server" not in headers, name
    assert answers["page"].headers["cache-control"] == "no-store"
    assert answers["static"].status_code == 200
    # No inline script anywhere: every script is a file of the console's own.
    assert re.findall(r"<script[^>]*>", answers["page"].text) == [
        '<script src="/static/htmx.min.js" defer>',
        '<script src="/static/console.js" defer>',
    ]


def test_the_session_cookie_is_httponly_strict_and_expires(running: RunningServer) -> None:
    with httpx.Client(base_url=base_url(running), timeout=30) as http:
        form = http.get("/signin")
        answer = http.post("/signin", data={"csrf": csrf_of(form.text), "api_key": running.key("auditor")})
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and "posguard_console=" in v
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain HTTP here; see the TLS test


def test_under_tls_the_cookie_is_secure_and_hsts_is_sent(
    server_factory: Callable[..., RunningServer], pki: Pki
) -> None:
    running = server_factory(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    http = sign_in(
        running,
        "admin",
        base_url=base_url(running, "https"),
        verify=ssl.create_default_context(cafile=pki.ca),
    )
    try:
        page = http.get("/overview")
        assert page.status_code == 200
        assert "max-age" in page.headers["strict-transport-security"]
        assert "__Host-posguard_console" in http.cookies
    finally:
        http.close()
    with httpx.Client(
        base_url=base_url(running, "https"), timeout=30, verify=ssl.create_default_context(cafile=pki.ca)
    ) as other:
        form = other.get("/signin")
        answer = other.post("/signin", data={"csrf": csrf_of(form.text), "api_key": running.key("admin")})
    cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and "__Host-" in v)
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}


def test_a_revoked_key_loses_its_session(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    http = signed_in(Role.AUDITOR)
    assert http.get("/audit").status_code == 200
    key_id = running.key("auditor").split("_")[1]
    with posguard.Client(running.target, api_key=running.key("admin"), timeout=30) as client:
        client.revoke_api_key(key_id=key_id, reason="left the team")
    answer = http.get("/audit")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/signin"


def test_signing_out_ends_the_session_and_both_are_audited(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    http = signed_in(Role.TRAINER)
    key_id = running.key("trainer").split("_")[1]
    csrf = csrf_of(http.get("/overview").text)
    stale = dict(http.cookies)
    assert http.post("/signout", data={"csrf": csrf}).headers["location"] == "/signin"
    with httpx.Client(base_url=base_url(running), timeout=30, cookies=stale) as replay:
        assert replay.get("/models").status_code == 303
    admin = signed_in(Role.ADMIN)
    log = admin.get(f"/audit?actor={key_id}").text
    assert "console.sign_in" in log
    assert "console.sign_out" in log


def test_a_report_is_served_only_from_the_reports_folder(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    reports = Path(running.settings.effective_reports_dir)
    (reports / "r1").mkdir(parents=True)
    (reports / "r1" / "index.html").write_text("<html><body><h1>run r1</h1></body></html>")
    (reports / "secret.html").write_text("not a report")
    http = signed_in(Role.TRAINER)
    report = http.get("/models/reports/r1/index.html")
    assert report.status_code == 200
    assert "run r1" in report.text
    assert "sandbox" in report.headers["content-security-policy"]
    for path in (
        "/models/reports/../secret.html",
        "/models/reports/r1/..%2F..%2Fsecret.html",
        "/models/reports/r1/other.txt",
        "/models/reports/r2/index.html",
    ):
        answer = http.get(path)
        assert answer.status_code == 404, path
        assert "not a report" not in answer.text


def test_a_merchant_id_holding_script_renders_as_text(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    merchant = '<script>alert("m")</script>'
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=30) as client:
        customer = client.issue_customer_id().customer
        transaction = risk_pb2.Transaction(
            transaction_id="tx-" + uuid.uuid4().hex,
            customer_number=customer.primary.number,
            amount=common_pb2.Money(amount_minor=12_50, currency="CNY"),
            merchant_id=merchant,
            channel=common_pb2.CHANNEL_POS,
        )
        transaction.event_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
        assert client.score_transaction(transaction=transaction).decision == risk_pb2.DECISION_REVIEW
    with posguard.Client(running.target, api_key=running.key("analyst"), timeout=30) as client:
        (case,) = client.list_cases().cases
    http = signed_in(Role.ADMIN)
    for path in (f"/customers/{customer.customer_id}", f"/cases/{case.case_id}"):
        page = http.get(path).text
        assert "&lt;script&gt;alert(&#34;m&#34;)&lt;/script&gt;" in page, path
        assert "<script>alert" not in page, path


def test_an_expired_session_is_sent_to_sign_in(server_factory: Callable[..., RunningServer]) -> None:
    running = server_factory(console_session_seconds=1)
    http = sign_in(running, Role.AUDITOR)
    try:
        assert http.get("/audit").status_code == 200
        time.sleep(1.5)
        expired = http.get("/audit")
        assert expired.status_code == 303
        assert expired.headers["location"] == "/signin"
    finally:
        http.close()


def test_a_trainer_cannot_rotate_a_number(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    _, number, _ = review_case(running)
    http = signed_in(Role.TRAINER)
    csrf = csrf_of(http.get("/overview").text)
    before = audit_length(running)
    answer = http.post(
        "/numbers/rotate", data={"csrf": csrf, "number": number, "reason": "x", "request_id": "rotate-1"}
    )
    assert answer.status_code == 403
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=30) as client:
        assert client.verify_customer_id(number=number).valid  # still the customer's number
    assert audit_length(running) == before


def _audit_of(server: RunningServer, action: str) -> list[AuditEvent]:
    events, _ = SqlAuditStore(server.server.database).list(action=action, limit=100)
    return events


def test_lists_and_rules_change_as_their_rpcs_do_and_show_values_as_text(
    running: RunningServer, signed_in: Callable[[Role], httpx.Client]
) -> None:
    http = signed_in(Role.ADMIN)
    admin = running.key("admin").split("_")[1]
    csrf = csrf_of(http.get("/policy").text)
    created = http.post(
        "/policy/lists",
        data={
            "csrf": csrf,
            "request_id": "console-list-1",
            "name": "blocked-terminals",
            "type": "deny",
            "kind": "terminal",
            "description": MARKUP,
        },
    )
    assert created.status_code == 303
    assert created.headers["location"] == "/policy/lists/blocked-terminals"
    entry = {"csrf": csrf, "request_id": "console-entry-1", "value": " t-<b>9</b> ", "reason": MARKUP}
    # The same form sent twice adds the entry once.
    for _ in range(2):
        assert http.post("/policy/lists/blocked-terminals/add", data=entry).status_code == 303
    added = _audit_of(running, "policy.list.entry_added")
    assert [(e.actor, e.subject, e.details["value"]) for e in added] == [
        (admin, "blocked-terminals", "t-<b>9</b>")
    ]
    assert [e.actor for e in _audit_of(running, "policy.list.created")] == [admin]
    for path in ("/policy", "/policy/lists/blocked-terminals", "/audit?action=policy.list.entry_added"):
        shown = http.get(path).text
        assert "<script>alert" not in shown, path
        assert "<b>" not in shown, path
        assert "&lt;script&gt;" in shown or "t-&lt;b&gt;9&lt;/b&gt;" in shown, path
    # A condition that does not compile: shown back with where it fails, nothing saved, nothing audited.
    before = audit_length(running)
    rule = {"csrf": csrf, "request_id": "console-rule-1", "name": "BIG_AMOUNT", "action": "REVIEW"}
    refused = http.post("/policy/rules", data={**rule, "condition": "txn.amount >> 500", "reason": MARKUP})
    assert refused.status_code == 400
    assert re.search(r"line 1, column \d+", refused.text)
    assert "Nothing was saved" in refused.text
    assert "txn.amount &gt;&gt; 500" in refused.text  # the condition is kept in the form, escaped
    assert "<script>alert" not in refused.text
    assert audit_length(running) == before
    assert "No rule yet" in http.get("/policy/rules").text
    saved = http.post("/policy/rules", data={**rule, "condition": "txn.amount > 500", "reason": MARKUP})
    assert saved.status_code == 303
    [event] = _audit_of(running, "policy.rule.created")
    assert (event.actor, event.subject) == (admin, "BIG_AMOUNT@1")
    rules = http.get("/policy/rules").text
    assert 'data-rule="BIG_AMOUNT" data-version="1"' in rules
    assert "<script>alert" not in rules
    # Activation asks for a confirmation first: nothing changes before it.
    asked = http.post("/policy/rules/BIG_AMOUNT/activate", data={"csrf": csrf, "version": "1"})
    assert asked.status_code == 200
    assert "Activate rule BIG_AMOUNT version 1?" in asked.text
    assert _audit_of(running, "policy.rule.activated") == []
    done = http.post(
        "/policy/rules/BIG_AMOUNT/activate",
        data={
            "csrf": csrf_of(asked.text),
            "version": "1",
            "confirm": "yes",
            "reason": "r",
            "request_id": "c-a",
        },
    )
    assert done.status_code == 303
    [event] = _audit_of(running, "policy.rule.activated")
    assert (event.actor, event.subject, event.details["version"]) == (admin, "BIG_AMOUNT", "1")
    # A trainer reads and backtests but has no form that changes anything.
    trainer = signed_in(Role.TRAINER)
    for path in ("/policy", "/policy/lists/blocked-terminals", "/policy/rules"):
        page = trainer.get(path)
        assert page.status_code == 200, path
        for changing in (
            'action="/policy/lists"',
            "/add",
            "/remove",
            "Activate…",
            "Retire…",
            "Save the draft",
        ):
            assert changing not in page.text, (path, changing)
    assert "Run the backtest" in trainer.get("/policy/backtest?rule=BIG_AMOUNT&version=1").text


def test_console_look_ups_naming_nobody_count_as_guesses(
    server_factory: Callable[..., RunningServer], database_url: str
) -> None:
    from posguard_server.domain.check_digits import compute

    upgrade(database_url)
    running = server_factory(database_url=database_url, failure_limit=3)
    _, number, _ = review_case(running)
    http = sign_in(running, Role.ADMIN)
    try:
        csrf = csrf_of(http.get("/numbers").text)
        for serial in range(3):
            body = number[:10] + f"{90_000_000 + serial:08d}"
            missed = http.post(
                "/numbers", data={"csrf": csrf, "by": "number", "number": body + compute(body)}
            )
            assert missed.status_code == 404, missed.text
        # Past the limit even a number that exists is refused, as GetCustomer refuses it.
        refused = http.post("/numbers", data={"csrf": csrf, "by": "number", "number": number})
        assert refused.status_code == 429
        assert number not in refused.text
    finally:
        http.close()
    with running.server.database.session(read_only=True) as session:
        actions = [
            e.action
            for e in session.scalars(select(SqlAuditEvent))
            if e.action.startswith(("lookup", "caller"))
        ]
    assert actions == ["lookup.missed"] * 3 + ["caller.refused"]


def test_a_malformed_list_or_rule_name_in_the_path_is_refused_naming_it(
    signed_in: Callable[[Role], httpx.Client],
) -> None:
    http = signed_in(Role.ADMIN)
    csrf = csrf_of(http.get("/policy").text)
    listed = http.get("/policy/lists/not a list!")
    assert listed.status_code == 400
    assert "list_name" in listed.text
    assert "is not the name of a list" in listed.text
    ruled = http.post("/policy/rules/not-a-rule!/activate", data={"csrf": csrf, "version": "1"})
    assert ruled.status_code == 400
    assert "is not the name of a rule" in ruled.text
