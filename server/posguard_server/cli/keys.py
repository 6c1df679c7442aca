"""``posguard-server keys``: API keys; a fresh install creates its first admin key here."""

from __future__ import annotations

import json
from typing import Any

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.stores import opened
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role

_ROLE_NAMES = [role.value for role in Role]


@click.group(cls=OperatorGroup)
def keys() -> None:
    """API keys: a fresh install creates its first admin key here."""


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
    from posguard_server.domain.api_keys import create_key
    from posguard_server.store.api_keys import SqlApiKeyStore

    with opened(settings, SqlApiKeyStore) as store:
        key, token = create_key(store, name=name or role, role=Role(role), created_by="cli")
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
    from posguard_server.store.api_keys import SqlApiKeyStore

    rows: list[dict[str, Any]] = []
    after = None
    with opened(settings, SqlApiKeyStore) as store:
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
    from posguard_server.store.api_keys import SqlApiKeyStore

    with opened(settings, SqlApiKeyStore) as store:
        try:
            key = store.revoke(key_id, revoked_by="cli", reason=reason, now=datetime.now(UTC))
        except NotFound:
            raise click.ClickException(f"no key {key_id}") from None
    click.echo(f"revoked {key.key_id} ({key.name})")
