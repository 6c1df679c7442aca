"""``posguard-server``: run and operate the service (serve, migrate, manage keys).

Every setting of :class:`~posguard_server.config.Settings` is a flag of the command group, generated from
the settings model so the two can never disagree: ``posguard-server --listen 0.0.0.0:50051 serve``.
"""

from __future__ import annotations

import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pydantic

from posguard_server.config import Settings

_FLAG_TYPES: dict[type, click.ParamType[Any]] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    Path: click.Path(path_type=Path),
}


def _base_type(annotation: Any) -> type:
    """``Path | None`` → ``Path``: the type a flag parses its value into."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.cast(type, args[0])
    return typing.cast(type, annotation)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one flag per settings field; flags left out fall back to ``POSGUARD_*`` variables and defaults."""
    for name, info in reversed(Settings.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        env = f"POSGUARD_{name.upper()}"
        help_text = f"{info.description} [env {env}]"
        kind = _base_type(info.annotation)
        if kind is bool:
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(command)
        else:
            command = click.option(flag, name, type=_FLAG_TYPES[kind], default=None, help=help_text)(command)
    return command


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level_number,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "DEBUG":
        # Alembic narrates every migration step at INFO; operators need only our summary line.
        logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@settings_options
@click.pass_context
def main(ctx: click.Context, /, **flags: Any) -> None:
    """Operate a posguard server: customer numbers and transaction risk over gRPC."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from None
    _configure_logging(settings)
    ctx.obj = settings


@main.command()
@click.pass_obj
def serve(settings: Settings) -> None:
    """Serve gRPC until SIGTERM or SIGINT (the embedded SQLite schema is migrated on start)."""
    from posguard_server.app import SchemaNotCurrentError
    from posguard_server.app import serve as run

    try:
        run(settings)
    except SchemaNotCurrentError as error:
        raise click.ClickException(str(error)) from None


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
@click.pass_obj
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply the migrations shipped with this release."""
    from posguard_server.store.migrate import upgrade

    upgrade(settings.effective_database_url, revision)
    click.echo(f"database schema at {revision}")


@db.command("current")
@click.pass_obj
def db_current(settings: Settings) -> None:
    """Print the schema revision of the database and whether it is the newest."""
    from posguard_server.store.migrate import head_revision, is_current

    url = settings.effective_database_url
    state = "current" if is_current(url) else f"behind (head is {head_revision()})"
    click.echo(state)


@main.group()
def keys() -> None:
    """API keys: a fresh install creates its first admin key here."""


_ROLE_NAMES = ["gateway", "admin", "auditor", "trainer"]


def _key_store(settings: Settings) -> Any:
    from posguard_server.app import prepare_database
    from posguard_server.store import SqlApiKeyStore

    return SqlApiKeyStore(prepare_database(settings))


def _key_dict(key: Any) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "name": key.name,
        "role": key.role.value,
        "created_at": key.created_at.isoformat(),
        "created_by": key.created_by,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@keys.command("create")
@click.option("--role", required=True, type=click.Choice(_ROLE_NAMES), help="What the key may do.")
@click.option("--name", default="", help="Who or what uses the key (default: the role).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def keys_create(settings: Settings, role: str, name: str, as_json: bool) -> None:
    """Create a key and print it once; only its digest is stored."""
    from posguard_server.domain.api_keys import Role, create_key

    key, token = create_key(_key_store(settings), name=name or role, role=Role(role), created_by="cli")
    if as_json:
        click.echo(json.dumps({**_key_dict(key), "token": token}))
        return
    click.echo(
        f"created {role} key {key.key_id} ({key.name}). Store it now; it is not shown again:", err=True
    )
    click.echo(token)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_obj
def keys_list(settings: Settings, include_revoked: bool, as_json: bool) -> None:
    """List keys (never their secrets)."""
    store = _key_store(settings)
    after = None
    rows: list[dict[str, Any]] = []
    while True:
        page, after = store.list(role=None, include_revoked=include_revoked, limit=500, after=after)
        rows.extend(_key_dict(k) for k in page)
        if after is None:
            break
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(f"{'KEY ID':<14}{'ROLE':<9}{'CREATED':<27}{'REVOKED':<27}NAME")
    for row in rows:
        revoked = row["revoked_at"] or "-"
        click.echo(f"{row['key_id']:<14}{row['role']:<9}{row['created_at']:<27}{revoked:<27}{row['name']}")


@keys.command("revoke")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why; kept with the key.")
@click.pass_obj
def keys_revoke(settings: Settings, key_id: str, reason: str) -> None:
    """Revoke a key; running servers refuse it within their auth cache lifetime."""
    from datetime import UTC, datetime

    from posguard_server.domain.errors import NotFound

    try:
        key = _key_store(settings).revoke(key_id, revoked_by="cli", reason=reason, now=datetime.now(UTC))
    except NotFound:
        raise click.ClickException(f"no key {key_id}") from None
    click.echo(f"revoked {key.key_id} ({key.name})")
