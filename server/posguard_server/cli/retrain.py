"""``posguard-server retrain``: the nightly job; retrains what has new history, promotes when not worse."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.cli.stores import opened, risk_stores
from posguard_server.cli.training import training_config, training_options
from posguard_server.config import Settings


def _customer_list(value: str) -> frozenset[str] | None:
    names = frozenset(part.strip() for part in value.split(",") if part.strip())
    return names or None


@click.command(cls=OperatorCommand)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--all",
    "everyone",
    is_flag=True,
    help="Retrain every customer with enough history, and the global model.",
)
@click.option(
    "--customers", default="", help="Comma-separated customer ids: retrain only these (no global model)."
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="Count new history from this UTC date instead of from each model's training window end.",
)
@click.option(
    "--min-new",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="New transactions a customer needs since its model to be retrained.",
)
@click.option(
    "--global-change",
    type=click.FloatRange(min=0),
    default=0.10,
    show_default=True,
    help="Retrain the global model when the rows since its window reach this share of its sample count.",
)
@click.option(
    "--holdout-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="The latest days of history, kept out of training to compare candidate and active models on.",
)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@click.option("--dask-scheduler", default=None, help="Fit on this Dask cluster (e.g. tcp://host:8786).")
@click.option("--promote/--no-promote", default=True, show_default=True, help="Promote when not worse.")
@click.option("--force", is_flag=True, help="Promote whatever the comparison says (recorded as forced).")
@click.option("--shadow", is_flag=True, help="Run the candidate in shadow instead of promoting it.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write the evaluation report (index.html and PNG plots) into this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@training_options
@click.pass_obj
def retrain(
    settings: Settings,
    /,
    seed: int,
    everyone: bool,
    customers: str,
    since: Any,
    min_new: int,
    global_change: float,
    holdout_days: float,
    jobs: int,
    dask_scheduler: str | None,
    promote: bool,
    force: bool,
    shadow: bool,
    report_dir: Path | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Retrain what has new history, compare with the active models, and promote when not worse.

    Incremental by default: customers without a model or with --min-new new transactions since theirs,
    and the global model when the population grew by --global-change. Re-running with nothing new trains
    nothing.
    """
    from datetime import UTC

    from tqdm import tqdm

    from posguard_server.pipeline.report import write_report
    from posguard_server.pipeline.retrain import PromotionMode, RetrainOptions, live_shadow_scores
    from posguard_server.pipeline.retrain import retrain as run_retrain

    if sum((force, shadow, not promote)) > 1:
        raise click.UsageError("choose one of --force, --shadow and --no-promote")
    promotion = PromotionMode.AUTO
    if force:
        promotion = PromotionMode.FORCE
    elif shadow:
        promotion = PromotionMode.SHADOW
    elif not promote:
        promotion = PromotionMode.NEVER
    options = RetrainOptions(
        config=training_config(seed, flags),
        everyone=everyone,
        customers=_customer_list(customers),
        since=since.replace(tzinfo=UTC) if since is not None else None,
        min_new=min_new,
        global_change=global_change,
        holdout_days=holdout_days,
        jobs=jobs,
        dask_scheduler=dask_scheduler,
        promotion=promotion,
    )

    def bar(total: int) -> Any:
        # Rate and ETA on a terminal; nothing in a nightly job's log file.
        return tqdm(total=total, unit="model", desc="customer models", file=sys.stderr, disable=None)

    with opened(settings, risk_stores) as risk:
        try:
            result = run_retrain(risk.history, risk.registry, risk.shadow, options, progress=bar)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        written = None
        if report_dir is not None and result.evaluation is not None and len(result.evaluation.candidate):
            written = write_report(
                result.evaluation.report(
                    result.version,
                    review=settings.risk_review_threshold,
                    decline=settings.risk_decline_threshold,
                    summary=result.summary(),
                    shadow=live_shadow_scores(risk.shadow, result.version),
                ),
                report_dir,
            )
    if as_json:
        out: dict[str, Any] = dict(result.summary())
        out["metrics"] = result.evaluation.metrics if result.evaluation is not None else {}
        click.echo(json.dumps(out))
    else:
        width = max(len(name) for name, _ in result.summary())
        for name, value in result.summary():
            click.echo(f"{name:<{width}}  {value}")
    if written is not None:
        click.echo(f"report: {written.html}")
