"""The ``posguard`` command line against a real server on 127.0.0.1:0."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from posguard.cli import main

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .conftest import RunningServer

# Variables the command reads; cleared so the environment running the tests cannot change what they see.
_CLIENT_VARIABLES = (
    "POSGUARD_TARGET",
    "POSGUARD_API_KEY",
    "POSGUARD_TIMEOUT",
    "POSGUARD_TLS",
    "POSGUARD_CA_FILE",
    "POSGUARD_CERT_FILE",
    "POSGUARD_KEY_FILE",
    "POSGUARD_SERVER_NAME",
    "POSGUARD_JSON",
)


def run(server: RunningServer, *args: str, key: str | None = None, key_in_env: bool = True) -> Result:
    """Invoke the command against ``server``; whatever happens, the caller's key must not be printed."""
    env: dict[str, str | None] = dict.fromkeys(_CLIENT_VARIABLES)
    env["POSGUARD_TARGET"] = server.target
    flags: list[str] = []
    if key is not None and key_in_env:
        env["POSGUARD_API_KEY"] = key
    elif key is not None:
        flags = ["--api-key", key]
    result = CliRunner().invoke(main, [*flags, *args], env=env)
    if key is not None:
        assert key not in result.stdout
        assert key not in result.stderr
    assert "Traceback" not in result.output
    return result


def test_health_prints_serving(server: RunningServer) -> None:
    result = run(server, "health")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "SERVING"


def test_health_of_an_unknown_service_is_an_error(server: RunningServer) -> None:
    result = run(server, "health", "--service", "no.such.Service")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: NOT_FOUND")


def test_health_as_json(server: RunningServer) -> None:
    result = run(server, "--json", "health")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_key_lifecycle_create_list_revoke(server: RunningServer) -> None:
    admin = server.key("admin")

    created = run(server, "--json", "keys", "create", "--role", "gateway", "--name", "x", key=admin)
    assert created.exit_code == 0, created.output
    answer = json.loads(created.stdout)
    token, key_id = answer["token"], answer["key"]["key_id"]
    assert token.startswith(f"pgk_{key_id}_")
    assert answer["key"]["name"] == "x"
    assert answer["key"]["role"] == "ROLE_GATEWAY"

    listed = run(server, "keys", "list", "--role", "gateway", key=admin, key_in_env=False)
    assert listed.exit_code == 0, listed.output
    assert f"key_id: {key_id}" in listed.stdout
    assert "name: x" in listed.stdout
    assert token not in listed.stdout

    # Before revocation the server knows the new key: a gateway may not list keys, but it is not a stranger.
    before = run(server, "keys", "list", key=token)
    assert before.exit_code == 1
    assert "PERMISSION_DENIED" in before.stderr

    revoked = run(server, "--json", "keys", "revoke", key_id, "--reason", "test over", key=admin)
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["key"]["revoked"] is True

    # After it, the same token is not accepted at all.
    after = run(server, "keys", "list", key=token)
    assert after.exit_code == 1
    assert after.stderr.startswith("error: UNAUTHENTICATED")

    still_listed = run(server, "--json", "keys", "list", "--all", key=admin)
    keys = {k["key_id"]: k for k in json.loads(still_listed.stdout)["keys"]}
    assert keys[key_id]["revoke_reason"] == "test over"


def test_missing_api_key_is_unauthenticated(server: RunningServer) -> None:
    result = run(server, "keys", "list")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: UNAUTHENTICATED")


