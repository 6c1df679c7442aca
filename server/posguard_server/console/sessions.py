"""Console sessions: kept in this process's memory, named by a random token in an HttpOnly cookie.

A session holds the key id and roles it signed in with (never the key itself), its CSRF token and when it
ends. Memory is enough for one process: a restart signs everybody out, and with several worker processes
only the first serves the console (see ``workers``), so a session never has to be found in another process.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from posguard_server.domain.api_keys import Role

# Sessions kept at most; past it the oldest is dropped (a flood of sign-ins cannot grow memory without bound).
MAX_SESSIONS = 10_000


def _digest(token: str) -> str:
    # Sessions are found by the token's digest: what is kept in memory is not what the cookie carries.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class Session:
    key_id: str
    roles: frozenset[Role]
    csrf: str
    expires_at: float
    flashes: list[str] = field(default_factory=list)


class SessionStore:
    def __init__(self, lifetime_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock
        self._sessions: dict[str, Session] = {}  # insertion order: oldest first
        self._lock = threading.Lock()

    def create(self, key_id: str, roles: frozenset[Role]) -> tuple[str, Session]:
        """A new session; returns the token for the cookie (shown nowhere else) and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(key_id, roles, secrets.token_urlsafe(32), self._clock() + self.lifetime_seconds)
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session ``token`` names, or None (unknown or expired; an expired one is dropped)."""
        if not token:
            return None
        digest = _digest(token)
        with self._lock:
            session = self._sessions.get(digest)
            if session is not None and self._clock() >= session.expires_at:
                del self._sessions[digest]
                return None
            return session

    def end(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            return self._sessions.pop(_digest(token), None)

    def end_key(self, key_id: str) -> None:
        """End every session of ``key_id`` (its key was revoked)."""
        with self._lock:
            for digest in [d for d, s in self._sessions.items() if s.key_id == key_id]:
                del self._sessions[digest]

    def __len__(self) -> int:
        return len(self._sessions)
