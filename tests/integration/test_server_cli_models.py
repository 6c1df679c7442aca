"""``posguard-server models``: the words the client shares (``--version``, ``--customer``, ``--scope``), the
note when ``--limit`` cuts a list off, and "no models match"."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from posguard_server.store.customers import SqlCustomer
from posguard_server.store.db import Database

from .test_admin_models import _register as register_models

if TYPE_CHECKING:
    import subprocess

    from .conftest import Cli

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def _register(database: Database, version: str, customers: tuple[str, ...]) -> None:
    """A training run: a global model and one model per customer, all candidates."""
    with database.session() as session:
        known = {c.customer_id for c in session.query(SqlCustomer)}
        for customer_id in sorted(set(customers) - known):
            session.add(
                SqlCustomer(customer_id=customer_id, issuer="t", created_at=T0, updated_at=T0, created_by="t")
            )
    register_models(database, version, customers)


def _models(cli: Cli, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("models", *args, env={"POSGUARD_DATABASE_URL": url})


def test_list_filters_by_scope_and_customer_and_says_when_the_limit_cut_it_off(
    database: Database, database_url: str, cli: Cli
) -> None:
    _register(database, "r1", ("c1", "c2"))
    _register(database, "r2", ("c1",))  # five models in all

    everything = _models(cli, database_url, "list")
    assert everything.returncode == 0, everything.stderr
    assert len(everything.stdout.splitlines()) == 1 + 5  # the header, then the models
    assert everything.stderr == ""

    cut = _models(cli, database_url, "list", "--limit", "2")
    assert cut.returncode == 0, cut.stderr
    assert len(cut.stdout.splitlines()) == 1 + 2
    assert cut.stderr == "showing the first 2 models; more with --limit\n"
    one = _models(cli, database_url, "list", "--limit", "1", "--json")
    assert len(one.stdout.splitlines()) == 1  # JSON lines stay JSON lines: the note is on stderr
    assert one.stderr == "showing the first 1 model; more with --limit\n"
    assert _models(cli, database_url, "list", "--limit", "5").stderr == ""  # exactly all: nothing cut

    globals_ = _models(cli, database_url, "list", "--scope", "global", "--json")
    rows = [json.loads(line) for line in globals_.stdout.splitlines()]
    assert sorted((r["scope"], r["version"]) for r in rows) == [("GLOBAL", "r1"), ("GLOBAL", "r2")]
    theirs = _models(cli, database_url, "list", "--scope", "customer", "--customer", "c2", "--json")
    rows = [json.loads(line) for line in theirs.stdout.splitlines()]
    assert [(r["scope"], r["customer_id"], r["version"]) for r in rows] == [("CUSTOMER", "c2", "r1")]

    nothing = _models(cli, database_url, "list", "--customer", "nobody")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "no models match\n")
    active = _models(cli, database_url, "list", "--active", "--json")
    assert (active.stdout, active.stderr) == ("", "no models match\n")
    wrong = _models(cli, database_url, "list", "--scope", "everything")
    assert wrong.returncode == 2


def test_promote_and_shadow_take_the_run_as_version_option(
    database: Database, database_url: str, cli: Cli
) -> None:
    _register(database, "r1", ("c1", "c2"))
    _register(database, "r2", ("c1",))

    positional = _models(cli, database_url, "promote", "r1", "--reason", "old spelling")
    assert positional.returncode == 2
    missing = _models(cli, database_url, "promote", "--reason", "which one?")
    assert missing.returncode == 2
    assert "--version" in missing.stderr

    promoted = _models(cli, database_url, "promote", "--version", "r1", "--reason", "first run")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout == "promoted run r1: global model and 2 customer models\n"
    refused = _models(cli, database_url, "promote", "--version", "nope", "--reason", "x")
    assert refused.returncode == 1
    assert "MODEL_NOT_FOUND" in refused.stderr
    assert "Traceback" not in refused.stderr

    shadow = _models(cli, database_url, "shadow", "--version", "r2", "--reason", "try it")
    assert shadow.returncode == 0, shadow.stderr
    assert shadow.stdout == "run r2 is in shadow (2 models)\n"
    assert _models(cli, database_url, "shadow", "r2", "--reason", "old spelling").returncode == 2
    neither = _models(cli, database_url, "shadow", "--reason", "nothing named")
    assert neither.returncode == 2
    assert "give --version VERSION" in neither.stderr
    cleared = _models(cli, database_url, "shadow", "--clear", "--reason", "seen enough")
    assert cleared.stdout == "shadow cleared: 2 models are candidates again\n"

    one = _models(
        cli, database_url, "promote", "--version", "r2", "--customer", "c1", "--force", "--reason", "c1"
    )
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("promoted r2 for customer c1 (replacing r1)")
    back = _models(cli, database_url, "rollback", "--customer", "c1", "--reason", "c1 only")
    assert back.stdout == "rolled back r2 for customer c1: back to r1\n"
