"""``posguard-server``: run and operate the service (serve, migrate, manage keys, check the audit log).

Every setting of :class:`~posguard_server.config.Settings` is a flag, generated from the settings model so
the two can never disagree. A flag goes before the subcommand (``posguard-server --listen X serve``) or
after it (``posguard-server serve --listen X``, which wins). One module per command group; each imports
what it needs when it runs, so ``--help`` and quick commands start without scikit-learn or gRPC.
"""

from __future__ import annotations

from typing import Any

import click

from posguard_server.cli.audit import audit
from posguard_server.cli.backup import backup, restore
from posguard_server.cli.command import GROUP_FLAGS, OperatorGroup
from posguard_server.cli.db import db
from posguard_server.cli.demo import demo
from posguard_server.cli.importing import import_
from posguard_server.cli.keys import keys
from posguard_server.cli.models import models
from posguard_server.cli.number_keys import number_keys
from posguard_server.cli.report import report
from posguard_server.cli.retrain import retrain
from posguard_server.cli.rules import rules
from posguard_server.cli.serve import serve
from posguard_server.cli.settings_flags import setting_options, settings_from
from posguard_server.cli.training import evaluate, train


@click.group(
    cls=OperatorGroup,
    params=setting_options(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.pass_context
def main(ctx: click.Context, /, **flags: Any) -> None:
    """Operate a posguard server: customer numbers and transaction risk over gRPC.

    Settings flags go before the command or after it (`posguard-server serve --listen 0.0.0.0:50051`).
    Exit status: 0 done (yes), 1 failed or refused, 2 usage or configuration error, 3 ran but the answer
    is no (rows rejected, a broken audit chain).
    """
    given = {name: value for name, value in flags.items() if value is not None}
    ctx.obj = settings_from(given)
    ctx.meta[GROUP_FLAGS] = given


for _command in (
    serve,
    db,
    keys,
    number_keys,
    audit,
    models,
    rules,
    backup,
    restore,
    import_,
    train,
    evaluate,
    retrain,
    report,
    demo,
):
    main.add_command(_command)

__all__ = ["main"]
