"""The number key ring: owner-only file created atomically, reload, rotation, and no key material shown."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from typing import TYPE_CHECKING

import pytest

from posguard_server.domain.keyring import (
    KeyRing,
    from_settings,
    load,
    load_or_create,
    save,
    to_settings,
)

if TYPE_CHECKING:
    from pathlib import Path

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def material(ring: KeyRing) -> list[str]:
    """Every way a key might show up in text."""
    out: list[str] = []
    for key in ring.keys.values():
        out += [key.hex(), base64.b64encode(key).decode(), repr(key)]
    return out


@posix_only
def test_created_file_is_owner_only_and_reloads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "data" / "number_keys.json"
    ring = load_or_create(path)
    assert mode(path) == 0o600
    assert ring.current == 1
    assert len(ring.current_key) == 32
    assert load_or_create(path) == ring
    assert load(path).current_key == ring.current_key
    # Nothing but the file itself is left in the directory (no stray temporary file).
    assert sorted(p.name for p in path.parent.iterdir()) == ["number_keys.json"]


@posix_only
def test_created_file_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create(tmp_path / "keys.json")
    finally:
        os.umask(old)
    assert mode(tmp_path / "keys.json") == 0o600


def test_fresh_rings_differ(tmp_path: Path) -> None:
    assert load_or_create(tmp_path / "a.json").current_key != load_or_create(tmp_path / "b.json").current_key


def test_processes_racing_to_create_agree_on_one_ring(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    rings: list[KeyRing] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        rings.append(load_or_create(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rings) == 8
    assert all(ring == load(path) for ring in rings)


@posix_only
@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_file_others_can_access_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "keys.json"
    ring = load_or_create(path)
    path.chmod(loose)
    with pytest.raises(ValueError, match="owner only") as caught:
        load_or_create(path)
    assert f"{loose:04o}" in str(caught.value)
    assert not any(secret in str(caught.value) for secret in material(ring))
    # Refused, not repaired or replaced behind the operator's back.
    assert mode(path) == loose
    path.chmod(0o600)
    assert load(path) == ring


def test_rotation_keeps_old_versions_and_saves_atomically(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first = load_or_create(path)
    second = first.rotated()
    assert second.current == 2
    assert second.key(1) == first.current_key
    assert second.current_key != first.current_key
    assert len(second.current_key) == 32
    third = second.rotated()
    assert sorted(third.keys) == [1, 2, 3]
    assert first.keys == {1: first.current_key}  # rotation made a new ring; the old one is unchanged
    save(third, path)
    if os.name != "nt":
        assert mode(path) == 0o600
    reloaded = load_or_create(path)
    assert reloaded == third
    assert [reloaded.key(v) for v in (1, 2, 3)] == [third.key(v) for v in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_rotation_after_rollback_never_overwrites_a_version() -> None:
    ring = KeyRing({1: bytes(32), 2: bytes(range(32))}, current=1)
    rotated = ring.rotated()
    assert rotated.current == 3
    assert rotated.key(2) == bytes(range(32))


def test_repr_and_str_show_no_key_material() -> None:
    ring = KeyRing({1: bytes(range(32)), 2: bytes(range(32, 64))}, current=2)
    for shown in (repr(ring), str(ring), f"{ring}", repr([ring])):
        assert "versions=[1, 2]" in shown
        assert "current=2" in shown
        assert not any(secret in shown for secret in material(ring))


def test_keys_cannot_be_changed_in_place() -> None:
    ring = KeyRing({1: bytes(32)}, current=1)
    with pytest.raises(TypeError):
        ring.keys[2] = bytes(32)  # type: ignore[index]


def test_unknown_version_is_a_key_error() -> None:
    ring = KeyRing({1: bytes(32)}, current=1)
    with pytest.raises(KeyError, match="version 7"):
        ring.key(7)


@pytest.mark.parametrize(
    ("keys", "current", "message"),
    [
        ({}, 1, "at least one key"),
        ({1: bytes(32)}, 2, "current key version"),
        ({0: bytes(32)}, 0, "positive"),
        ({1: bytes(20)}, 1, "16, 24 or 32"),
    ],
)
def test_invalid_rings_are_refused(keys: dict[int, bytes], current: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing(keys, current)


def test_settings_round_trip() -> None:
    ring = KeyRing({1: bytes(16), 2: bytes(range(24)), 5: bytes(range(32))}, current=5)
    text = to_settings(ring)
    assert json.loads(text)["current"] == 5
    assert set(json.loads(text)["keys"]) == {"1", "2", "5"}
    assert from_settings(text) == ring


SECRET = base64.b64encode(bytes(range(200, 232))).decode()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not JSON"),
        (f'{{"current": 1, "keys": {{"1": "{SECRET}"', "not JSON"),
        ("[1, 2]", "expected an object"),
        (f'{{"keys": {{"1": "{SECRET}"}}}}', '"current"'),
        (f'{{"current": "1", "keys": {{"1": "{SECRET}"}}}}', '"current"'),
        (f'{{"current": true, "keys": {{"1": "{SECRET}"}}}}', '"current"'),
        ('{"current": 1, "keys": {}}', '"keys"'),
        (f'{{"current": 1, "keys": ["{SECRET}"]}}', '"keys"'),
        (f'{{"current": 1, "keys": {{"one": "{SECRET}"}}}}', "positive integers"),
        (f'{{"current": 1, "keys": {{"-1": "{SECRET}"}}}}', "positive integers"),
        ('{"current": 1, "keys": {"1": 12345}}', "base64 string"),
        (f'{{"current": 1, "keys": {{"1": "{SECRET[:-3]}!!"}}}}', "not valid base64"),
        (f'{{"current": 1, "keys": {{"1": "{SECRET[:20]}"}}}}', "16, 24 or 32"),
        (f'{{"current": 2, "keys": {{"1": "{SECRET}"}}}}', "current key version 2"),
    ],
)
def test_malformed_settings_give_a_clear_error_without_key_material(text: str, why: str) -> None:
    with pytest.raises(ValueError, match="malformed") as caught:
        from_settings(text)
    message = str(caught.value)
    assert why in message
    assert "number key ring setting" in message
    assert SECRET not in message
    assert SECRET[:8] not in message


def test_malformed_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"current": 1, "keys": {"1": "' + SECRET.encode() + b'"')
    path.chmod(0o600)
    with pytest.raises(ValueError, match="malformed") as caught:
        load_or_create(path)
    assert str(path) in str(caught.value)
    assert SECRET[:8] not in str(caught.value)
    # A broken ring is reported, never silently replaced by a new one (that would orphan issued numbers).
    assert SECRET.encode() in path.read_bytes()

    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match="not UTF-8"):
        load(path)
