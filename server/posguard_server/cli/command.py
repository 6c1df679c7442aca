"""The command classes of ``posguard-server``: settings flags after a subcommand too, and logging per command.

A setting can be given before the subcommand (``posguard-server --listen X serve``) or after it
(``posguard-server serve --listen X``); after it wins. Only ``serve`` lists the settings in its help: the
other commands accept them without repeating two dozen flags under every command.

``serve`` logs as the settings say (JSON lines for log collectors by default). Every other command talks to
a person or a script through its own output, so it logs warnings and worse only, as text, unless the
operator asks for DEBUG or names a log format.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from posguard_server.cli.settings_flags import setting_options, settings_from
from posguard_server.config import Settings
from posguard_server.logs import configure_logging, stop_logging

# ctx.meta key: the settings flags given before the subcommand, for a subcommand's flags to extend.
GROUP_FLAGS = "posguard_server.settings_flags"


class OperatorCommand(click.Command):
    """A subcommand that takes the settings flags too; ``serves=True`` marks the one that runs the server."""

    def __init__(self, *args: Any, serves: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serves = serves
        taken: set[str] = set()
        for param in self.params:
            taken.update(filter(None, (param.name, *param.opts, *param.secondary_opts)))
        options = setting_options(hidden=not serves, taken=taken)
        self._setting_params = tuple(option.name for option in options if option.name)
        self.params.extend(options)

    def invoke(self, ctx: click.Context) -> Any:
        given = {name: ctx.params.pop(name, None) for name in self._setting_params}
        given = {name: value for name, value in given.items() if value is not None}
        if given:
            ctx.obj = settings_from({**ctx.meta.get(GROUP_FLAGS, {}), **given})
        if isinstance(ctx.obj, Settings):
            _configure_logging(ctx.obj, serves=self.serves)
        try:
            return super().invoke(ctx)
        finally:
            stop_logging()  # the server's last lines (shutting down, stopped) are written before it exits


class OperatorGroup(click.Group):
    """A group whose commands and subgroups take the settings flags too."""

    command_class = OperatorCommand
    group_class = type  # subgroups (keys, models, ...) are OperatorGroups as well


def _configure_logging(settings: Settings, *, serves: bool) -> None:
    if serves:
        configure_logging(settings.log_level_number, settings.log_format, background=True)
        return
    # INFO lines (migrations, the numbering, the store) would bury the command's own answer; DEBUG is asked
    # for on purpose. JSON is the service's default for collectors: here only a format named on purpose.
    level = settings.log_level_number
    if level > logging.DEBUG:
        level = max(level, logging.WARNING)
    log_format = settings.log_format if "log_format" in settings.model_fields_set else "text"
    configure_logging(level, log_format)
