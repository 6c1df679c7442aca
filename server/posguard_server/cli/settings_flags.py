"""The settings flags: one per field of :class:`~posguard_server.config.Settings`, generated from the model so
the two can never disagree."""

from __future__ import annotations

import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import click
import pydantic
from pydantic import SecretStr

from posguard_server.config import Settings

_FLAG_TYPES: dict[type, click.ParamType[Any]] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    Path: click.Path(path_type=Path),
    SecretStr: click.STRING,
}

SETTING_NAMES: tuple[str, ...] = tuple(Settings.model_fields)


def _base_type(annotation: Any) -> type:
    """``Path | None`` → ``Path``: the type a flag parses its value into."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.cast(type, args[0])
    return typing.cast(type, annotation)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return f"POSGUARD_{name.upper()}"


def setting_options(*, hidden: bool = False, taken: Collection[str] = ()) -> list[click.Option]:
    """One option per settings field, in declaration order; unset flags stay ``None``.

    ``taken`` holds the parameter names and flags a command already has for itself (``demo --data-dir``):
    those settings get no flag there.
    """
    options: list[click.Option] = []
    for name, info in Settings.model_fields.items():
        flag = flag_of(name)
        if name in taken or flag in taken:
            continue
        help_text = f"{info.description} [env {env_of(name)}]"
        if _base_type(info.annotation) is bool:
            option = click.Option(
                [f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text, hidden=hidden
            )
        else:
            kind = _FLAG_TYPES[_base_type(info.annotation)]
            option = click.Option([flag, name], type=kind, default=None, help=help_text, hidden=hidden)
        options.append(option)
    return options


def settings_from(flags: Mapping[str, Any]) -> Settings:
    """Settings from the flags given (a flag wins over its variable); a bad value is a usage error."""
    try:
        return Settings(**flags)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from None
