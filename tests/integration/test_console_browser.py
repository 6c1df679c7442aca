"""The console in a real browser: headless Chromium from the Debian packages, driven by Playwright.

The browser is the system's (/usr/bin/chromium, which ``.ci/run`` installs when it is missing); Playwright
never downloads one. One browser serves the whole module, a fresh context (cookies) each test. Each test
signs in through the form, makes a change the way a person would (keys and clicks), and finds the change in
the audit log page.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_server.domain.risk import ModelScope, NewModel, StoredReason
from posguard_server.store.cases import SqlCaseStore, WatchFinding
from posguard_server.store.migrate import upgrade
from posguard_server.store.model_registry import SqlModelRegistry

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from .conftest import RunningServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)

# CI installs the browser (.ci/run), so there a missing one fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def running(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    upgrade(database_url)
    return server_factory(database_url=database_url)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(15_000)
    opened = context.new_page()
    yield opened
    context.close()


def url(server: RunningServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.server.console_port}{path}"


def sign_in(page: Page, server: RunningServer, role: str) -> None:
    page.goto(url(server, "/overview"))
    assert page.url.endswith("/signin")
    page.fill("#api_key", server.key(role))
    page.click("button[type=submit]")
    page.wait_for_url("**/overview")
    assert page.locator("h1").inner_text() == "Overview"


def sign_out(page: Page) -> None:
    page.click("form.signout button")
    page.wait_for_url("**/signin")


def audit_rows(page: Page, server: RunningServer, action: str) -> list[str]:
    page.goto(url(server, "/audit"))
    page.fill("#action", action)
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/audit?*")
    return [row.inner_text() for row in page.locator("#events tbody tr").all()]


def review_case(server: RunningServer) -> str:
    """A transaction decided REVIEW (no model is active yet); returns its transaction id."""
    transaction_id = "tx-" + uuid.uuid4().hex
    with posguard.Client(server.target, api_key=server.key("gateway"), timeout=30) as client:
        number = client.issue_customer_id().customer.primary.number
        transaction = risk_pb2.Transaction(
            transaction_id=transaction_id,
            customer_number=number,
            amount=common_pb2.Money(amount_minor=99_00, currency="CNY"),
            merchant_id="m-1",
            terminal_id="t-1",
            mcc="5411",
            channel=common_pb2.CHANNEL_POS,
        )
        transaction.event_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
        assert client.score_transaction(transaction=transaction).decision == risk_pb2.DECISION_REVIEW
    return transaction_id


def test_an_analyst_resolves_a_case_from_the_keyboard(page: Page, running: RunningServer) -> None:
    review_case(running)
    sign_in(page, running, "analyst")
    page.click("nav >> text=Review queue")
    page.wait_for_url("**/cases")
    # j moves to the first case, Enter opens it.
    page.keyboard.press("j")
    page.keyboard.press("Enter")
    page.wait_for_url("**/cases/*")
    case_id = page.url.rsplit("/", 1)[1]
    assert page.locator("#case-status").inner_text() == "open"
    # n goes to the note; Escape leaves it; f resolves as fraud.
    page.keyboard.press("n")
    page.keyboard.type("card reported stolen by the holder")
    page.keyboard.press("Escape")
    page.keyboard.press("f")
    page.wait_for_url("**/cases")
    assert f"Case {case_id} resolved: fraud." in page.locator(".flash").inner_text()
    page.goto(url(running, f"/cases/{case_id}"))
    assert page.locator("#case-status").inner_text() == "resolved: fraud"
    sign_out(page)
    sign_in(page, running, "auditor")
    rows = audit_rows(page, running, "case.resolved")
    analyst = running.key("analyst").split("_")[1]
    assert any(case_id in row and analyst in row and "resolution=fraud" in row for row in rows)


def test_an_admin_rotates_a_flagged_number(page: Page, running: RunningServer) -> None:
    with posguard.Client(running.target, api_key=running.key("gateway"), timeout=30) as client:
        customer = client.issue_customer_id().customer
    reason = StoredReason("WATCH_VERIFICATIONS", "verified 40 times in the window, 10x its usual", 1.0)
    SqlCaseStore(running.server.database).open_watch_cases(
        [WatchFinding(customer.primary.number, customer.customer_id, (reason,))],
        actor="number-watch",
        now=datetime.now(UTC),
    )
    sign_in(page, running, "admin")
    page.click("nav >> text=Number watch")
    page.wait_for_url("**/watch")
    row = page.locator("table.queue tbody tr").first
    assert customer.primary.number in row.inner_text()  # admins see numbers in full
    row.locator("a").first.click()
    page.wait_for_url("**/cases/*")
    page.fill("#note", "used far above its usual")
    page.click("button[value=rotate]")
    page.wait_for_url("**/cases")
    page.goto(url(running, f"/customers/{customer.customer_id}"))
    numbers = page.locator("table").first.inner_text()
    assert "rotated" not in numbers or customer.primary.number not in numbers
    assert "active" in numbers
    with posguard.Client(running.target, api_key=running.key("admin"), timeout=30) as client:
        verified = client.verify_customer_id(number=customer.primary.number)
    assert verified.successor_number
    assert verified.successor_number in page.content()
    rows = audit_rows(page, running, "customer.rotated")
    admin = running.key("admin").split("_")[1]
    assert any(admin in row and customer.primary.number[-4:] in row for row in rows)


def _register(server: RunningServer, version: str) -> None:
    SqlModelRegistry(server.server.database).add_models(
        [
            NewModel(
                scope=ModelScope.GLOBAL,
                customer_id="",
                version=version,
                created_at=T0,
                training_window_start=T0 - timedelta(days=30),
                training_window_end=T0,
                sample_count=250,
                metrics={},
                artifact=b"not a real model",
            )
        ]
    )


def test_a_trainer_promotes_and_rolls_back_a_run(page: Page, running: RunningServer) -> None:
    _register(running, "run-1")
    SqlModelRegistry(running.server.database).promote(
        ModelScope.GLOBAL,
        "",
        "run-1",
        force=False,
        now=datetime.now(UTC),
        actor="test",
        reason="first run",
        request_id="setup-1",
        fingerprint="setup",
    )
    _register(running, "run-2")
    sign_in(page, running, "trainer")
    page.click("nav >> text=Models")
    page.wait_for_url("**/models")
    assert page.locator("#active-global").inner_text() == "run-1"
    page.click("tr[data-version=run-2] >> text=Promote…")
    # Nothing happens before the confirmation.
    assert page.locator("h1").inner_text() == "Promote run run-2?"
    page.goto(url(running, "/models"))
    assert page.locator("#active-global").inner_text() == "run-1"
    page.click("tr[data-version=run-2] >> text=Promote…")
    page.fill("#reason", "better recall on the holdout")
    page.click("#confirm")
    # Not evaluated against the active run: refused, as PromoteModel refuses it, until forced.
    assert "no evaluation against the active model" in page.locator(".error").inner_text()
    page.goto(url(running, "/models"))
    page.click("tr[data-version=run-2] >> text=Promote…")
    page.fill("#reason", "better recall on the holdout")
    page.check("input[name=force]")
    page.click("#confirm")
    page.wait_for_url("**/models")
    assert "Run run-2 promoted (was run-1)" in page.locator(".flash").inner_text()
    assert page.locator("#active-global").inner_text() == "run-2"
    page.click("text=Roll back the active run…")
    page.fill("#reason", "alert rate too high")
    page.click("#confirm")
    page.wait_for_load_state()
    assert page.url.endswith("/models"), page.locator("main").inner_text()
    assert "Run run-2 rolled back; run-1 is active again." in page.locator(".flash").inner_text()
    assert page.locator("#active-global").inner_text() == "run-1"
    sign_out(page)
    sign_in(page, running, "auditor")
    trainer = running.key("trainer").split("_")[1]
    promoted = audit_rows(page, running, "model.promoted")
    assert any(trainer in row and "run-2" in row and "better recall" in row for row in promoted)
    rolled_back = audit_rows(page, running, "model.rolled_back")
    assert any(trainer in row and "run-2" in row and "alert rate too high" in row for row in rolled_back)
    page.click("text=Verify the chain")
    assert "The chain is intact" in page.locator("#verify-result").inner_text()


def test_the_overview_updates_without_a_reload(page: Page, running: RunningServer) -> None:
    sign_in(page, running, "auditor")
    before = page.locator("#live-figures").inner_text()
    review_case(running)  # gRPC calls the live figures count
    page.wait_for_function(
        "before => document.querySelector('#live-figures').innerText !== before", arg=before, timeout=15_000
    )
    assert "REVIEW: 1" in page.locator("#live-figures").inner_text()
    assert page.url.endswith("/overview")


def test_an_admin_denies_a_terminal_and_backtests_then_activates_a_rule(
    page: Page, running: RunningServer
) -> None:
    review_case(running)  # today: 99.00 CNY at terminal t-1, decided REVIEW
    sign_in(page, running, "admin")
    page.click("nav >> text=Lists and rules")
    page.wait_for_url("**/policy")
    page.fill("#list-name", "compromised-terminals")
    page.select_option("#list-type", "deny")
    page.select_option("#list-kind", "terminal")
    page.fill("#list-description", "terminals with a skimmer")
    page.click("#create-list button[type=submit]")
    page.wait_for_url("**/policy/lists/compromised-terminals")
    page.fill("#entry-value", "t-66")
    page.fill("#entry-reason", "skimmer found by the field team")
    page.click("#add-entry button[type=submit]")
    page.wait_for_load_state()
    row = page.locator("#entries tr[data-value=t-66]")
    assert "skimmer found by the field team" in row.inner_text()
    assert "never" in row.inner_text()
    # A condition that does not compile is shown back with where it fails; nothing is saved.
    page.click(".tabs >> text=Rules")
    page.wait_for_url("**/policy/rules")
    page.fill("#rule-name", "LARGE_AMOUNT")
    page.fill("#rule-condition", "txn.amount > > 50")
    page.select_option("#rule-action", "DECLINE")
    page.fill("#rule-reason", "an amount above 50")
    page.click("#create-rule button[type=submit]")
    error = page.locator("#rule-error").inner_text()
    assert "line 1, column" in error
    assert "Nothing was saved" in error
    assert "No rule yet" in page.locator("#rules").inner_text()
    assert page.input_value("#rule-condition") == "txn.amount > > 50"
    page.fill("#rule-condition", "txn.amount > 50")
    page.click("#create-rule button[type=submit]")
    page.wait_for_url("**/policy/rules")
    assert "Rule LARGE_AMOUNT version 1 saved as a draft." in page.locator(".flash").inner_text()
    draft = page.locator("#rules tr[data-rule=LARGE_AMOUNT][data-version='1']")
    assert "draft" in draft.inner_text()
    # Backtest the draft over the last 30 days (the form's default): the REVIEW today would be declined.
    draft.locator("text=Backtest…").click()
    page.wait_for_url("**/policy/backtest?*")
    page.click("#run-backtest")
    page.wait_for_load_state()
    total = [cell.inner_text() for cell in page.locator("#backtest-total td").all()]
    # transactions, fraud, hits, fraud among hits, decisions changed, declines, reviews
    assert total == ["1", "0", "1", "0", "1", "1", "0"]
    assert page.locator("#backtest-days tbody tr").count() == 1
    # Activating asks for a confirmation and a reason.
    page.click("text=Activate version 1…")
    assert page.locator("h1").inner_text() == "Activate rule LARGE_AMOUNT version 1?"
    page.fill("#reason", "backtest declines only the large amount")
    page.click("#confirm")
    page.wait_for_url("**/policy/rules")
    assert "Rule LARGE_AMOUNT version 1 is active." in page.locator(".flash").inner_text()
    assert "active" in page.locator("#rules tr[data-rule=LARGE_AMOUNT]").inner_text()
    admin = running.key("admin").split("_")[1]
    rows = audit_rows(page, running, "policy.list.entry_added")
    assert any(admin in row and "compromised-terminals" in row and "t-66" in row for row in rows)
    rows = audit_rows(page, running, "policy.rule.created")
    assert any(admin in row and "LARGE_AMOUNT@1" in row for row in rows)
    rows = audit_rows(page, running, "policy.rule.activated")
    assert any(admin in row and "LARGE_AMOUNT" in row and "backtest declines" in row for row in rows)
