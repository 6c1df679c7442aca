"""``posguard-server db``: the database schema."""

from __future__ import annotations

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.exit_codes import exit_answer_no
from posguard_server.cli.stores import store_errors
from posguard_server.config import Settings


@click.group(cls=OperatorGroup)
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
@click.pass_obj
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply the migrations shipped with this release."""
    from posguard_server.store.migrate import upgrade

    with store_errors():
        upgrade(settings.effective_database_url, revision)
    click.echo(f"database schema at {revision}")


@db.command("current")
@click.pass_obj
def db_current(settings: Settings) -> None:
    """Print whether the schema is the newest: exits 0 when it is, 3 when it is behind."""
    from posguard_server.store.migrate import head_revision, is_current

    url = settings.effective_database_url
    with store_errors():
        current = is_current(url)
    if current:
        click.echo("current")
        return
    click.echo(f"behind (head is {head_revision()})")
    exit_answer_no()
