"""The wheel's dependency ranges and the lock agree: every runtime dependency has a floor and a cap, and the
version uv.lock pins (the one every install of ours and CI uses) lies inside that range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def _locked_versions() -> dict[str, list[Version]]:
    """Every version the lock holds per package (a package can be locked twice, split by Python version)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions: dict[str, list[Version]] = {}
    for package in lock["package"]:
        if "version" in package:
            versions.setdefault(canonicalize_name(package["name"]), []).append(Version(package["version"]))
    return versions


@pytest.mark.parametrize("requirement", _runtime_requirements(), ids=str)
def test_runtime_dependency_has_a_floor_and_a_cap(requirement: Requirement) -> None:
    operators = {spec.operator for spec in requirement.specifier}
    assert ">=" in operators, f"{requirement}: no floor"
    assert "<" in operators, f"{requirement}: no cap"


@pytest.mark.parametrize("requirement", _runtime_requirements(), ids=str)
def test_locked_version_is_inside_the_published_range(requirement: Requirement) -> None:
    locked = _locked_versions().get(canonicalize_name(requirement.name))
    assert locked, f"{requirement.name} is not in uv.lock"
    for version in locked:
        assert requirement.specifier.contains(version), f"uv.lock pins {requirement.name} {version}"


def test_the_lock_is_the_one_installed() -> None:
    """The environment the tests run in was installed from uv.lock, not resolved afresh."""
    from importlib.metadata import version

    locked = _locked_versions()
    for requirement in _runtime_requirements():
        installed = Version(version(requirement.name))
        assert installed in locked[canonicalize_name(requirement.name)], requirement.name
