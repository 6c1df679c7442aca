"""``posguard-server import``: history and outcomes from CSV files.

Rows the importer rejects (a time ScoreTransaction would refuse), or outcomes of transactions the store does
not hold, end the command with status 3: the import ran, but the file did not go in whole. A file the
importer cannot read on (a missing column, a bad number) stops the import with status 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.exit_codes import ConfigurationError, exit_answer_no
from posguard_server.cli.stores import opened
from posguard_server.cli.wording import count
from posguard_server.config import Settings

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from posguard_server.pipeline.importer import Importer, ImportError_
    from posguard_server.store.db import Database


@click.group("import", cls=OperatorGroup)
def import_() -> None:
    """Load history and outcomes from CSV files (idempotent: re-run an interrupted import to finish it)."""


def _importer(settings: Settings, namespace: str) -> Callable[[Database], Importer]:
    """What :func:`~posguard_server.cli.stores.opened` makes an importer on the database with."""
    from posguard_server.issuers import build_numbering
    from posguard_server.pipeline.importer import Importer

    try:
        numbering = build_numbering(settings)
    except ValueError as error:  # issuers file or key ring unusable; the message names the file
        raise ConfigurationError(str(error)) from None
    return lambda database: Importer.on(database, numbering, namespace=namespace)


def _named(file: Path, message: str) -> str:
    """``message`` about ``file``, naming it once (a message may already start with its name)."""
    return message if message.startswith(f"{file.name}:") else f"{file.name}: {message}"


def _unreadable(file: Path, error: ImportError_) -> click.ClickException:
    return click.ClickException(_named(file, str(error)))


def _progress(length: int, label: str) -> ProgressBar[int]:
    """A bar on a terminal's stderr; nothing off a terminal, where stdout and stderr are for scripts."""
    return click.progressbar(
        length=length, label=label, show_pos=True, file=sys.stderr, hidden=not sys.stderr.isatty()
    )


def _count_lines(file: Path) -> int:
    from posguard_server.pipeline.importer import open_text

    with open_text(file) as handle:
        return max(0, sum(1 for _ in handle) - 1)


@import_.command("transactions")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--namespace", default="source", show_default=True, help="External-ID namespace of customer_ref."
)
@click.option("--batch-size", type=click.IntRange(min=1, max=100_000), default=5000, show_default=True)
@click.pass_obj
def import_transactions(settings: Settings, file: Path, namespace: str, batch_size: int) -> None:
    """Import a canonical transactions CSV (.csv or .csv.gz); customers are created by customer_ref.

    Exits 3 when rows were rejected (each named by its line on stderr), 1 when the file cannot be read on.
    """
    from posguard_server.pipeline.importer import ImportError_, read_transactions

    with opened(settings, _importer(settings, namespace)) as importer:
        started = time.perf_counter()
        try:
            with _progress(_count_lines(file), "importing") as bar:
                summary = importer.import_rows(
                    read_transactions(file), batch_size=batch_size, progress=bar.update
                )
        except ImportError_ as error:
            raise _unreadable(file, error) from None
    elapsed = time.perf_counter() - started
    rejected = f", {summary.rejected} rejected" if summary.rejected else ""
    click.echo(
        f"{count(summary.read, 'row')} read, {summary.new} new, {summary.rows - summary.new} already stored"
        f"{rejected}; {count(summary.customers_created, 'customer')} created, "
        f"{count(summary.profiles_rebuilt, 'profile')} rebuilt "
        f"in {elapsed:.1f}s ({summary.read / max(elapsed, 1e-9):,.0f} rows/s)"
    )
    for message in summary.rejection_messages():
        click.echo(_named(file, message), err=True)
    if summary.rejected:
        exit_answer_no()


@import_.command("outcomes")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--label-delay-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="For a labelled transactions CSV: how long after each fraud its report arrived.",
)
@click.pass_obj
def import_outcomes(settings: Settings, file: Path, label_delay_days: float) -> None:
    """Import outcomes: transaction_id,outcome[,reported_at] rows, or is_fraud of a transactions CSV.

    Exits 3 when outcomes match no stored transaction, 1 when the file cannot be read on.
    """
    from datetime import timedelta

    from posguard_server.pipeline.importer import DEFAULT_NAMESPACE, ImportError_, read_outcomes

    with opened(settings, _importer(settings, DEFAULT_NAMESPACE)) as importer:
        try:
            with _progress(_count_lines(file), "importing outcomes") as bar:
                total, matched = importer.import_outcomes(
                    read_outcomes(file, delay=timedelta(days=label_delay_days)), progress=bar.update
                )
        except ImportError_ as error:
            raise _unreadable(file, error) from None
    click.echo(f"{count(total, 'outcome')} read, {matched} matched stored transactions")
    if total > matched:
        unmatched = count(total - matched, "outcome")
        click.echo(f"{file.name}: {unmatched} matched no stored transaction", err=True)
        exit_answer_no()
