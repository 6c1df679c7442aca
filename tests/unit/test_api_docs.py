"""docs/api.md is what the protos' comments produce now, documents every element, and its check can fail."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from types import ModuleType

    from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_api_docs.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def descriptors(script: ModuleType) -> descriptor_pb2.FileDescriptorSet:
    return script.compile_protos()


def test_committed_api_docs_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def test_check_fails_on_a_stale_or_missing_file_and_passes_once_regenerated(
    script: ModuleType, tmp_path: Path
) -> None:
    target = tmp_path / "api.md"
    assert script.main(["--check", "--output", str(target)]) == 1  # missing

    assert script.main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert script.main(["--check", "--output", str(target)]) == 0

    lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
    edited = next(i for i, line in enumerate(lines) if line.startswith("| `"))
    lines[edited] = lines[edited].replace("| `", "| `edited_", 1)
    target.write_text("".join(lines), encoding="utf-8")
    assert script.main(["--check", "--output", str(target)]) == 1


def test_every_service_rpc_message_and_enum_is_documented(
    script: ModuleType, descriptors: descriptor_pb2.FileDescriptorSet
) -> None:
    text = script.render(descriptors)
    ours = [file for file in descriptors.file if file.package == "posguard.v1"]
    assert len(ours) == len(list((ROOT / "proto" / "posguard" / "v1").glob("*.proto")))
    for file in ours:
        assert f"## `{file.name}`" in text
        for service in file.service:
            assert f"### service `{service.name}`" in text
            for method in service.method:
                assert f"#### rpc `{method.name}`" in text
                assert f"`/posguard.v1.{service.name}/{method.name}`" in text
        for message in file.message_type:
            assert f"### message `{message.name}`" in text
            for field in message.field:
                assert f"| `{field.name}` | {field.number} |" in text, f"{message.name}.{field.name}"
        for enum in file.enum_type:
            assert f"### enum `{enum.name}`" in text
            for value in enum.value:
                assert f"| `{value.name}` | {value.number} |" in text


def test_rpc_entries_show_shape_types_and_roles(
    script: ModuleType, descriptors: descriptor_pb2.FileDescriptorSet
) -> None:
    text = script.render(descriptors)
    stream = (
        "| [`ScoreTransactions`](#rpc-scoretransactions) | stream "
        "[`ScoreTransactionsRequest`](#message-scoretransactionsrequest) → stream "
        "[`ScoreTransactionsResponse`](#message-scoretransactionsresponse) | GATEWAY |"
    )
    assert stream in text
    assert "`/posguard.v1.Risk/ScoreTransactions`, bidirectional stream:" in text
    assert "| [`ListModels`](#rpc-listmodels) |" in text
    assert "| `metrics` | 9 | map&lt;`string`, `double`&gt; |  |" in text
    assert "| `created_at` | 4 | `google.protobuf.Timestamp` |  |" in text


def test_every_link_points_at_a_heading(script: ModuleType) -> None:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    headings = {script.slug(h.strip()) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links
    assert links <= headings, links - headings


def test_comments_become_paragraphs_with_labels_and_escaped_markup(script: ModuleType) -> None:
    comment = (
        "Revokes a key sent as `Bearer <token>`, for <key>.\n"
        "Roles: ADMIN.\n"
        "Revoking it again changes nothing.\n"
        "Errors: NOT_FOUND (no such\n"
        "key)."
    )
    assert script.paragraphs(comment) == [
        "Revokes a key sent as `Bearer <token>`, for &lt;key&gt;.",
        "**Roles:** ADMIN.",
        "Revoking it again changes nothing.",
        "**Errors:** NOT_FOUND (no such\nkey).",
    ]
    assert script.roles(comment) == "ADMIN"
    assert script._cell("a | b\n\nc") == "a \\| b c"
