"""Versioned FF1 keys for serials, and the file (or setting) that holds them.

Numbers record the key version they were made with, so a rotation adds a version and never removes one:
old numbers keep their serials, and audits can still decrypt them. The keys are secrets. Nothing here puts
key material into a repr, a log line or an error message.

Format, as a file or as one setting from a secret store::

    {"current": 2, "keys": {"1": "<base64>", "2": "<base64>"}}
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

KEY_BYTES: Final = 32
_AES_KEY_SIZES: Final = (16, 24, 32)
# Group or other access of any kind: readable leaks the keys, writable lets someone swap in their own.
_FOREIGN_ACCESS: Final = 0o077


@dataclass(frozen=True, repr=False)
class KeyRing:
    keys: Mapping[int, bytes] = field(repr=False)
    current: int

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key ring holds at least one key")
        copied: dict[int, bytes] = {}
        for version, key in self.keys.items():
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"key versions are positive integers, not {version!r}")
            if len(key) not in _AES_KEY_SIZES:
                raise ValueError(f"key version {version} is {len(key)} bytes long; AES keys are 16, 24 or 32")
            copied[version] = bytes(key)
        if isinstance(self.current, bool) or self.current not in copied:
            raise ValueError(f"the current key version {self.current!r} is not in the ring")
        # Read-only, so a ring handed around a server cannot be changed under the numbers it made.
        object.__setattr__(self, "keys", MappingProxyType(copied))

    def __repr__(self) -> str:
        return f"KeyRing(versions={sorted(self.keys)}, current={self.current})"

    __str__ = __repr__

    def key(self, version: int) -> bytes:
        try:
            return self.keys[version]
        except KeyError:
            raise KeyError(f"no number key with version {version}") from None

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current]

    def rotated(self) -> KeyRing:
        """This ring plus a fresh key that becomes current; every older version stays for old numbers."""
        # max() rather than current + 1: after a rollback of ``current`` a newer version may already exist
        # and must not be overwritten.
        version = max(self.keys) + 1
        return KeyRing({**self.keys, version: secrets.token_bytes(KEY_BYTES)}, version)


def new_ring() -> KeyRing:
    return KeyRing({1: secrets.token_bytes(KEY_BYTES)}, 1)


def to_settings(ring: KeyRing) -> str:
    """The ring in its file format, e.g. to hand to a secret store. The result is secret."""
    keys = {
        str(version): base64.b64encode(ring.keys[version]).decode("ascii") for version in sorted(ring.keys)
    }
    return json.dumps({"current": ring.current, "keys": keys}, indent=2) + "\n"


def from_settings(value: str) -> KeyRing:
    """The ring from its JSON text, as an operator passes it through a secret store."""
    return _parse(value, "the number key ring setting")


def _parse(text: str, source: str) -> KeyRing:
    def bad(why: str) -> ValueError:
        return ValueError(f"{source} is malformed: {why}")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # The decoder's message names a position, never the text, so no key material can leak here.
        raise bad(f"not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(data, dict):
        raise bad('expected an object {"current": <version>, "keys": {...}}')
    current = data.get("current")
    entries = data.get("keys")
    if isinstance(current, bool) or not isinstance(current, int):
        raise bad('"current" must be an integer key version')
    if not isinstance(entries, dict) or not entries:
        raise bad('"keys" must be a non-empty object of version: base64 key')
    keys: dict[int, bytes] = {}
    for name, encoded in entries.items():
        if not (name.isascii() and name.isdigit()):
            raise bad(f"key versions are written as positive integers, not {name!r}")
        if not isinstance(encoded, str):
            raise bad(f"key version {name} must be a base64 string")
        try:
            keys[int(name)] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"key version {name} is not valid base64") from None
    try:
        return KeyRing(keys, current)
    except ValueError as error:
        raise bad(str(error)) from None


def load(path: Path) -> KeyRing:
    """The ring in ``path``; refused if anyone but its owner may read or write the file."""
    with path.open("rb") as file:
        # Checked on the open file, not the path, so the file read is the file checked.
        mode = os.fstat(file.fileno()).st_mode & 0o777
        if os.name != "nt" and mode & _FOREIGN_ACCESS:
            raise ValueError(
                f"the number key file {path} has mode {mode:04o}, so others can read or change the keys;"
                f" it must be accessible by its owner only (chmod 600 {path})"
            )
        raw = file.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the number key file {path} is malformed: not UTF-8 text") from None
    return _parse(text, f"the number key file {path}")


def load_or_create(path: Path) -> KeyRing:
    """The ring in ``path``, created with one fresh key (mode 0600) on first use.

    Replicas starting together on a shared directory all end up with the same ring: the file is published
    without replacing an existing one, and whoever loses that race reads the winner's file.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        return load(path)
    ring = new_ring()
    if _write_private(path, to_settings(ring), replace=False):
        return ring
    return load(path)


def save(ring: KeyRing, path: Path) -> None:
    """Replace the ring in ``path`` atomically (after a rotation): readers see the old ring or the new one."""
    _write_private(Path(path), to_settings(ring), replace=True)


def _write_private(path: Path, text: str, *, replace: bool) -> bool:
    """Write ``text`` to ``path`` as a complete, owner-only file; False if not replacing and it exists."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp already uses 0600; saying so keeps that true whatever the platform's defaults.
        if os.name != "nt":
            os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        elif not _publish_new(temporary, path):
            return False
        _fsync_directory(directory)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _publish_new(temporary: str, path: Path) -> bool:
    # A hard link appears atomically and fails if the name exists, unlike a rename, which would silently
    # replace a ring another process has just created (and is already issuing numbers with).
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}:
            raise
        # No hard links on this file system: a rename is still atomic, with a small window for the race.
        if path.exists():
            return False
        os.replace(temporary, path)
    return True


def _fsync_directory(directory: Path) -> None:
    # The rename or link is durable only once the directory entry is; not every platform can sync one.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
