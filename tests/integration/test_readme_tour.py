"""The README's "First steps" and "A quick tour of the API", typed in order against a fresh server.

Every ``sh`` block of those sections runs, as written, in one ``bash -euo pipefail`` process, so the
variables one line sets are there for the next, as in the reader's shell. ``python`` blocks run in the same
process through ``python -``, with the environment the shell has built up by then. The server is the
README's own, ``posguard-server serve`` from the working directory (SQLite in ``./var``), except that it
listens on a free port: ``POSGUARD_TARGET`` sends ``posguard`` there, and the one address a Python block
spells out is replaced by it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TESTED_SECTIONS = ("First steps", "A quick tour of the API")
DEFAULT_TARGET = "127.0.0.1:50051"
SERVING_LINE = re.compile(r"posguard serving on 127\.0\.0\.1:(\d+)")
# Printed by the script's ERR trap; the test maps the script line back to the README.
FAILURE_MARK = re.compile(r"@@readme-tour failed: script line (\d+), exit (\d+)@@")
PYTHON_END = "README_PYTHON_BLOCK_END"
SHELLS = ("sh", "bash", "shell")

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True, slots=True)
class Block:
    """A fenced code block: its language and its lines, with the README line number of each."""

    language: str
    lines: tuple[tuple[int, str], ...]


def readme_blocks(text: str, sections: tuple[str, ...] = TESTED_SECTIONS) -> list[Block]:
    """The shell and ``python`` blocks of the named ``##`` sections, in README order; other blocks
    (sample output, say) are not run."""
    blocks: list[Block] = []
    section = ""
    fence: tuple[str, list[tuple[int, str]]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.startswith("```"):
                language, body = fence
                if section in sections and language in (*SHELLS, "python"):
                    blocks.append(Block("sh" if language in SHELLS else language, tuple(body)))
                fence = None
            else:
                fence[1].append((number, line))
        elif line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif line.startswith("## "):
            section = line[3:].strip()
    return blocks


@dataclass(frozen=True, slots=True)
class Script:
    text: str
    readme_lines: dict[int, tuple[int, str]]  # script line number -> README line number and text


def build_script(blocks: list[Block], target: str) -> Script:
    """One bash script of all blocks; ``target`` replaces the address Python blocks dial."""
    lines = [
        # $LINENO in an ERR trap is the line of the command that failed.
        "trap 'echo \"@@readme-tour failed: script line $LINENO, exit $?@@\" >&2' ERR",
    ]
    readme_lines: dict[int, tuple[int, str]] = {}
    for block in blocks:
        if block.language == "python":
            source = "\n".join(line for _, line in block.lines)
            # The address must be there to be replaced; otherwise the block would dial a server that is
            # not this test's, and fail for the wrong reason.
            assert DEFAULT_TARGET in source, (
                f"README line {block.lines[0][0]}: no {DEFAULT_TARGET} to replace"
            )
            # A failure shows at the heredoc's line; line 1 of its traceback is the line after the fence.
            readme_lines[len(lines) + 1] = (block.lines[0][0] - 1, "```python (the whole block)")
            lines.append(f"python - <<'{PYTHON_END}'")
            lines.extend(line.replace(DEFAULT_TARGET, target) for _, line in block.lines)
            lines.append(PYTHON_END)
        else:
            for number, line in block.lines:
                readme_lines[len(lines) + 1] = (number, line)
                lines.append(line)
    return Script("\n".join(lines) + "\n", readme_lines)


def run_script(script: Script, cwd: Path, env: dict[str, str], timeout: float = 540) -> None:
    """Run the script; on failure, fail the test with the README line, its text and the output before it."""
    # A session of its own, so that a hung command (and whatever it started) can be stopped as a group.
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script.text],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        where = f"README.md (still running after {timeout:.0f} s)"
    else:
        if process.returncode == 0:
            return
        where = "README.md (the script ended early)"
    mark = FAILURE_MARK.search(output)
    if mark:
        failed = script.readme_lines.get(int(mark.group(1)))
        if failed is not None:
            where = f"README.md line {failed[0]}: {failed[1].strip()}"
        output = output[: mark.start()]
    tail = "\n".join(output.rstrip().splitlines()[-40:])
    pytest.fail(f"{where}\nexited {process.returncode}; the output up to there:\n{tail}", pytrace=False)


def _working_copy(tmp_path: Path) -> Path:
    """A directory that looks like the repository to the README's commands: the same files and
    virtualenv, linked, and a ``var`` of its own for the server's data."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git", "var"}:
            (work / entry.name).symlink_to(entry)
    return work


def _environment(**settings: str) -> dict[str, str]:
    """The caller's environment without posguard settings or a virtualenv on PATH: the README has to
    activate it itself, and has to create every key it uses."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("POSGUARD_") and name != "VIRTUAL_ENV"
    }
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in path if p and not (Path(p) / "posguard").exists())
    env.update(settings)
    return env


def _start_server(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = _environment(
        POSGUARD_LISTEN="127.0.0.1:0",
        POSGUARD_METRICS_PORT="0",
        POSGUARD_CONSOLE_LISTEN="127.0.0.1:0",
        POSGUARD_GRACE_PERIOD="1",
    )
    log = (work / "server.log").open("wb")
    process = subprocess.Popen(
        [str(work / ".venv" / "bin" / "posguard-server"), "serve"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = SERVING_LINE.search((work / "server.log").read_text(errors="replace"))
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    pytest.fail(f"the server did not start:\n{(work / 'server.log').read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_first_steps_and_the_tour_run_as_written(tmp_path: Path) -> None:
    blocks = readme_blocks(README.read_text())
    languages = [block.language for block in blocks]
    assert "sh" in languages, "no sh blocks found under the tested README sections"
    assert "python" in languages, "the Python example of First steps is missing"
    work = _working_copy(tmp_path)
    process, port = _start_server(work)
    try:
        target = f"127.0.0.1:{port}"
        run_script(build_script(blocks, target), work, _environment(POSGUARD_TARGET=target))
    finally:
        _stop(process)


def test_a_failing_line_fails_the_run_and_is_named(tmp_path: Path) -> None:
    """The runner itself: a failure anywhere stops the run, and the report names that README line."""
    text = "\n".join(
        [
            "## First steps",
            "```sh",
            "GREETING=hello",
            'echo "$GREETING, reader"',
            "false",
            "echo never",
            "```",
        ]
    )
    blocks = readme_blocks(text)
    assert [line for _, line in blocks[0].lines] == [
        "GREETING=hello",
        'echo "$GREETING, reader"',
        "false",
        "echo never",
    ]
    script = build_script(blocks, "127.0.0.1:1")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_script(script, tmp_path, _environment())
    report = str(failure.value)
    assert report.startswith("README.md line 5: false\n")
    assert "hello, reader" in report
    assert "never" not in report


def test_a_hung_run_is_stopped_and_reported(tmp_path: Path) -> None:
    blocks = readme_blocks("## A quick tour of the API\n```sh\necho started\nsleep 60\n```\n")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_script(build_script(blocks, "127.0.0.1:1"), tmp_path, _environment(), timeout=1)
    assert time.monotonic() - started < 30
    assert str(failure.value).startswith("README.md (still running after 1 s)")
    assert "started" in str(failure.value)