def test_gateway_key_may_not_list_keys(server: RunningServer) -> None:
    result = run(server, "keys", "list", key=server.key("gateway"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: PERMISSION_DENIED")


def test_empty_key_name_is_invalid_argument_naming_the_field(server: RunningServer) -> None:
    result = run(server, "keys", "create", "--role", "admin", "--name", "", key=server.key("admin"))
    assert result.exit_code == 1
    first, *violations = result.stderr.splitlines()
    assert first.startswith("error: INVALID_ARGUMENT")
    assert any(line.startswith("  name: ") for line in violations), result.stderr


def test_errors_as_json_carry_code_reason_and_field_violations(server: RunningServer) -> None:
    result = run(server, "--json", "keys", "create", "--role", "admin", "--name", "", key=server.key("admin"))
    assert result.exit_code == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert set(error) == {"code", "reason", "message", "field_violations"}
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["reason"]
    assert "name" in [v["field"] for v in error["field_violations"]]
    assert all(v["description"] for v in error["field_violations"])


def test_an_error_answer_is_a_clean_error(server: RunningServer) -> None:
    result = run(server, "profile", "--customer-id", "c1", key=server.key("gateway"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: NOT_FOUND")
    assert isinstance(result.exception, SystemExit)


def test_unreachable_server_is_unavailable_not_a_traceback(server: RunningServer) -> None:
    result = CliRunner().invoke(
        main,
        ["--target", "127.0.0.1:1", "--timeout", "2", "keys", "list"],
        env=dict.fromkeys(_CLIENT_VARIABLES),
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(("error: UNAVAILABLE", "error: DEADLINE_EXCEEDED"))
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "create", "--role", "superuser", "--name", "x"],  # not a role of the contract
        ["get"],  # no selector
        ["get", "1234", "--customer-id", "c1"],  # two selectors
        ["link", "--customer-id", "c1", "no-colon"],  # not NS:VALUE
        [
            "score",
            "--transaction-id",
            "t1",
            "--number",
            "1",
            "--amount-minor",
            "1",
            "--currency",
            "CNY",
            "--merchant-id",
            "m-1",
            "--time",
            "2025-03-01T12:00:00",
            "--lat",
            "1",
        ],  # latitude without longitude
        ["models", "list", "--scope", "none"],  # no models live there
        ["score", "--transaction-id", "t1", "--number", "1", "--amount-minor", "1", "--currency", "CNY"],
    ],
)
def test_usage_errors_exit_2_without_calling(server: RunningServer, args: list[str]) -> None:
    result = run(server, *args, key=server.key("admin"))
    assert result.exit_code == 2, result.output


def test_enum_names_and_selectors_reach_the_server(server: RunningServer) -> None:
    # Every RPC answers for real; the risk answers below come from server-side validation and lookup, so
    # reaching them shows that the options turned into a request the stubs accept.
    gateway = server.key("gateway")
    verified = run(server, "--json", "verify", "1234", "--channel", "POS", key=gateway)
    assert verified.exit_code == 3, verified.output  # an answer, but not a valid number
    assert json.loads(verified.stdout)["reason"] == "VERIFICATION_REASON_MALFORMED"
    missing = run(server, "get", "--external", "crm:acme:42", key=gateway)
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: NOT_FOUND"), missing.stderr
    issued = json.loads(run(server, "--json", "issue", key=gateway).stdout)["customer"]
    number, customer_id = issued["primary"]["number"], issued["customer_id"]
    assert run(server, "link", number, "bank:1", key=gateway).exit_code == 0
    resolved = run(
        server, "--json", "resolve", "--customer-id", customer_id, "--namespace", "bank", key=gateway
    )
    assert json.loads(resolved.stdout)["external_ids"] == [{"namespace": "bank", "value": "1"}]
    sub = run(server, "--json", "sub", number, "--channel", "mobile", key=gateway)
    assert json.loads(sub.stdout)["sub_number"]["scope"]["channel"] == "CHANNEL_MOBILE", sub.output
    for args, code in (
        (
            [
                "score",
                "--transaction-id",
                "t1",
                "--code",
                "1",
                "--amount-minor",
                "100",
                "--currency",
                "CNY",
                "--merchant-id",
                "m-1",
                "--time",
                "2025-03-01T12:00:00",
                "--channel",
                "online",
                "--lat",
                "-33.9",
                "--lon",
                "151.2",
            ],
            "INVALID_ARGUMENT",  # "1" is not a dynamic code
        ),
        (["outcome", "t1", "chargeback"], "NOT_FOUND"),
    ):
        result = run(server, *args, key=gateway)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith(f"error: {code}"), (args, result.stderr)


def test_help_never_shows_the_key(server: RunningServer) -> None:
    secret = server.key("admin")
    result = CliRunner().invoke(
        main, ["--help"], env={**dict.fromkeys(_CLIENT_VARIABLES), "POSGUARD_API_KEY": secret}
    )
    assert result.exit_code == 0
    assert "POSGUARD_API_KEY" in result.stdout
    assert secret not in result.output


def test_usage_error_for_a_client_certificate_without_its_key(server: RunningServer, tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    result = run(server, "--cert-file", str(cert), "health")
    assert result.exit_code == 2
    assert "key-file" in result.stderr


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: enough to show the TLS options reach the channel."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_options_reach_both_the_client_and_the_health_check(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    running = server_factory(tls_cert_file=cert, tls_key_file=key)
    tls = ["--ca-file", str(cert), "--server-name", "localhost"]

    assert run(running, *tls, "health").stdout.strip() == "SERVING"
    listed = run(running, *tls, "keys", "list", key=running.key("admin"))
    assert listed.exit_code == 0, listed.output
    assert "name: test admin" in listed.stdout

    plaintext = run(running, "--timeout", "2", "health")
    assert plaintext.exit_code == 1
    assert plaintext.stderr.startswith(("error: UNAVAILABLE", "error: DEADLINE_EXCEEDED"))


def test_an_analyst_works_a_case_from_the_command_line(server: RunningServer) -> None:
    gateway, analyst = server.key("gateway"), server.key("analyst")
    number = json.loads(run(server, "--json", "issue", key=gateway).stdout)["customer"]["primary"]["number"]
    # With no model trained yet the answer is the no-model decision, REVIEW by default: a case opens.
    scored = run(
        server,
        "score",
        "--transaction-id",
        "tx-cli-case",
        "--number",
        number,
        "--amount-minor",
        "1250",
        "--currency",
        "CNY",
        "--merchant-id",
        "m-1",
        "--time",
        "2026-01-31T12:00:00Z",
        key=gateway,
    )
    assert scored.exit_code == 4, scored.output  # REVIEW
    listed = run(server, "--json", "cases", "list", "--status", "open", key=analyst)
    assert listed.exit_code == 0, listed.output
    (case,) = json.loads(listed.stdout)["cases"]
    assert case["transaction_id"] == "tx-cli-case"
    shown = run(server, "cases", "show", case["case_id"], key=analyst)
    assert shown.exit_code == 0, shown.output
    assert "tx-cli-case" in shown.stdout
    assigned = run(server, "--json", "cases", "assign", case["case_id"], "alice", key=analyst)
    assert json.loads(assigned.stdout)["case"]["assignee"] == "alice"
    resolved = run(
        server, "--json", "cases", "resolve", case["case_id"], "fraud", "--note", "card stolen", key=analyst
    )
    assert resolved.exit_code == 0, resolved.output
    assert json.loads(resolved.stdout)["case"]["resolution"] == "CASE_RESOLUTION_FRAUD"
    assert (
        run(server, "--json", "cases", "list", "--status", "open", key=analyst).stdout.count("case_id") == 0
    )
    # The analyst may work cases and nothing else.
    refused = run(server, "issue", key=analyst)
    assert refused.exit_code == 1
    assert "PERMISSION_DENIED" in refused.stderr
