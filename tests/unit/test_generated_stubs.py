"""The committed stubs match the protos, and the posguard.v1 contract follows its own conventions.

The conventions are read from the protos themselves: protoc writes a descriptor set with source info (the
comments) into a temporary file, and the tests walk it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import descriptor_pb2

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_protos.py"
PROTO_ROOT = ROOT / "proto"
PACKAGE = "posguard.v1"
SERVICES = {"CustomerIds", "Risk", "Admin", "Cases", "Policy"}

# RPCs that change nothing. Every other RPC mutates and its request must carry `string request_id = 1`.
READ_ONLY_RPCS = frozenset(
    {
        "VerifyCustomerId",
        "GetCustomer",
        "ListCustomers",
        "ResolveExternalId",
        "GetCustomerRiskProfile",
        "ListApiKeys",
        "ListModels",
        "ListAuditEvents",
        "VerifyAuditLog",
        "ListCases",
        "GetCase",
        "ListLists",
        "ListEntries",
        "ListRules",
        "BacktestRules",
    }
)

# Field numbers of descriptor.proto, used to build SourceCodeInfo location paths.
_FILE_MESSAGE = 4
_FILE_ENUM = 5
_FILE_SERVICE = 6
_MESSAGE_FIELD = 2
_MESSAGE_NESTED = 3
_MESSAGE_ENUM = 4
_MESSAGE_ONEOF = 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    """The posguard.v1 file descriptors, with comments, compiled from proto/ by protoc."""
    script = _load_script()
    out = tmp_path_factory.mktemp("descriptors") / "posguard.pb"
    protos = script.proto_files()
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={script.grpc_tools_include()}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(PROTO_ROOT / proto) for proto in protos),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    ours = [file for file in descriptor_set.file if file.package == PACKAGE]
    assert len(ours) == len(protos)
    return ours


def _messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.DescriptorProto]]:
    """Every message of a file, nested ones included, as (full name, location path, descriptor)."""

    def walk(
        prefix: str, path: tuple[int, ...], message: descriptor_pb2.DescriptorProto
    ) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.DescriptorProto]]:
        name = f"{prefix}.{message.name}"
        yield name, path, message
        for index, nested in enumerate(message.nested_type):
            yield from walk(name, (*path, _MESSAGE_NESTED, index), nested)

    for index, message in enumerate(file.message_type):
        yield from walk(file.package, (_FILE_MESSAGE, index), message)


def _enums(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.EnumDescriptorProto]]:
    """Every enum of a file, nested ones included, as (full name, location path, descriptor)."""
    for index, enum in enumerate(file.enum_type):
        yield f"{file.package}.{enum.name}", (_FILE_ENUM, index), enum
    for name, path, message in _messages(file):
        for index, enum in enumerate(message.enum_type):
            yield f"{name}.{enum.name}", (*path, _MESSAGE_ENUM, index), enum


def _documented_elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every element that must carry a leading comment, as (description, location path)."""
    for name, path, message in _messages(file):
        if message.options.map_entry:
            continue  # synthesised by protoc for a map field; the map field itself is checked
        yield f"message {name}", path
        for index, field in enumerate(message.field):
            yield f"field {name}.{field.name}", (*path, _MESSAGE_FIELD, index)
        for index, oneof in enumerate(message.oneof_decl):
            members = [
                field
                for field in message.field
                if field.HasField("oneof_index") and field.oneof_index == index
            ]
            if all(field.proto3_optional for field in members):
                continue  # synthetic oneof of a proto3 `optional` field
            yield f"oneof {name}.{oneof.name}", (*path, _MESSAGE_ONEOF, index)
    for name, path, enum in _enums(file):
        yield f"enum {name}", path
        for index, value in enumerate(enum.value):
            yield f"enum value {name}.{value.name}", (*path, _ENUM_VALUE, index)
    for index, service in enumerate(file.service):
        service_name = f"{file.package}.{service.name}"
        yield f"service {service_name}", (_FILE_SERVICE, index)
        for method_index, method in enumerate(service.method):
            yield f"rpc {service_name}.{method.name}", (_FILE_SERVICE, index, _SERVICE_METHOD, method_index)


def _upper_snake(name: str) -> str:
    words = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", words).upper()


