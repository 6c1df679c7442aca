"""Settings come from defaults, POSGUARD_* variables and flags, in that order of precedence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
import pydantic
import pytest
from click.testing import CliRunner

from posguard_server.app import run_loop
from posguard_server.cli import main
from posguard_server.config import Settings


def test_defaults_listen_on_loopback_with_sqlite_in_the_data_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"POSGUARD_{name.upper()}", raising=False)
    settings = Settings()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.effective_database_url == f"sqlite:///{(Path('var') / 'posguard.db').resolve()}"
    assert not settings.insecure_no_auth


def test_environment_variables_set_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POSGUARD_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("POSGUARD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("POSGUARD_LOG_LEVEL", "debug")
    monkeypatch.setenv("POSGUARD_METRICS_ENABLED", "false")
    settings = Settings()
    assert settings.listen == "0.0.0.0:6000"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'posguard.db'}"
    assert settings.log_level == "DEBUG"
    assert not settings.metrics_enabled


@pytest.mark.parametrize(
    "fields",
    [
        {"listen": "50051"},
        {"listen": "host:port"},
        {"log_level": "LOUD"},
        {"tls_cert_file": "cert.pem"},
        {"tls_client_ca_file": "ca.pem"},
        {"metrics_port": 70000},
        {"insecure_no_auth": True, "listen": "0.0.0.0:50051"},
        {"risk_review_threshold": 0},
        {"risk_decline_threshold": 1.5},
        {"risk_review_threshold": 0.9, "risk_decline_threshold": 0.8},
        {"model_refresh_seconds": 0},
        {"event_loop": "trio"},
        {"no_such_setting": 1},
    ],
)
def test_bad_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(**fields)  # type: ignore[arg-type]


def test_every_setting_is_a_flag_and_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = CliRunner().invoke(main, ["--help"]).output
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"POSGUARD_{name.upper()}" in help_text
    monkeypatch.setenv("POSGUARD_LISTEN", "127.0.0.1:7000")
    seen: list[Settings] = []

    @main.command("show-settings")
    @click.pass_obj
    def show(settings: Settings) -> None:
        seen.append(settings)

    try:
        result = CliRunner().invoke(
            main, ["--listen", "127.0.0.1:7001", "--no-metrics-enabled", "show-settings"]
        )
        assert result.exit_code == 0, result.output
    finally:
        main.commands.pop("show-settings")
    assert seen[0].listen == "127.0.0.1:7001"
    assert not seen[0].metrics_enabled


def test_a_bad_flag_value_is_a_usage_error_naming_the_setting() -> None:
    result = CliRunner().invoke(main, ["--listen", "nowhere", "db", "current"])
    assert result.exit_code == 2
    assert "listen" in result.output


@pytest.mark.parametrize(("name", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_service_runs_on_the_event_loop_its_settings_name(name: str, module: str) -> None:
    ran_on: list[str] = []

    async def main() -> None:
        ran_on.append(type(asyncio.get_running_loop()).__module__)

    run_loop(Settings(event_loop=name), main())
    assert ran_on[0].split(".")[0] == module
    assert Settings().event_loop == "uvloop"
