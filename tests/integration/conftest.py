"""A real posguard server on 127.0.0.1:0, served from its own event loop thread, and keys to call it with."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import posguard
from posguard.dynamic_codes import PERIOD_SECONDS
from posguard_server.app import PosguardServer, build_server
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.domain.keyring import load_or_create
from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.migrate import upgrade

if TYPE_CHECKING:
    pass


@dataclass
class RunningServer:
    """A started server. ``target`` is what clients dial; ``key(role)`` makes an API key of that role."""

    settings: Settings
    server: PosguardServer
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    _keys: dict[Role, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def key(self, role: Role | str) -> str:
        role = Role(role)
        if role not in self._keys:
            _, token = create_key(
                SqlApiKeyStore(self.server.database), name=f"test {role.value}", role=role, created_by="test"
            )
            assert token is not None
            self._keys[role] = token
        return self._keys[role]

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.loop.is_closed():  # already stopped by the test itself
            return
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def start_server(settings: Settings) -> RunningServer:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="posguard-test-server", daemon=True)
    thread.start()

    async def build() -> tuple[PosguardServer, int]:
        # Built inside the loop that will serve it: gRPC's asyncio server binds to the running loop.
        server, port = build_server(settings)
        await server.start()
        return server, port

    try:
        server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(60)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        raise
    return RunningServer(settings=settings, server=server, port=port, loop=loop, thread=thread)


def settings_for_test(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test server: free ports, its own data directory."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "data_dir": tmp_path / "data",
        "metrics_port": 0,
        "console_listen": "127.0.0.1:0",
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
def server_factory(
    tmp_path: Path, request: pytest.FixtureRequest, empty_database: bool
) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with setting overrides; all are stopped after the test.

    A server on the embedded database finds it migrated already (a copy of one migrated once per test
    process) unless the test is marked ``empty_database``; on its first start it would migrate it.
    """
    started: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        settings = settings_for_test(tmp_path, **overrides)
        embedded = settings.embedded_database_file
        if not settings.database_url and not embedded.exists() and not empty_database:
            settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            request.getfixturevalue("migrated_sqlite_file")(embedded)
        running = start_server(settings)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server on the embedded SQLite default."""
    return server_factory()


@pytest.fixture
def migrated_server(server_factory: Callable[..., RunningServer], database_url: str) -> RunningServer:
    """A server on each backend; the database is migrated first, as an operator would."""
    upgrade(database_url)
    return server_factory(database_url=database_url)


@pytest.fixture
def not_at_a_step_edge() -> None:
    """Dynamic codes of "now" made in a test must still be "now" on the server: start well inside a step.

    The margin is more than any test that makes such codes takes, on a loaded machine too."""
    if time.time() % PERIOD_SECONDS > PERIOD_SECONDS - 15:
        time.sleep(PERIOD_SECONDS - time.time() % PERIOD_SECONDS + 0.1)


SERVING_LINE = re.compile(r"posguard serving on 127\.0\.0\.1:(\d+)")
Cli = Callable[..., "subprocess.CompletedProcess[str]"]
ServeProcess = Callable[..., tuple["subprocess.Popen[str]", int]]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``posguard-server ARGS`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "posguard_server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def cli() -> Cli:
    return run_cli


@pytest.fixture
def serve_process() -> Iterator[ServeProcess]:
    """Start ``posguard-server serve`` processes on free ports; returns (process, port). Killed afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(
        data_dir: Path, *flags: str, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], int]:
        command = [
            sys.executable,
            "-m",
            "posguard_server",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--console-listen",
            "127.0.0.1:0",
            *flags,
            "serve",
        ]
        process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        started.append(process)
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            match = SERVING_LINE.search(line)
            if match:
                return process, int(match.group(1))
        raise AssertionError("the server did not report that it is serving")

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def start_replicas(
    database_url: str,
    tmp_path: Path,
    cli: Cli,
    serve_process: ServeProcess,
    processes: int,
    settings: dict[str, str] | None = None,
) -> tuple[str, list[int]]:
    """``processes`` servers on one database, as an operator runs replicas: a gateway key and their ports.

    The replicas share one key ring, handed to each as an operator would (from a secret store).
    ``settings``: more of their environment (``POSGUARD_…``).
    """
    load_or_create(tmp_path / "keys.json")
    env = {
        "POSGUARD_DATABASE_URL": database_url,
        "POSGUARD_NUMBER_KEYS": (tmp_path / "keys.json").read_text(),
        **(settings or {}),
    }
    assert cli("db", "upgrade", env=env).returncode == 0
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", env=env)
    token = created.stdout.strip()
    return token, [serve_process(tmp_path / f"replica{i}", env=env)[1] for i in range(processes)]


_Outcome = TypeVar("_Outcome")


@dataclass(frozen=True)
class Race(Generic[_Outcome]):
    """What gateway calls made while an operator revoked a number gave: sent before the revocation was
    answered, and sent after it."""

    before: list[_Outcome]
    after: list[_Outcome]


def race_a_revocation(
    server: RunningServer, number: str, call: Callable[[posguard.Client], _Outcome], callers: int = 8
) -> Race[_Outcome]:
    """``callers`` gateway threads make ``call`` over and over while an admin revokes ``number``.

    A call that raises fails the test.
    """
    gateway = server.key("gateway")
    seen: list[tuple[float, _Outcome]] = []  # (sent at, outcome)
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        with posguard.Client(server.target, api_key=gateway) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    outcome = call(client)
                except BaseException as error:
                    errors.append(error)
                    return
                with lock:
                    seen.append((sent, outcome))

    threads = [threading.Thread(target=loop) for _ in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    with posguard.Client(server.target, api_key=server.key("admin")) as admin:
        admin.revoke_customer_id(number=number, reason="closed")
    revoked_at = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return Race(
        [outcome for sent, outcome in seen if sent < revoked_at],
        [outcome for sent, outcome in seen if sent > revoked_at],
    )


# -- certificates for TLS and mTLS tests -----------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server and a client certificate it signed, and a client certificate of another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("posguard test CA", None)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    issuer = (ca_cert.subject, ca_key)
    server_cert, server_key = _write(
        directory, "server", *_issue("localhost", issuer, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    )
    client_cert, client_key = _write(
        directory, "client", *_issue("till-7", issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    # A client certificate from a CA the server does not trust.
    other_ca = _issue("someone else's CA", None)
    stranger_cert, stranger_key = _write(
        directory,
        "stranger",
        *_issue("stranger", (other_ca[0].subject, other_ca[1]), usage=ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)
