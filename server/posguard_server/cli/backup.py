"""``posguard-server backup`` and ``restore``: the database and the number key ring in one archive."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.cli.stores import store_errors
from posguard_server.config import Settings


@contextmanager
def _backup_errors() -> Iterator[None]:
    """A refused backup or restore, or an unreachable database, leaves as one line and exit status 1."""
    from posguard_server.pipeline.backup import BackupError

    with store_errors():
        try:
            yield
        except BackupError as error:
            raise click.ClickException(str(error)) from None


@click.command(cls=OperatorCommand)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def backup(settings: Settings, file: Path) -> None:
    """Back up the database and the number key ring to FILE, a new file, while servers keep serving.

    Every table is read from one consistent snapshot; model artifacts are in the database. FILE holds
    secrets (the number keys, encrypted holder details, API key digests): it is written with mode 0600,
    readable by its owner only. Keep it that way wherever it is copied.
    """
    from posguard_server.pipeline.backup import backup as run

    with _backup_errors():
        summary = run(settings, file)
    versions = ", ".join(map(str, summary.key_versions)) or "none"
    click.echo(
        f"backup written to {summary.path} (mode 0600): {summary.rows} rows in {summary.tables} tables, "
        f"schema {summary.schema_revision}, number key versions {versions}, {summary.seconds:.1f}s"
    )


@click.command(cls=OperatorCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def restore(settings: Settings, file: Path) -> None:
    """Restore a backup made by `backup` into an EMPTY database and a fresh data directory.

    The archive is checked first (checksums, row counts); a database that holds data, or a different
    number key ring already in place, is refused and nothing is changed. The schema is brought to the
    backup's revision, every table loaded in one transaction, then migrated to this release. Stop servers
    of the target database while restoring.
    """
    from posguard_server.pipeline.backup import restore as run

    with _backup_errors():
        summary = run(settings, file)
    click.echo(
        f"restored {summary.rows} rows in {summary.tables} tables (schema {summary.schema_revision}, "
        f"migrated to {summary.migrated_to}); number key ring {summary.key_ring}; {summary.seconds:.1f}s"
    )