def _all_methods(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> list[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    return [(service.name, method) for file in files for service in file.service for method in service.method]


def _messages_by_type_name(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> dict[str, descriptor_pb2.DescriptorProto]:
    return {f".{name}": message for file in files for name, _, message in _messages(file)}


def test_committed_stubs_match_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def test_check_reports_changed_missing_and_stale_files(tmp_path: Path) -> None:
    script = _load_script()
    package = Path("posguard") / "v1"
    shutil.copytree(
        script.OUTPUT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
    )
    assert script.check(tmp_path) == []

    changed = package / "common_pb2.py"
    (tmp_path / changed).write_text((tmp_path / changed).read_text() + "# edited by hand\n")
    missing = package / "risk_pb2_grpc.pyi"
    (tmp_path / missing).unlink()
    stale = package / "retired_pb2.py"
    (tmp_path / stale).write_text("")
    (tmp_path / package / "notes.txt").write_text("not generated, not ours")

    assert script.check(tmp_path) == sorted([changed, missing, stale])


def test_generated_modules_import() -> None:
    for name in ("common", "customer_ids", "risk", "admin"):
        for suffix in ("_pb2", "_pb2_grpc"):
            importlib.import_module(f"{PACKAGE}.{name}{suffix}")


def test_every_element_has_a_leading_comment(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    undocumented = []
    for file in files:
        comments = {
            tuple(location.path): location.leading_comments for location in file.source_code_info.location
        }
        undocumented += [
            f"{file.name}: {what}"
            for what, path in _documented_elements(file)
            if not comments.get(path, "").strip()
        ]
    assert not undocumented, "missing leading comments:\n" + "\n".join(undocumented)


def test_every_file_has_a_header_comment(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    syntax_path = (12,)  # FileDescriptorProto.syntax: the comment above `syntax = ...` heads the file
    for file in files:
        headers = [
            "".join(location.leading_detached_comments) + location.leading_comments
            for location in file.source_code_info.location
            if tuple(location.path) == syntax_path
        ]
        assert headers, f"{file.name} has no syntax statement location"
        assert headers[0].strip(), f"{file.name} has no header comment"


def test_enums_start_with_unspecified_and_prefix_every_value(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    for file in files:
        for name, _, enum in _enums(file):
            prefix = _upper_snake(enum.name)
            first = enum.value[0]
            if first.number != 0 or first.name != f"{prefix}_UNSPECIFIED":
                problems.append(
                    f"{name}: zero value is {first.name} = {first.number}, want {prefix}_UNSPECIFIED"
                )
            problems += [
                f"{name}.{value.name}: not prefixed with {prefix}_"
                for value in enum.value
                if not value.name.startswith(f"{prefix}_")
            ]
    assert not problems, "\n".join(problems)


def test_services_and_request_response_names(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    assert {service.name for file in files for service in file.service} == SERVICES
    problems = []
    for service, method in _all_methods(files):
        for actual, want in (
            (method.input_type, f".{PACKAGE}.{method.name}Request"),
            (method.output_type, f".{PACKAGE}.{method.name}Response"),
        ):
            if actual != want:
                problems.append(f"{service}.{method.name}: uses {actual}, want {want}")
    assert not problems, "\n".join(problems)


def test_read_only_list_names_real_rpcs(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    rpcs = {method.name for _, method in _all_methods(files)}
    assert rpcs >= READ_ONLY_RPCS, f"unknown read-only RPCs: {sorted(READ_ONLY_RPCS - rpcs)}"


def test_every_mutating_request_has_request_id(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    messages = _messages_by_type_name(files)
    problems = []
    mutating = [
        (service, method) for service, method in _all_methods(files) if method.name not in READ_ONLY_RPCS
    ]
    assert any(method.client_streaming for _, method in mutating), "ScoreTransactions should be checked too"
    for service, method in mutating:
        request = messages[method.input_type]
        fields = {field.name: field for field in request.field}
        field = fields.get("request_id")
        if (
            field is None
            or field.number != 1
            or field.type != descriptor_pb2.FieldDescriptorProto.TYPE_STRING
            or field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            or field.HasField("oneof_index")
        ):
            problems.append(f"{service}.{method.name}: {request.name} lacks `string request_id = 1`")
    assert not problems, "\n".join(problems)
