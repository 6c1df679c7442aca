"""The exit statuses ``posguard-server`` shares with the ``posguard`` client, and how commands end with them.

0: done, and the answer is yes. 1: the operation failed or was refused. 2: usage or configuration error (a
bad option or value, a port in use). 3: it ran, but the answer is no (rows rejected, a broken audit chain):
scripts and monitoring can branch on it without parsing the output.
"""

from __future__ import annotations

from typing import NoReturn

import click

OK = 0
FAILED = 1
USAGE = 2
ANSWER_NO = 3


class ConfigurationError(click.ClickException):
    """A setting or the file it names is unusable: the operator must change the configuration."""

    exit_code = USAGE


class AnswerNo(click.ClickException):
    """The command ran and its answer is no; the message says what was found."""

    exit_code = ANSWER_NO


def exit_answer_no() -> NoReturn:
    """End a command whose output already told the story, with status 3."""
    click.get_current_context().exit(ANSWER_NO)
