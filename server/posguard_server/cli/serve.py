"""``posguard-server serve``: run the service."""

from __future__ import annotations

import errno

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.cli.exit_codes import ConfigurationError
from posguard_server.cli.ports import cannot_listen, check_ports_free
from posguard_server.config import Settings


@click.command(cls=OperatorCommand, serves=True)
@click.pass_obj
def serve(settings: Settings) -> None:
    """Serve gRPC until SIGTERM or SIGINT (the embedded SQLite schema is migrated on start).

    Settings may follow the command too (`posguard-server serve --listen 0.0.0.0:50051 --workers 4`);
    there they win over the same flags before it. A port in use ends the command with status 2.
    """
    from posguard_server.app import serve as run
    from posguard_server.store.migrate import SchemaNotCurrentError

    check_ports_free(settings)
    try:
        status = run(settings)
    except SchemaNotCurrentError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:  # issuers file or key ring unusable; the message names the file, not keys
        raise ConfigurationError(f"cannot start: {error}") from None
    except (RuntimeError, OSError) as error:
        failure = _bind_failure(settings, error)  # a port another process took after the check
        if failure is None:
            raise
        raise failure from None
    if status:
        click.get_current_context().exit(status)


def _bind_failure(settings: Settings, error: Exception) -> ConfigurationError | None:
    """The one-line error for a port taken after the check, or None for anything else."""
    message = str(error)
    # gRPC raises RuntimeError("Failed to bind to address ..."); older releases return port 0, which the
    # server reports as OSError("cannot listen on ...").
    if message.startswith(("Failed to bind", "cannot listen on")):
        return cannot_listen(settings.listen, "listen", "the address is in use or not available here")
    if message.startswith("console: cannot listen on"):
        return cannot_listen(
            settings.console_listen, "console_listen", "the address is in use or not available here"
        )
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:  # the only other port: metrics
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        return cannot_listen(address, "metrics_port", "address already in use")
    return None
