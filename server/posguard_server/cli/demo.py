"""``posguard-server demo``: one day of a payment gateway against a real server, narrated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.config import Settings


@click.command(cls=OperatorCommand)
@click.option(
    "--data-dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var") / "demo",
    show_default=True,
    help="Fresh data directory for the demo's database, keys, log and report (replaces a previous demo's).",
)
@click.option(
    "--dataset",
    default="handbook",
    show_default=True,
    help="handbook or sparkov (the development file in ../shared/data when there, else the sample in "
    "tests/data), or the path of a labelled canonical transactions CSV.",
)
@click.option(
    "--customers",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Use the first this many customers of the dataset (by reference).",
)
@click.option(
    "--transactions",
    type=click.IntRange(min=1),
    default=None,
    help="Send at most this many of the day's transactions (default: all of them).",
)
@click.option(
    "--day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The day to play (default: the day of the later half with the most labelled fraud).",
)
@click.option(
    "--labels/--no-labels",
    default=True,
    show_default=True,
    help="Import the fraud labels known before the day (reported 7 days late) with the history.",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=5, show_default=True, help="Riskiest payments shown."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.pass_obj
def demo(
    settings: Settings,
    /,
    demo_dir: Path,
    dataset: str,
    customers: int,
    transactions: int | None,
    day: Any,
    labels: bool,
    top: int,
    seed: int,
) -> None:
    """Play a payment gateway for one day against a real server, then show its decisions and reasons.

    Starts `posguard-server serve` on a free loopback port with a fresh SQLite database in --data-dir (the
    configured database, listen address and keys are not used; the risk thresholds are), imports the
    dataset's history before the day, trains, sends the day's transactions through the Python client, and
    prints the decisions against the dataset's fraud labels, the riskiest payments with their reasons, and the
    path of the evaluation report it writes.
    """
    from posguard_server.pipeline.demo import DemoError, DemoOptions, run_demo, summary_lines

    options = DemoOptions(
        data_dir=demo_dir,
        dataset=dataset,
        customers=customers,
        transactions=transactions,
        day=day.date() if day is not None else None,
        labels=labels,
        seed=seed,
        review_threshold=settings.risk_review_threshold,
        decline_threshold=settings.risk_decline_threshold,
    )
    try:
        result = run_demo(options, click.echo)
    except DemoError as error:
        raise click.ClickException(str(error)) from None
    for line in summary_lines(result, top=top):
        click.echo(line)
