"""``posguard-server rules``: backtest rules on the stored transactions, before activating them.

Works on the database directly, as ``import`` and ``train`` do, so the data team can try rules on imported
history without a server. Rules come from the database (``--rule NAME[@VERSION]``), from the command line
(``--condition``), or from a rules file (``--rules-file``, TOML):

    [[rule]]
    name = "BIG_AMOUNT"
    condition = "txn.amount > 220"
    action = "decline"                 # decline, review or reason
    reason = "an amount far above what this shop sees"
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.stores import opened, store_errors
from posguard_server.config import Settings

if TYPE_CHECKING:
    from posguard_server.domain.policy import Rule

_MOMENT = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"])


@click.group(cls=OperatorGroup)
def rules() -> None:
    """Rules: backtest them on stored transactions (the Policy RPCs and `posguard rules` manage them)."""


def read_rules_file(path: Path) -> list[Rule]:
    """The rules of a TOML rules file, each compiled; ClickException naming the rule and the fault."""
    import tomllib

    from posguard_server.domain.policy import NAME_PATTERN, Rule, RuleAction, RuleStatus
    from posguard_server.domain.rule_language import RuleSyntaxError, compile_condition

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, tomllib.TOMLDecodeError) as error:
        raise click.ClickException(f"{path}: {error}") from None
    found: list[Rule] = []
    for i, item in enumerate(data.get("rule", [])):
        where = f"{path}: rule {i + 1}"
        if not isinstance(item, dict):
            raise click.ClickException(f"{where}: must be a table")
        name, condition = str(item.get("name", "")), str(item.get("condition", ""))
        if not NAME_PATTERN.fullmatch(name):
            raise click.ClickException(f"{where}: name must be 1 to 64 of A-Z 0-9 _, starting with a letter")
        try:
            action = RuleAction(str(item.get("action", "decline")).upper())
        except ValueError:
            raise click.ClickException(
                f"{where} ({name}): action must be decline, review or reason"
            ) from None
        try:
            compile_condition(condition)
        except RuleSyntaxError as error:
            raise click.ClickException(f"{where} ({name}): the condition does not compile: {error}") from None
        found.append(
            Rule(
                name=name,
                version=0,
                condition=condition,
                action=action,
                reason=str(item.get("reason", name)),
                status=RuleStatus.DRAFT,
                created_at=datetime.now(UTC),
                created_by="cli",
            )
        )
    if not found:
        raise click.ClickException(f"{path}: no [[rule]] tables")
    return found


@rules.command("backtest")
@click.option("--rule", "stored", multiple=True, help="NAME or NAME@VERSION of a stored rule; repeatable.")
@click.option(
    "--rules-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A TOML rules file."
)
@click.option("--condition", "conditions", multiple=True, help="A condition to try as is; repeatable.")
@click.option(
    "--action",
    type=click.Choice(["decline", "review", "reason"]),
    default="decline",
    show_default=True,
    help="What --condition rules would do.",
)
@click.option("--list", "list_names", multiple=True, help="A list to replay; repeatable.")
@click.option("--start", type=_MOMENT, required=True, help="From this event time (UTC).")
@click.option("--end", type=_MOMENT, required=True, help="Up to this event time, excluded (UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per day, then the total.")
@click.pass_obj
def backtest(
    settings: Settings,
    stored: tuple[str, ...],
    rules_file: Path | None,
    conditions: tuple[str, ...],
    action: str,
    list_names: tuple[str, ...],
    start: datetime,
    end: datetime,
    as_json: bool,
) -> None:
    """Replay the stored transactions of [START, END) through rules and lists, as if they had been in force.

    Per day: transactions, labelled fraud, hits (a rule fired or a list matched), fraud among the hits, and
    decisions that would have changed. Changes nothing.
    """
    from posguard_server.domain.policy import Rule, RuleAction, RuleStatus
    from posguard_server.domain.rule_language import RuleSyntaxError, compile_condition
    from posguard_server.services.backtest import BacktestService
    from posguard_server.store.policy import SqlPolicyStore

    since, until = (moment if moment.tzinfo else moment.replace(tzinfo=UTC) for moment in (start, end))
    if until <= since:
        raise click.UsageError("--end must be after --start")
    chosen = read_rules_file(rules_file) if rules_file is not None else []
    now = datetime.now(UTC)
    for i, condition in enumerate(conditions):
        try:
            compile_condition(condition)
        except RuleSyntaxError as error:
            raise click.ClickException(f"--condition {i + 1} does not compile: {error}") from None
        chosen.append(
            Rule(
                f"CONDITION_{i + 1}",
                0,
                condition,
                RuleAction(action.upper()),
                "",
                RuleStatus.DRAFT,
                now,
                "cli",
            )
        )
    if not (stored or chosen or list_names):
        raise click.UsageError("name at least one --rule, --rules-file, --condition or --list")
    with opened(settings, SqlPolicyStore) as store, store_errors():
        for text in stored:
            name, _, version = text.partition("@")
            if version and not version.isdigit():
                raise click.UsageError(f"--rule {text}: the version after @ must be a number")
            chosen.append(store.get_rule(name, int(version or 0)))
        lists = []
        for name in list_names:
            entries, _ = store.list_entries(name, now=now, include_expired=False, limit=10**9, after=None)
            lists.append((store.get_list(name), entries))
        report = BacktestService(store, time_zone=settings.policy_time_zone).run(
            chosen, lists, since=since, until=until, now=now
        )
    rows: list[dict[str, Any]] = [
        {"day": day.day.isoformat() if day.day else "total", **day.counts()}
        for day in [*report.days, report.total]
    ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    columns = list(rows[0])
    click.echo("  ".join(f"{c:>17}" if i else f"{c:<10}" for i, c in enumerate(columns)))
    for row in rows:
        click.echo("  ".join(f"{row[c]:>17}" if i else f"{row[c]:<10}" for i, c in enumerate(columns)))
    total = report.total
    if total.hits:
        click.echo(
            f"precision {total.fraud_hits / total.hits:.3f}; recall "
            f"{(total.fraud_hits / total.fraud) if total.fraud else 0.0:.3f} of labelled fraud",
            err=True,
        )
