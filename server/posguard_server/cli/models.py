"""``posguard-server models``: the model registry (list, promote, roll back, shadow).

The words are the client's (``posguard models ...``): ``--version`` names a training run everywhere, and
``--customer`` narrows a command to one customer's model.
"""

from __future__ import annotations

import json
from typing import Any

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.stores import opened, risk_stores
from posguard_server.cli.wording import count
from posguard_server.config import Settings

_REASON = click.option("--reason", required=True, help="Why; kept in the audit log.")


@click.group(cls=OperatorGroup)
def models() -> None:
    """The model registry: list, promote and roll back training runs and customer models."""


def _model_dict(model: Any) -> dict[str, Any]:
    return {
        "scope": model.scope.value,
        "customer_id": model.customer_id,
        "version": model.version,
        "status": model.status.value,
        "created_at": model.created_at.isoformat(),
        "activated_at": model.activated_at.isoformat() if model.activated_at else None,
        "training_window_start": model.training_window_start.isoformat(),
        "training_window_end": model.training_window_end.isoformat(),
        "sample_count": model.sample_count,
        "metrics": dict(model.metrics),
    }


@models.command("list")
@click.option(
    "--scope", type=click.Choice(["global", "customer"]), default=None, help="Only models of this scope."
)
@click.option("--customer", "customer_id", default="", help="Only this customer's models.")
@click.option("--active", "active_only", is_flag=True, help="Only the active models.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many models."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, with the metrics.")
@click.pass_obj
def models_list(
    settings: Settings, scope: str | None, customer_id: str, active_only: bool, limit: int, as_json: bool
) -> None:
    """List registered models, newest first.

    Notes go to stderr ("no models match", or that --limit cut the list off), so stdout holds models only.
    """
    from posguard_server.domain.risk import ModelScope

    rows: list[Any] = []
    after = None
    with opened(settings, risk_stores) as stores:
        while len(rows) <= limit:  # one model beyond the limit tells that the list was cut off
            page, after = stores.registry.list_models(
                scope=ModelScope(scope.upper()) if scope else None,
                customer_id=customer_id,
                active_only=active_only,
                limit=min(limit + 1 - len(rows), 500),
                after_id=after,
            )
            rows.extend(page)
            if after is None:
                break
    cut_off = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        click.echo("no models match", err=True)
        return
    if as_json:
        for model in rows:
            click.echo(json.dumps(_model_dict(model)))
    else:
        _print_table(rows)
    if cut_off:
        click.echo(f"showing the first {count(limit, 'model')}; more with --limit", err=True)


def _print_table(rows: list[Any]) -> None:
    from posguard_server.domain.risk import METRIC_AP, METRIC_BASELINE_AP

    click.echo(f"{'VERSION':<34}{'SCOPE':<10}{'CUSTOMER':<30}{'STATUS':<11}{'SAMPLES':>9}  AP (BASELINE)")
    for model in rows:
        ap = model.metrics.get(METRIC_AP)
        baseline = model.metrics.get(METRIC_BASELINE_AP)
        quality = "-" if ap is None else f"{ap:.4f}" + (f" ({baseline:.4f})" if baseline is not None else "")
        click.echo(
            f"{model.version:<34}{model.scope.value:<10}{model.customer_id or '-':<30}"
            f"{model.status.value:<11}{model.sample_count:>9}  {quality}"
        )


@models.command("promote")
@click.option("--version", required=True, help="The training run to make active.")
@click.option("--customer", "customer_id", default="", help="Promote this customer's model only.")
@click.option("--force", is_flag=True, help="Promote even when the candidate is not shown to be no worse.")
@_REASON
@click.pass_obj
def models_promote(settings: Settings, version: str, customer_id: str, force: bool, reason: str) -> None:
    """Make the training run --version active (its global and customer models together), or one customer's.

    Without --force, a run is promoted only when it was evaluated against the active models and is not
    worse. Running servers pick the change up within their model refresh interval.
    """
    from datetime import UTC, datetime

    from posguard_server.domain.risk import ModelScope

    scope = ModelScope.CUSTOMER if customer_id else ModelScope.GLOBAL
    with opened(settings, risk_stores) as stores:
        result = stores.registry.promote(
            scope, customer_id, version, force=force, now=datetime.now(UTC), actor="cli", reason=reason
        )
    replaced = f" (replacing {result.previous_version})" if result.previous_version else ""
    customers = count(result.customer_models, "customer model")
    if customer_id:
        summary = f"promoted {version} for customer {customer_id}{replaced}"
    elif result.model is not None:
        summary = f"promoted run {version}: global model{replaced} and {customers}"
    else:
        summary = f"promoted run {version}: {customers} (no global model)"
    if result.overridden:
        summary += f"; forced over: {result.overridden}"
    click.echo(summary)


@models.command("rollback")
@click.option(
    "--version",
    default="",
    help="The training run to roll back (default: the active global model's), e.g. a customer-only run.",
)
@click.option("--customer", "customer_id", default="", help="Roll back this customer's model only.")
@_REASON
@click.pass_obj
def models_rollback(settings: Settings, customer_id: str, version: str, reason: str) -> None:
    """Roll back a training run (or one customer's model) to the models it replaced.

    Customer models that replaced nothing are retired: those customers are scored by the global model.
    """
    from datetime import UTC, datetime

    from posguard_server.domain.risk import ModelScope

    scope = ModelScope.CUSTOMER if customer_id else ModelScope.GLOBAL
    with opened(settings, risk_stores) as stores:
        result = stores.registry.rollback(
            scope, customer_id, version=version, now=datetime.now(UTC), actor="cli", reason=reason
        )
    restored = f"back to {result.model.version}" if result.model is not None else "global model unchanged"
    if customer_id:
        click.echo(f"rolled back {result.rolled_back_version} for customer {customer_id}: {restored}")
        return
    click.echo(
        f"rolled back run {result.rolled_back_version}: {restored}; "
        f"{count(result.customer_models_restored, 'customer model')} restored, "
        f"{result.customer_models_retired} retired (scored by the global model)"
    )


@models.command("shadow")
@click.option("--version", default="", help="The candidate run to score in shadow.")
@click.option("--clear", is_flag=True, help="Stop shadow scoring; the run becomes a candidate again.")
@_REASON
@click.pass_obj
def models_shadow(settings: Settings, version: str, clear: bool, reason: str) -> None:
    """Run the candidate run --version in shadow: servers score with it too, answer with the active models.

    One run is in shadow at a time; its stored scores show in `posguard-server report --version VERSION`.
    """
    from datetime import UTC, datetime

    if clear == bool(version):
        raise click.UsageError("give --version VERSION to put a run in shadow, or --clear")
    with opened(settings, risk_stores) as stores:
        if clear:
            cleared = stores.shadow.clear_shadow(now=datetime.now(UTC), actor="cli", reason=reason)
            now_candidates = "model is a candidate" if cleared == 1 else "models are candidates"
            click.echo(f"shadow cleared: {cleared} {now_candidates} again")
            return
        shadowed = stores.shadow.set_shadow(version, now=datetime.now(UTC), actor="cli", reason=reason)
    click.echo(f"run {version} is in shadow ({count(shadowed, 'model')})")
