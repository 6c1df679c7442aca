"""``posguard-server report``: the evaluation report of a training run against the active models."""

from __future__ import annotations

from pathlib import Path

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.cli.stores import opened, risk_stores
from posguard_server.config import Settings


@click.command(cls=OperatorCommand)
@click.option("--version", default="", help="The training run (default: the newest registered one).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for index.html and the PNG plots (default: REPORTS_DIR/VERSION, which the console links).",
)
@click.pass_obj
def report(settings: Settings, version: str, out_dir: Path | None) -> None:
    """Write the evaluation report of a training run against the active models (HTML and PNG plots).

    Scores the run's held-out window again with the run's models and with the models active now; a run in
    shadow also shows the live scores servers stored for it.
    """
    from posguard_server.pipeline.report import write_report
    from posguard_server.pipeline.retrain import evaluate_run, live_shadow_scores

    with opened(settings, risk_stores) as risk:
        if not version:
            newest, _cursor = risk.registry.list_models(limit=1)
            if not newest:
                raise click.ClickException("no model is registered yet: run posguard-server retrain first")
            version = newest[0].version
        if out_dir is None:
            out_dir = settings.effective_reports_dir / version
        try:
            evaluated = evaluate_run(risk.history, risk.registry, version)
            written = write_report(
                evaluated.report(
                    version,
                    review=settings.risk_review_threshold,
                    decline=settings.risk_decline_threshold,
                    summary=[("version", version)],
                    shadow=live_shadow_scores(risk.shadow, version),
                ),
                out_dir,
            )
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    click.echo(f"report: {written.html}")
