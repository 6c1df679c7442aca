"""A real posguard server on 127.0.0.1:0, served from its own event loop thread, and keys to call it with."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from posguard_server.app import PosguardServer, build_server
from posguard_server.config import Settings
from posguard_server.domain.api_keys import Role, create_key
from posguard_server.store import SqlApiKeyStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


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
    base: dict[str, Any] = {"listen": "127.0.0.1:0", "data_dir": tmp_path / "data", "metrics_port": 0}
    return Settings(**{**base, **overrides})


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with setting overrides; all are stopped after the test."""
    started: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        running = start_server(settings_for_test(tmp_path, **overrides))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server on the embedded SQLite default."""
    return server_factory()
