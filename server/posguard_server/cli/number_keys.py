"""``posguard-server number-keys``: the key ring that makes customer numbers."""

from __future__ import annotations

import click

from posguard_server.cli.command import OperatorGroup
from posguard_server.cli.stores import opened
from posguard_server.config import Settings


@click.group("number-keys", cls=OperatorGroup)
def number_keys() -> None:
    """The key ring that makes customer numbers (FF1 keys, versioned)."""


@number_keys.command("rotate")
@click.pass_obj
def number_keys_rotate(settings: Settings) -> None:
    """Add a new key version and make it current; numbers already issued keep verifying.

    Restart the servers afterwards so they issue with the new version. A key ring passed through
    POSGUARD_NUMBER_KEYS is rotated by the operator's secret store, not here.
    """
    from datetime import UTC, datetime

    from posguard_server.domain.keyring import load_or_create, save
    from posguard_server.store.audit import SqlAuditStore

    if settings.number_keys is not None:
        raise click.ClickException(
            "the key ring comes from POSGUARD_NUMBER_KEYS; rotate it in the secret store"
        )
    ring = load_or_create(settings.number_key_file).rotated()
    with opened(settings, SqlAuditStore) as audit:
        # Audit first: a rotation the log does not show must not happen.
        audit.append(
            actor="cli",
            action="number_key.rotated",
            subject=f"version {ring.current}",
            details={"versions": str(len(ring.keys))},
            now=datetime.now(UTC),
        )
    save(ring, settings.number_key_file)
    click.echo(f"number key version {ring.current} is now current; restart the servers to use it")
