"""Access-log lines handed to the writing thread without a record read exactly as lines made from records."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, sys
from posguard_server.logs import AccessLines, configure_logging, stop_logging
configure_logging(logging.INFO, sys.argv[1], background=True)
log = logging.getLogger('posguard_server.access')
template = '%s %s %.2fms caller=%s'
def fields(args):
    return {'method': args[0], 'code': args[1], 'latency_ms': args[2], 'caller': args[3], 'peer': 'p "q"',
            'customer': 'é'}
lines = AccessLines(log, template, fields)
args = ('/m', 'OK', 1.25, 'k-1')
log.info(template, *args, extra={'fields': fields(args)})
print(lines.info(args), file=sys.stdout)
listening = logging.StreamHandler(sys.stdout)
log.addHandler(listening)  # someone listens on the logger itself: records again
print(lines.info(args), file=sys.stdout)
lines.write(args)  # written as a record, to both handlers
log.removeHandler(listening)
stop_logging()
print(lines.info(args), file=sys.stdout)
lines.write(args)  # written directly, as a record
"""


def _run(log_format: str) -> tuple[list[str], list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, log_format], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.splitlines(), done.stderr.splitlines()


def test_a_line_handed_over_reads_as_the_line_of_a_record() -> None:
    answers, written = _run("json")
    assert answers == ["True", "False", "/m OK 1.25ms caller=k-1", "False"]
    assert len(written) == 4
    from_record, handed_over, *written_as_records = (json.loads(line) for line in written)
    assert from_record.pop("time")[:10] == handed_over.pop("time")[:10]
    assert handed_over == from_record
    for line in written_as_records:  # with a handler on the logger, and after the writing thread stopped
        line.pop("time")
        assert line == from_record
    assert list(handed_over) == list(from_record)  # the same keys in the same order
    assert handed_over["message"] == "/m OK 1.25ms caller=k-1"
    assert handed_over["customer"] == "é"
    assert handed_over["peer"] == 'p "q"'


def test_text_output_always_takes_records() -> None:
    answers, written = _run("text")
    assert answers == ["False", "False", "/m OK 1.25ms caller=k-1", "False"]
    assert len(written) == 3
    assert all(line.endswith("posguard_server.access: /m OK 1.25ms caller=k-1") for line in written)


def test_a_json_line_is_written_whatever_its_fields_hold() -> None:
    """orjson writes the lines; what it refuses (an integer beyond 64 bits, a key that is not a string) falls
    back to the standard library's encoder, and what neither knows is written as its ``str``."""
    from posguard_server.logs import JsonFormatter

    formatter = JsonFormatter()

    def line(fields: dict[object, object]) -> dict[str, object]:
        text = formatter.line(0.25, "INFO", "posguard_server.test", 7, "done", fields)  # type: ignore[arg-type]
        assert "\n" not in text
        parsed: dict[str, object] = json.loads(text)
        return parsed

    plain = line({"customer": "é", "peer": 'p "q"\n', "latency_ms": 1.25, "ok": True, "none": None})
    assert plain == {
        "time": "1970-01-01T00:00:00.250+00:00",
        "level": "INFO",
        "logger": "posguard_server.test",
        "pid": 7,
        "message": "done",
        "customer": "é",
        "peer": 'p "q"\n',
        "latency_ms": 1.25,
        "ok": True,
        "none": None,
    }
    assert line({"n": 2**70})["n"] == 2**70
    assert line({1: "a"})["1"] == "a"
    assert str(line({"thing": object()})["thing"]).startswith("<object object at")
