"""``posguard-server``: run and operate the service (serve, migrate, manage keys, check the audit log).

Every setting of :class:`~posguard_server.config.Settings` is a flag of the command group, generated from
the settings model so the two can never disagree: ``posguard-server --listen 0.0.0.0:50051 serve``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pydantic
from pydantic import SecretStr

from posguard_server.config import Settings
from posguard_server.logs import configure_logging

_FLAG_TYPES: dict[type, click.ParamType[Any]] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    Path: click.Path(path_type=Path),
    SecretStr: click.STRING,
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
    configure_logging(settings.log_level_number, settings.log_format)
    ctx.obj = settings


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Serve from this many processes on one port (the workers setting, given here for convenience).",
)
@click.pass_obj
def serve(settings: Settings, workers: int | None) -> None:
    """Serve gRPC until SIGTERM or SIGINT (the embedded SQLite schema is migrated on start)."""
    from posguard_server.app import SchemaNotCurrentError
    from posguard_server.app import serve as run

    if workers is not None:
        settings = settings.model_copy(update={"workers": workers})
    try:
        status = run(settings)
    except SchemaNotCurrentError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:  # issuers file or key ring unusable; the message names the file, not keys
        raise click.ClickException(f"cannot start: {error}") from None
    if status:
        sys.exit(status)


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


@main.group()
def audit() -> None:
    """The hash-chained audit log of changes."""


@contextmanager
def _store(settings: Settings, store_class: Callable[[Any], Any]) -> Iterator[Any]:
    """A store on the configured database (migrated), disposed when the command is done."""
    from posguard_server.app import prepare_database

    database = prepare_database(settings)
    try:
        yield store_class(database)
    finally:
        database.dispose()


def _audit_store(settings: Settings) -> Any:
    from posguard_server.store import SqlAuditStore

    return _store(settings, SqlAuditStore)


@audit.command("verify")
@click.option(
    "--from-sequence",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this event, linked to the stored hash of the one before it (0: the start of the log).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit_verify(settings: Settings, from_sequence: int, as_json: bool) -> None:
    """Recompute the hash chain. Exits 0 when it is intact, 1 when it is broken, saying where and how."""
    with _audit_store(settings) as store:
        report = store.verify(from_sequence)
    if as_json:
        answer = {
            "intact": report.intact,
            "entries_checked": report.entries_checked,
            "first_bad_sequence": report.first_bad_sequence,
            "problem": report.problem.value,
            "detail": report.detail,
        }
        click.echo(json.dumps(answer))
    elif report.intact:
        click.echo(f"audit log intact: {report.entries_checked} events checked")
    else:
        click.echo(
            f"audit log BROKEN at event {report.first_bad_sequence} ({report.problem.value}): {report.detail}"
        )
    if not report.intact:
        # A distinct exit status lets cron jobs and monitoring alert without parsing the output.
        sys.exit(1)


@audit.command("list")
@click.option("--action", default="", help="Only events with exactly this action (e.g. api_key.revoked).")
@click.option("--actor", default="", help="Only events by this actor (a key_id, or cli).")
@click.option("--subject", default="", help="Only events about this subject (a key_id or a masked number).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many events."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, with the hashes.")
@click.pass_obj
def audit_list(settings: Settings, action: str, actor: str, subject: str, limit: int, as_json: bool) -> None:
    """List audit events, oldest first."""
    events: list[Any] = []
    after = None
    with _audit_store(settings) as store:
        while len(events) < limit:
            page, after = store.list(
                action=action or None,
                actor=actor or None,
                subject=subject or None,
                limit=min(limit - len(events), 500),
                after=after,
            )
            events.extend(page)
            if after is None:
                break
    if as_json:
        for event in events:
            row = {
                "sequence": event.sequence,
                "occurred_at": event.occurred_at.isoformat(),
                "actor": event.actor,
                "action": event.action,
                "subject": event.subject,
                "details": dict(event.details),
                "previous_hash": event.previous_hash,
                "hash": event.hash,
            }
            click.echo(json.dumps(row))
        return
    click.echo(f"{'SEQ':>8}  {'OCCURRED AT':<33}{'ACTOR':<14}{'ACTION':<24}{'SUBJECT':<28}DETAILS")
    for event in events:
        details = json.dumps(dict(event.details), sort_keys=True, ensure_ascii=False)
        click.echo(
            f"{event.sequence:>8}  {event.occurred_at.isoformat():<33}{event.actor:<14}{event.action:<24}"
            f"{event.subject:<28}{details}"
        )


@audit.command("report")
@click.option(
    "--dormant-days",
    type=click.IntRange(min=1),
    default=90,
    show_default=True,
    help="An active number nobody presented for this long is dormant.",
)
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows per section.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit_report(settings: Settings, dormant_days: int, top: int, as_json: bool) -> None:
    """What operators watch: duplicates, numbers one keystroke apart, heavily verified and dormant numbers.

    Exits 1 when duplicates or one-keystroke pairs exist: either means numbers were made outside the scheme.
    """
    from dataclasses import asdict
    from datetime import UTC, datetime, timedelta

    from posguard_server.app import prepare_database
    from posguard_server.issuers import load_schemes
    from posguard_server.store.customers import build_audit_report

    alphabets = {scheme.issuer: scheme.symbols for scheme in load_schemes(settings)}
    now = datetime.now(UTC)
    database = prepare_database(settings)
    try:
        report = build_audit_report(
            database,
            alphabet_of=lambda issuer: alphabets.get(issuer, "0123456789"),
            now=now,
            dormant_before=now - timedelta(days=dormant_days),
            top=top,
        )
    finally:
        database.dispose()
    if as_json:
        click.echo(json.dumps(asdict(report), default=lambda value: value.isoformat()))
    else:
        click.echo(f"audit report at {report.generated_at.isoformat()}: {report.numbers_checked} numbers")
        click.echo(f"\nduplicates: {len(report.duplicates)}")
        for number, count in report.duplicates:
            click.echo(f"  {number}  x{count}")
        click.echo(f"\nnumbers one keystroke apart: {len(report.one_keystroke_apart)}")
        for first, second in report.one_keystroke_apart:
            click.echo(f"  {first}  ~  {second}")
        for title, rows in (
            ("most verified", report.most_verified),
            ("most failed verifications", report.most_failed),
            (f"dormant (not presented for {dormant_days} days)", report.dormant),
        ):
            click.echo(f"\n{title}: {len(rows)}")
            click.echo(f"  {'NUMBER':<22}{'STATUS':<11}{'VERIFIED':>9}{'FAILED':>8}  LAST VERIFIED")
            for row in rows:
                last = row.last_verified_at.isoformat() if row.last_verified_at else "never"
                counts = f"{row.verifications:>9}{row.failed_verifications:>8}"
                click.echo(f"  {row.number:<22}{row.status:<11}{counts}  {last}")
        click.echo(f"\ncallers with failed verifications: {len(report.failing_callers)}")
        for caller, failures in report.failing_callers:
            click.echo(f"  {caller:<22}{failures:>8}")
        click.echo(f"\ncallers refused for too many failures: {len(report.refused_callers)}")
        for caller, times, refused_at in report.refused_callers:
            click.echo(f"  {caller:<22}{times:>8}  last {refused_at.isoformat()}")
    if report.duplicates or report.one_keystroke_apart:
        sys.exit(1)


@main.group("number-keys")
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

    from posguard_server.app import prepare_database
    from posguard_server.domain.keyring import load_or_create, save
    from posguard_server.store import SqlAuditStore

    if settings.number_keys is not None:
        raise click.ClickException(
            "the key ring comes from POSGUARD_NUMBER_KEYS; rotate it in the secret store"
        )
    ring = load_or_create(settings.number_key_file).rotated()
    database = prepare_database(settings)
    try:
        # Audit first: a rotation the log does not show must not happen.
        SqlAuditStore(database).append(
            actor="cli",
            action="number_key.rotated",
            subject=f"version {ring.current}",
            details={"versions": str(len(ring.keys))},
            now=datetime.now(UTC),
        )
    finally:
        database.dispose()
    save(ring, settings.number_key_file)
    click.echo(f"number key version {ring.current} is now current; restart the servers to use it")


# -- the model registry ------------------------------------------------------------------------------


@main.group()
def models() -> None:
    """The model registry: list, promote and roll back training runs and customer models."""


def _model_store(settings: Settings) -> Any:
    from posguard_server.store.risk import SqlRiskStore

    return _store(settings, SqlRiskStore)


@contextmanager
def _registry_errors() -> Iterator[None]:
    """Refusals and bad input leave as one line on stderr and exit status 1."""
    from posguard_server.domain.errors import InvalidArgument, PosguardError

    try:
        yield
    except InvalidArgument as error:
        problems = "; ".join(f"{v.field} {v.description}" for v in error.violations)
        raise click.ClickException(problems) from None
    except PosguardError as error:
        raise click.ClickException(f"refused ({error.reason}): {error.message}") from None


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
    "--scope", type=click.Choice(["customer", "global"]), default=None, help="Only models of this scope."
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
    """List registered models, newest first."""
    from posguard_server.domain.risk import METRIC_AP, METRIC_BASELINE_AP, ModelScope

    rows: list[Any] = []
    after = None
    with _model_store(settings) as store:
        while len(rows) < limit:
            page, after = store.list_models(
                scope=ModelScope(scope.upper()) if scope else None,
                customer_id=customer_id,
                active_only=active_only,
                limit=min(limit - len(rows), 500),
                after_id=after,
            )
            rows.extend(page)
            if after is None:
                break
    if as_json:
        for model in rows:
            click.echo(json.dumps(_model_dict(model)))
        return
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
@click.argument("version")
@click.option("--customer", "customer_id", default="", help="Promote this customer's model only.")
@click.option("--force", is_flag=True, help="Promote even when the candidate is not shown to be no worse.")
@click.option("--reason", required=True, help="Why; kept in the audit log.")
@click.pass_obj
def models_promote(settings: Settings, version: str, customer_id: str, force: bool, reason: str) -> None:
    """Make the training run VERSION active (its global and customer models together), or one customer's.

    Without --force, a run is promoted only when it was evaluated against the active models and is not
    worse. Running servers pick the change up within their model refresh interval.
    """
    from datetime import UTC, datetime

    from posguard_server.domain.risk import ModelScope

    scope = ModelScope.CUSTOMER if customer_id else ModelScope.GLOBAL
    with _model_store(settings) as store, _registry_errors():
        result = store.promote(
            scope, customer_id, version, force=force, now=datetime.now(UTC), actor="cli", reason=reason
        )
    replaced = f" (replacing {result.previous_version})" if result.previous_version else ""
    if customer_id:
        summary = f"promoted {version} for customer {customer_id}{replaced}"
    elif result.model is not None:
        summary = (
            f"promoted run {version}: global model{replaced} and {result.customer_models} customer models"
        )
    else:
        summary = f"promoted run {version}: {result.customer_models} customer models (no global model)"
    if result.overridden:
        summary += f"; forced over: {result.overridden}"
    click.echo(summary)


@models.command("rollback")
@click.option("--customer", "customer_id", default="", help="Roll back this customer's model only.")
@click.option(
    "--version",
    default="",
    help="The training run to roll back (default: the active global model's), e.g. a customer-only run.",
)
@click.option("--reason", required=True, help="Why; kept in the audit log.")
@click.pass_obj
def models_rollback(settings: Settings, customer_id: str, version: str, reason: str) -> None:
    """Roll back a training run (or one customer's model) to the models it replaced.

    Customer models that replaced nothing are retired: those customers are scored by the global model.
    """
    from datetime import UTC, datetime

    from posguard_server.domain.risk import ModelScope

    scope = ModelScope.CUSTOMER if customer_id else ModelScope.GLOBAL
    with _model_store(settings) as store, _registry_errors():
        result = store.rollback(
            scope, customer_id, version=version, now=datetime.now(UTC), actor="cli", reason=reason
        )
    restored = f"back to {result.model.version}" if result.model is not None else "global model unchanged"
    if customer_id:
        click.echo(f"rolled back {result.rolled_back_version} for customer {customer_id}: {restored}")
        return
    click.echo(
        f"rolled back run {result.rolled_back_version}: {restored}; "
        f"{result.customer_models_restored} customer models restored, "
        f"{result.customer_models_retired} retired (scored by the global model)"
    )


@models.command("shadow")
@click.argument("version", required=False, default="")
@click.option("--clear", is_flag=True, help="Stop shadow scoring; the run becomes a candidate again.")
@click.option("--reason", required=True, help="Why; kept in the audit log.")
@click.pass_obj
def models_shadow(settings: Settings, version: str, clear: bool, reason: str) -> None:
    """Run the candidate run VERSION in shadow: servers score with it too, answer with the active models.

    One run is in shadow at a time; its stored scores show in `posguard-server report --version VERSION`.
    """
    from datetime import UTC, datetime

    if clear == bool(version):
        raise click.UsageError("give a VERSION to put in shadow, or --clear")
    with _model_store(settings) as store, _registry_errors():
        if clear:
            count = store.clear_shadow(now=datetime.now(UTC), actor="cli", reason=reason)
            click.echo(f"shadow cleared: {count} models are candidates again")
            return
        count = store.set_shadow(version, now=datetime.now(UTC), actor="cli", reason=reason)
    click.echo(f"run {version} is in shadow ({count} models)")


# -- data path: import, train, evaluate ---------------------------------------------------------------


# -- backup and restore ---------------------------------------------------------------------------------


@contextmanager
def _backup_errors() -> Iterator[None]:
    """A refused backup or restore leaves as one line on stderr and exit status 1."""
    from posguard_server.domain.errors import PosguardError
    from posguard_server.pipeline.backup import BackupError

    try:
        yield
    except BackupError as error:
        raise click.ClickException(str(error)) from None
    except PosguardError as error:  # the database is unreachable
        raise click.ClickException(f"refused ({error.reason}): {error.message}") from None


@main.command()
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


@main.command()
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


@contextmanager
def _risk_parts(settings: Settings) -> Iterator[Any]:
    from posguard_server.app import prepare_database
    from posguard_server.issuers import build_numbering
    from posguard_server.pipeline.importer import Importer
    from posguard_server.store.customers import SqlCustomerStore
    from posguard_server.store.risk import SqlRiskStore

    numbering = build_numbering(settings)
    database = prepare_database(settings)
    try:
        risk = SqlRiskStore(database)
        yield (
            risk,
            lambda namespace: Importer(risk, SqlCustomerStore(database), numbering, namespace=namespace),
        )
    finally:
        database.dispose()


@main.group("import")
def import_() -> None:
    """Load history and outcomes from CSV files (idempotent: re-run an interrupted import to finish it)."""


@import_.command("transactions")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--namespace", default="source", show_default=True, help="External-ID namespace of customer_ref."
)
@click.option("--batch-size", type=click.IntRange(min=1, max=100_000), default=5000, show_default=True)
@click.pass_obj
def import_transactions(settings: Settings, file: Path, namespace: str, batch_size: int) -> None:
    """Import a canonical transactions CSV (.csv or .csv.gz); customers are created by customer_ref."""
    from posguard_server.pipeline.importer import ImportError_, read_transactions

    with _risk_parts(settings) as (_, importer_for):
        importer = importer_for(namespace)
        started = time.perf_counter()
        try:
            with click.progressbar(length=_count_lines(file), label="importing", show_pos=True) as bar:
                summary = importer.import_rows(
                    read_transactions(file), batch_size=batch_size, progress=bar.update
                )
        except ImportError_ as error:
            raise click.ClickException(f"{file.name}: {error}") from None
    elapsed = time.perf_counter() - started
    click.echo(
        f"{summary.rows} rows read, {summary.new} new, {summary.rows - summary.new} already stored; "
        f"{summary.customers_created} customers created, {summary.profiles_rebuilt} profiles rebuilt "
        f"in {elapsed:.1f}s ({summary.rows / max(elapsed, 1e-9):,.0f} rows/s)"
    )


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
    """Import outcomes: transaction_id,outcome[,reported_at] rows, or is_fraud of a transactions CSV."""
    from datetime import timedelta

    from posguard_server.pipeline.importer import ImportError_, read_outcomes

    with _risk_parts(settings) as (_, importer_for):
        try:
            with click.progressbar(length=_count_lines(file), label="importing outcomes") as bar:
                total, matched = importer_for("source").import_outcomes(
                    read_outcomes(file, delay=timedelta(days=label_delay_days)), progress=bar.update
                )
        except ImportError_ as error:
            raise click.ClickException(f"{file.name}: {error}") from None
    click.echo(f"{total} outcomes read, {matched} matched stored transactions")


def _count_lines(file: Path) -> int:
    from posguard_server.pipeline.importer import open_text

    with open_text(file) as handle:
        return max(0, sum(1 for _ in handle) - 1)


def _training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    from posguard_models.training_config import TrainingConfig  # not .training: no scikit-learn at start-up

    defaults = TrainingConfig()
    options = [
        click.option(
            "--n-estimators",
            type=click.IntRange(min=1),
            default=defaults.n_estimators,
            show_default=True,
            help="Trees of the global forest.",
        ),
        click.option(
            "--customer-estimators",
            type=click.IntRange(min=1),
            default=defaults.customer_estimators,
            show_default=True,
            help="Trees of each customer's forest.",
        ),
        click.option(
            "--customer-min-history",
            type=click.IntRange(min=2),
            default=defaults.customer_min_history,
            show_default=True,
            help="Training rows a customer needs for an own model.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _training_config(seed: int, flags: dict[str, Any]) -> Any:
    from posguard_models.training_config import TrainingConfig

    return TrainingConfig(
        seed=seed,
        n_estimators=flags["n_estimators"],
        customer_estimators=flags["customer_estimators"],
        customer_min_history=flags["customer_min_history"],
    )


@main.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--no-activate", is_flag=True, help="Register the models as candidates without activating them."
)
@_training_options
@click.pass_obj
def train(settings: Settings, /, seed: int, no_activate: bool, **flags: Any) -> None:
    """Fit the global and per-customer models on stored history and activate them (servers pick them up)."""
    from posguard_server.pipeline.trainer import train_and_register

    with _risk_parts(settings) as (risk, _):
        started = time.perf_counter()
        with click.progressbar(length=1, label="training customer models", show_pos=True) as bar:

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            try:
                report = train_and_register(
                    risk, _training_config(seed, flags), activate=not no_activate, progress=progress
                )
            except ValueError as error:
                raise click.ClickException(str(error)) from None
    state = "active" if report.activated else "candidate"
    click.echo(
        f"version {report.version} ({state}): {report.rows} transactions of {report.customers} customers, "
        f"{report.customer_models} customer models, {report.labelled_fraud} labelled fraud left out, "
        f"{time.perf_counter() - started:.1f}s"
    )


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds to average."
)
@click.option(
    "--labels/--no-labels",
    default=False,
    show_default=True,
    help="Feed fraud labels back through ReportOutcome, --label-delay-days late.",
)
@click.option("--label-delay-days", type=click.FloatRange(min=0), default=7.0, show_default=True)
@click.option(
    "--customers",
    "customers_limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate on this many customers only (a quick, bounded run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_training_options
def evaluate(
    file: Path,
    seeds: str,
    labels: bool,
    label_delay_days: float,
    customers_limit: int | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Run the evaluation protocol on a labelled CSV: import history, train, replay the rest, measure.

    Each seed runs on its own fresh embedded database and a real server on loopback.
    """
    from posguard_server.pipeline.evaluate import evaluate as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter("must be integers separated by commas", param_hint="--seeds") from None

    def progress(stage: str, done: int, total: int) -> None:
        if not as_json:
            click.echo(f"\r{stage}: {done}/{total}   ", nl=False, err=True)

    result = run(
        file,
        seeds=seed_list,
        labels=labels,
        label_delay_days=label_delay_days,
        customers_limit=customers_limit,
        training=_training_config(0, flags),
        progress=progress,
    )
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo("", err=True)
    mean = result.mean()
    click.echo(f"{result.dataset} ({'with' if labels else 'without'} label feedback), seeds {seeds}:")
    click.echo(
        f"  AP {mean['ap']:.3f} ± {mean['ap_std']:.3f}   ROC-AUC {mean['roc_auc']:.3f}   "
        f"recall@1% {mean['recall_at_1pct']:.3f}"
    )
    for key in sorted(k for k in mean if k.startswith("scenario_") and k.endswith("_ap")):
        scenario = key.split("_")[1]
        click.echo(
            f"  scenario {scenario}: AP {mean[key]:.3f}   "
            f"recall@1% {mean[f'scenario_{scenario}_recall_at_1pct']:.3f}"
        )
    for seed in result.seeds:
        click.echo(
            f"  seed {seed.seed}: AP {seed.overall.average_precision:.3f} ROC-AUC {seed.overall.roc_auc:.3f} "
            f"recall@1% {seed.overall.recall_at_alert_rate:.3f}; "
            f"{seed.scored} scored, {seed.refused} refused; "
            + ", ".join(f"{k} {v:.0f}s" for k, v in seed.seconds.items())
        )


# -- retraining -----------------------------------------------------------------------------------------


def _customer_list(value: str) -> frozenset[str] | None:
    names = frozenset(part.strip() for part in value.split(",") if part.strip())
    return names or None


@main.command()
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
@_training_options
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
        config=_training_config(seed, flags),
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

    with _risk_parts(settings) as (risk, _):
        try:
            result = run_retrain(risk, options, progress=bar)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        written = None
        if report_dir is not None and result.evaluation is not None and len(result.evaluation.candidate):
            shadow_scores = live_shadow_scores(risk, result.version)
            written = write_report(
                result.evaluation.report(
                    result.version,
                    review=settings.risk_review_threshold,
                    decline=settings.risk_decline_threshold,
                    summary=result.summary(),
                    shadow=shadow_scores,
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


@main.command()
@click.option("--version", default="", help="The training run (default: the newest registered one).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for index.html and the PNG plots.",
)
@click.pass_obj
def report(settings: Settings, version: str, out_dir: Path) -> None:
    """Write the evaluation report of a training run against the active models (HTML and PNG plots).

    Scores the run's held-out window again with the run's models and with the models active now; a run in
    shadow also shows the live scores servers stored for it.
    """
    from posguard_server.pipeline.report import write_report
    from posguard_server.pipeline.retrain import evaluate_run, live_shadow_scores

    with _risk_parts(settings) as (risk, _):
        if not version:
            newest, _cursor = risk.list_models(limit=1)
            if not newest:
                raise click.ClickException("no model is registered yet: run posguard-server retrain first")
            version = newest[0].version
        try:
            evaluated = evaluate_run(risk, version)
            written = write_report(
                evaluated.report(
                    version,
                    review=settings.risk_review_threshold,
                    decline=settings.risk_decline_threshold,
                    summary=[("version", version)],
                    shadow=live_shadow_scores(risk, version),
                ),
                out_dir,
            )
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    click.echo(f"report: {written.html}")


# -- the demo -------------------------------------------------------------------------------------------


@main.command()
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
    # The demo narrates on stdout; INFO lines of the parts it drives (from their import on) would only
    # interleave with it.
    if settings.log_level == "INFO":
        logging.getLogger().setLevel(logging.WARNING)
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
