"""Take the screenshots of docs/console.md: a server with sample data, each console page in headless Chromium.

    .venv/bin/python scripts/console_screenshots.py [--out docs/console] [--chromium /usr/bin/chromium]
        [--only NAME ...]

Starts a posguard server in this process (a temporary data directory, free ports), issues a few customers and
scores their transactions through the gRPC API, registers two training runs and flags a number, then signs
in to the console as an admin and saves one PNG per page. The browser is Debian's chromium; Playwright
downloads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright

import posguard
from posguard.v1 import common_pb2, risk_pb2
from posguard_server.app import PosguardServer, build_server
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.domain.policy import ListKind, ListType, RuleAction
from posguard_server.domain.risk import ModelScope, NewModel, StoredReason
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.cases import SqlCaseStore, WatchFinding
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.policy import SqlPolicyStore

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)


def start(settings: Settings) -> tuple[PosguardServer, int, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def build() -> tuple[PosguardServer, int]:
        server, port = build_server(settings)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(60)
    return server, port, loop, thread


def seed(server: PosguardServer, target: str) -> tuple[str, str]:
    """Sample data; returns (an admin key, a customer id with history)."""
    keys = SqlApiKeyStore(server.database)
    _, admin = create_key(keys, name="ops", role=Role.ADMIN, created_by="screenshots")
    _, gateway = create_key(keys, name="till 7", role=Role.GATEWAY, created_by="screenshots")
    assert admin is not None
    assert gateway is not None
    customer_id = ""
    with posguard.Client(target, api_key=gateway, timeout=30) as client:
        for index in range(3):
            customer = client.issue_customer_id(
                external_ids=[common_pb2.ExternalId(namespace="crm", value=f"member-{1000 + index}")]
            ).customer
            customer_id = customer_id or customer.customer_id
            for step in range(12 if index == 0 else 2):
                transaction = risk_pb2.Transaction(
                    transaction_id="tx-" + uuid.uuid4().hex[:12],
                    customer_number=customer.primary.number,
                    amount=common_pb2.Money(amount_minor=(1800 + 700 * (step % 5)) * 10, currency="CNY"),
                    merchant_id=f"m-{step % 3}",
                    terminal_id=f"t-{step % 4}",
                    mcc="5411",
                    channel=common_pb2.CHANNEL_POS,
                )
                transaction.event_time.FromDatetime(NOW - timedelta(hours=6 * (12 - step)))
                client.score_transaction(transaction=transaction)
        watched = client.issue_customer_id().customer
    reason = StoredReason("WATCH_VERIFICATIONS", "verified 48 times in the window: 12x its usual", 1.0)
    SqlCaseStore(server.database).open_watch_cases(
        [WatchFinding(watched.primary.number, watched.customer_id, (reason,))], actor="number-watch", now=NOW
    )
    registry = SqlModelRegistry(server.database)
    for version, days in (("20250301-0200", 30), ("20250308-0200", 23)):
        registry.add_models(
            [
                NewModel(
                    scope=ModelScope.GLOBAL,
                    customer_id="",
                    version=version,
                    created_at=NOW - timedelta(days=days),
                    training_window_start=NOW - timedelta(days=days + 60),
                    training_window_end=NOW - timedelta(days=days),
                    sample_count=48_211,
                    metrics={"average_precision": 0.412, "roc_auc": 0.931},
                    artifact=b"sample",
                )
            ]
        )
    registry.promote(
        ModelScope.GLOBAL,
        "",
        "20250301-0200",
        force=False,
        now=NOW,
        actor="trainer-key",
        reason="first run",
        request_id="screenshots-1",
        fingerprint="screenshots",
    )
    seed_policy(server)
    return admin, customer_id


def seed_policy(server: PosguardServer) -> None:
    """A deny list with an entry, an active rule and a draft of a second one."""
    policy = SqlPolicyStore(server.database)
    once = {"actor": "ops-key", "now": NOW, "fingerprint": "screenshots"}
    policy.create_list(
        "compromised-terminals", ListKind.TERMINAL, ListType.DENY, "skimmers found", request_id="", **once
    )
    policy.add_entry(
        "compromised-terminals", "t-66", reason="skimmer found", expires_at=None, request_id="", **once
    )
    policy.create_rule(
        "LARGE_AMOUNT", "txn.amount > 220", RuleAction.DECLINE, "an amount above 220", request_id="", **once
    )
    policy.activate_rule("LARGE_AMOUNT", 1, reason="backtested", request_id="", **once)
    policy.create_rule(
        "NIGHT_NEW_TERMINAL",
        "customer.new_terminal && txn.hour < 6",
        RuleAction.REVIEW,
        "a new terminal at night",
        request_id="",
        **once,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--only", action="append", default=[], help="take only this screenshot (repeatable)")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            listen="127.0.0.1:0",
            metrics_port=0,
            console_listen="127.0.0.1:0",
            data_dir=Path(data),
            watch_interval_seconds=0,
        )
        server, port, loop, thread = start(settings)
        try:
            admin, customer_id = seed(server, f"127.0.0.1:{port}")
            base = f"http://127.0.0.1:{server.console_port}"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=options.chromium, headless=True)
                page = browser.new_page(viewport={"width": 1200, "height": 760})

                def shot(name: str, *, full_page: bool = False) -> None:
                    if options.only and name not in options.only:
                        return
                    page.screenshot(path=str(options.out / f"{name}.png"), full_page=full_page)
                    print(f"{options.out / name}.png")

                page.goto(base + "/signin")
                shot("signin")
                page.fill("#api_key", admin)
                page.click("button[type=submit]")
                page.wait_for_url("**/overview")
                page.wait_for_timeout(2500)  # one poll of the live figures
                shot("overview")
                page.goto(base + "/numbers")
                page.click("text=By external id")
                page.fill("#namespace", "crm")
                page.fill("#value", "member-1000")
                page.locator("form:has(#namespace) button").click()
                page.wait_for_load_state()
                shot("numbers")
                page.goto(base + "/watch")
                shot("watch")
                page.goto(f"{base}/customers/{customer_id}")
                shot("customer")
                page.goto(base + "/cases")
                shot("queue")
                page.locator("a.case-link").first.click()
                page.wait_for_load_state()
                shot("case")
                page.goto(base + "/models")
                shot("models")
                page.locator("tr[data-version='20250308-0200'] button").click()
                page.wait_for_load_state()
                shot("promote")
                page.goto(base + "/policy/rules")
                shot("rules")
                page.locator("tr[data-rule=NIGHT_NEW_TERMINAL] >> text=Backtest…").click()
                page.wait_for_url("**/policy/backtest?*")
                page.click("#run-backtest")
                page.wait_for_load_state()
                shot("backtest", full_page=True)
                page.goto(base + "/audit/verify")
                shot("audit")
                browser.close()
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
