"""Regenerate the posguard.v1 Python stubs from the protos, or check that the committed stubs are current.

    python scripts/gen_protos.py           # regenerate clients/posguard/v1/
    python scripts/gen_protos.py --check   # regenerate into a temporary directory; exit 1 listing drift

Every ``proto/<path>.proto`` becomes ``clients/<path>_pb2.py`` (plus ``_pb2.pyi``, ``_pb2_grpc.py`` and
``_pb2_grpc.pyi``), importable as ``<path with dots>_pb2``: the proto path is the import path, so the imports
protoc writes work untouched. Generation always happens in a temporary directory first; the result is then
copied over the committed files (or compared with them), and generated files whose proto is gone are removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_client_methods import render as render_client_methods

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT_ROOT = ROOT / "clients"
PACKAGE_DIR = Path("posguard") / "v1"
INIT_TEXT = '"""Generated code; regenerate with scripts/gen_protos.py."""\n'
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
CLIENT_METHODS = "rpc_methods.py"
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


class GenerationError(RuntimeError):
    """protoc or one of its plugins failed, or a tool it needs is missing."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """All ``.proto`` files of the package, sorted, relative to ``proto_root``."""
    return sorted(path.relative_to(proto_root) for path in (proto_root / PACKAGE_DIR).rglob("*.proto"))


def grpc_tools_include() -> Path:
    """The well-known protos bundled with grpcio-tools (``google/protobuf/timestamp.proto`` and friends)."""
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise GenerationError("grpcio-tools is not installed; install the dev extra")
    include = Path(spec.origin).parent / "_proto"
    if not (include / "google" / "protobuf" / "timestamp.proto").is_file():
        raise GenerationError(f"grpcio-tools has no bundled well-known protos under {include}")
    return include


def plugin_path(name: str) -> Path:
    """A protoc plugin installed in the running interpreter's environment (mypy-protobuf's, here)."""
    bin_dir = Path(sys.executable).parent
    for candidate in (bin_dir / name, bin_dir / f"{name}.exe"):
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found next to {sys.executable} or on PATH; install mypy-protobuf")
    return Path(found)


def protoc_command(out_root: Path, protos: Sequence[Path], *, stubs: bool = True) -> list[str]:
    """The protoc invocation that writes every stub of ``protos`` under ``out_root`` (or none: ``stubs``)."""
    base = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={grpc_tools_include()}",
    ]
    if not stubs:
        return [*base, *(str(PROTO_ROOT / proto) for proto in protos)]
    mypy_plugin, mypy_grpc_plugin = (plugin_path(name) for name in PLUGINS)
    return [
        *base,
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(PROTO_ROOT / proto) for proto in protos),
    ]


def is_generated(relative: Path) -> bool:
    """Whether a file under the package directory is owned by this script."""
    return relative.name in ("__init__.py", CLIENT_METHODS) or relative.name.endswith(GENERATED_SUFFIXES)


def generated_files(out_root: Path) -> dict[Path, bytes]:
    """The files this script owns under ``out_root``, by path relative to it, with their content."""
    package = out_root / PACKAGE_DIR
    if not package.is_dir():
        return {}
    files: dict[Path, bytes] = {}
    for path in sorted(package.rglob("*")):
        relative = path.relative_to(out_root)
        if path.is_file() and "__pycache__" not in relative.parts and is_generated(relative):
            files[relative] = path.read_bytes()
    return files


def generate(out_root: Path) -> dict[Path, bytes]:
    """Run protoc into ``out_root`` (normally an empty temporary directory) and return what it produced."""
    protos = proto_files()
    if not protos:
        raise GenerationError(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    result = subprocess.run(protoc_command(out_root, protos), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed (exit {result.returncode}):\n{result.stderr.strip()}")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_root / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT, encoding="utf-8")
    descriptor_set = out_root / "descriptor_set.pb"
    described = subprocess.run(
        [
            *protoc_command(out_root, protos, stubs=False),
            "--include_source_info",
            f"--descriptor_set_out={descriptor_set}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if described.returncode != 0:
        raise GenerationError(f"protoc failed (exit {described.returncode}):\n{described.stderr.strip()}")
    methods = render_client_methods(descriptor_set.read_bytes())
    (out_root / PACKAGE_DIR / CLIENT_METHODS).write_text(methods, encoding="utf-8")
    return generated_files(out_root)


def drift(expected: dict[Path, bytes], actual: dict[Path, bytes]) -> list[Path]:
    """Paths that are missing, stale or different in ``actual`` compared with ``expected``, sorted."""
    return sorted(path for path in expected.keys() | actual.keys() if expected.get(path) != actual.get(path))


def fresh_stubs() -> dict[Path, bytes]:
    """The stubs the protos produce now, generated in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="posguard-protos-") as tmp:
        return generate(Path(tmp))


def check(out_root: Path = OUTPUT_ROOT) -> list[Path]:
    """The committed files under ``out_root`` that differ from what the protos produce (empty = current)."""
    return drift(fresh_stubs(), generated_files(out_root))


def write(out_root: Path = OUTPUT_ROOT) -> list[Path]:
    """Bring the committed stubs under ``out_root`` up to date; return the paths written or removed."""
    expected = fresh_stubs()
    changed = drift(expected, generated_files(out_root))
    for relative in changed:
        target = out_root / relative
        content = expected.get(relative)
        if content is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 listing the committed stubs that differ from what the protos produce",
    )
    args = parser.parse_args(argv)
    try:
        changed = check() if args.check else write()
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = [str((OUTPUT_ROOT / path).relative_to(ROOT).as_posix()) for path in changed]
    if args.check:
        if shown:
            print("generated stubs are out of date; run `python scripts/gen_protos.py`:", file=sys.stderr)
            for name in shown:
                print(f"  {name}", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    for name in shown:
        print(f"updated {name}")
    print(f"{len(shown)} file(s) changed" if shown else "generated stubs already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
