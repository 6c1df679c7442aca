"""``posguard-server audit``: the hash-chained audit log, and the report of what operators watch."""

from __future__ import annotations

import json
from typing import Any

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.exit_codes import ConfigurationError, exit_answer_no
from posguard_server.cli.stores import opened
from posguard_server.config import Settings


@click.group(cls=OperatorGroup)
def audit() -> None:
    """The hash-chained audit log of changes."""


@audit.command("verify")
@click.option(
    "--from-sequence",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this event, linked to the stored hash of the one before it (0: the start of the log).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit_verify(settings: Settings, from_sequence: int, as_json: bool) -> None:
    """Recompute the hash chain. Exits 0 when it is intact, 3 when it is broken, saying where and how."""
    from posguard_server.store.audit import SqlAuditStore

    with opened(settings, SqlAuditStore) as store:
        report = store.verify(from_sequence)
    if as_json:
        answer = {
            "intact": report.intact,
            "entries_checked": report.entries_checked,
            "first_bad_sequence": report.first_bad_sequence,
            "problem": report.problem.value,
            "detail": report.detail,
        }
        click.echo(json.dumps(answer))
    elif report.intact:
        click.echo(f"audit log intact: {report.entries_checked} events checked")
    else:
        click.echo(
            f"audit log BROKEN at event {report.first_bad_sequence} ({report.problem.value}): {report.detail}"
        )
    if not report.intact:
        exit_answer_no()


@audit.command("list")
@click.option("--action", default="", help="Only events with exactly this action (e.g. api_key.revoked).")
@click.option("--actor", default="", help="Only events by this actor (a key_id, or cli).")
@click.option("--subject", default="", help="Only events about this subject (a key_id or a masked number).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many events."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, with the hashes.")
@click.pass_obj
def audit_list(settings: Settings, action: str, actor: str, subject: str, limit: int, as_json: bool) -> None:
    """List audit events, oldest first."""
    from posguard_server.store.audit import SqlAuditStore

    events: list[Any] = []
    after = None
    with opened(settings, SqlAuditStore) as store:
        while len(events) < limit:
            page, after = store.list(
                action=action or None,
                actor=actor or None,
                subject=subject or None,
                limit=min(limit - len(events), 500),
                after=after,
            )
            events.extend(page)
            if after is None:
                break
    if as_json:
        for event in events:
            row = {
                "sequence": event.sequence,
                "occurred_at": event.occurred_at.isoformat(),
                "actor": event.actor,
                "action": event.action,
                "subject": event.subject,
                "details": dict(event.details),
                "previous_hash": event.previous_hash,
                "hash": event.hash,
            }
            click.echo(json.dumps(row))
        return
    click.echo(f"{'SEQ':>8}  {'OCCURRED AT':<33}{'ACTOR':<14}{'ACTION':<24}{'SUBJECT':<28}DETAILS")
    for event in events:
        details = json.dumps(dict(event.details), sort_keys=True, ensure_ascii=False)
        click.echo(
            f"{event.sequence:>8}  {event.occurred_at.isoformat():<33}{event.actor:<14}{event.action:<24}"
            f"{event.subject:<28}{details}"
        )


@audit.command("report")
@click.option(
    "--dormant-days",
    type=click.IntRange(min=1),
    default=90,
    show_default=True,
    help="An active number nobody presented for this long is dormant.",
)
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows per section.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit_report(settings: Settings, dormant_days: int, top: int, as_json: bool) -> None:
    """What operators watch: duplicates, numbers one keystroke apart, heavily verified and dormant numbers.

    Exits 3 when duplicates or one-keystroke pairs exist: either means numbers were made outside the scheme.
    """
    from dataclasses import asdict
    from datetime import UTC, datetime, timedelta

    from posguard_server.issuers import load_schemes
    from posguard_server.store.customers import build_audit_report

    try:
        alphabets = {scheme.issuer: scheme.symbols for scheme in load_schemes(settings)}
    except ValueError as error:  # the issuers file is unusable; the message names it
        raise ConfigurationError(str(error)) from None
    now = datetime.now(UTC)
    with opened(settings, lambda database: database) as database:
        report = build_audit_report(
            database,
            alphabet_of=lambda issuer: alphabets.get(issuer, "0123456789"),
            now=now,
            dormant_before=now - timedelta(days=dormant_days),
            top=top,
        )
    if as_json:
        click.echo(json.dumps(asdict(report), default=lambda value: value.isoformat()))
    else:
        _print_report(report, dormant_days)
    if report.duplicates or report.one_keystroke_apart:
        exit_answer_no()


def _print_report(report: Any, dormant_days: int) -> None:
    click.echo(f"audit report at {report.generated_at.isoformat()}: {report.numbers_checked} numbers")
    click.echo(f"\nduplicates: {len(report.duplicates)}")
    for number, count in report.duplicates:
        click.echo(f"  {number}  x{count}")
    click.echo(f"\nnumbers one keystroke apart: {len(report.one_keystroke_apart)}")
    for first, second in report.one_keystroke_apart:
        click.echo(f"  {first}  ~  {second}")
    for title, rows in (
        ("most verified", report.most_verified),
        ("most failed verifications", report.most_failed),
        (f"dormant (not presented for {dormant_days} days)", report.dormant),
    ):
        click.echo(f"\n{title}: {len(rows)}")
        click.echo(f"  {'NUMBER':<22}{'STATUS':<11}{'VERIFIED':>9}{'FAILED':>8}  LAST VERIFIED")
        for row in rows:
            last = row.last_verified_at.isoformat() if row.last_verified_at else "never"
            counts = f"{row.verifications:>9}{row.failed_verifications:>8}"
            click.echo(f"  {row.number:<22}{row.status:<11}{counts}  {last}")
    click.echo(f"\ncallers with failed verifications: {len(report.failing_callers)}")
    for caller, failures in report.failing_callers:
        click.echo(f"  {caller:<22}{failures:>8}")
    click.echo(f"\ncallers refused for too many failures: {len(report.refused_callers)}")
    for caller, times, refused_at in report.refused_callers:
        click.echo(f"  {caller:<22}{times:>8}  last {refused_at.isoformat()}")
