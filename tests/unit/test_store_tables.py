"""The store package loads one store at a time, and ``store.tables`` still holds the whole schema.

Each module is imported in an interpreter of its own, as a command that uses one store does: every table it
brings must have the tables its foreign keys point to (else SQLAlchemy fails on the first write), and every
table must be one ``store.tables`` lists.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import posguard_server.store
from posguard_server.store.tables import METADATA

_MODULES = sorted(
    info.name for info in pkgutil.iter_modules(posguard_server.store.__path__) if info.name != "migrations"
)

# Imports one module, resolves every foreign key of the tables it brought, prints the tables and which of
# posguard's store modules came with it.
_PROBE = """
import json, sys
import importlib
importlib.import_module(sys.argv[1])
modules = sorted(m for m in sys.modules if m.startswith("posguard_server.store."))
from posguard_server.store.schema import Base
for table in Base.metadata.tables.values():
    for key in table.foreign_keys:
        key.column  # NoReferencedTableError when the table it points to was not loaded
print(json.dumps({
    "tables": sorted(Base.metadata.tables),
    "modules": modules,
}))
"""


def _probe(module: str) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, list[str]] = json.loads(result.stdout)
    return loaded


def test_the_package_itself_imports_no_store() -> None:
    assert _probe("posguard_server.store")["modules"] == []


@pytest.fixture(scope="module")
def listed() -> set[str]:
    """The tables ``store.tables`` brings, in an interpreter where nothing else was imported."""
    return set(_probe("posguard_server.store.tables")["tables"])


@pytest.mark.parametrize("module", _MODULES)
def test_each_module_alone_brings_the_tables_its_foreign_keys_need(module: str, listed: set[str]) -> None:
    tables = _probe(f"posguard_server.store.{module}")["tables"]
    assert set(tables) <= listed, "a table that store.tables does not list"


def test_store_tables_lists_every_table_of_every_module(listed: set[str]) -> None:
    for module in _MODULES:
        importlib.import_module(f"posguard_server.store.{module}")
    assert listed == set(METADATA.tables)
