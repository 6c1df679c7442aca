"""The request pipeline under concurrent load: every call gets exactly one access-log line and one count.

Calls of several outcomes (OK, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) are made
many at a time, and what the server recorded is counted against the calls made: in process, the access-log
records and the ``posguard_rpc_calls`` / ``posguard_rpc_latency_seconds`` samples; as a
``posguard-server serve`` process, whose access log is written by a background thread, the JSON lines on its
stderr once it has stopped (none may be lost at shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from posguard.v1 import admin_pb2, common_pb2, customer_ids_pb2

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli, RunningServer, ServeProcess

GET = "/posguard.v1.CustomerIds/GetCustomer"
LIST_KEYS = "/posguard.v1.Admin/ListApiKeys"
IN_FLIGHT = 16
ROUNDS = 40  # of each kind of call

Outcome = tuple[str, str]  # (method, code)


def _get_customer(value: str) -> bytes:
    selector = common_pb2.CustomerSelector(customer_id=value)
    return customer_ids_pb2.GetCustomerRequest(customer=selector).SerializeToString()


async def _load(target: str, gateway: str) -> Counter[Outcome]:
    """Many calls of several outcomes, ``IN_FLIGHT`` at a time; the (method, code) of each as answered."""
    bearer = (("authorization", f"Bearer {gateway}"),)
    calls: list[tuple[str, bytes, tuple[tuple[str, str], ...]]] = []
    for i in range(ROUNDS):
        calls += [
            (GET, _get_customer(f"no-such-customer-{i}"), bearer),  # NOT_FOUND
            (GET, _get_customer("x"), (("authorization", "Bearer pgk_000000000000_nope"),)),
            (GET, b"\xff\xff\xff", bearer),  # does not decode: INVALID_ARGUMENT
            (LIST_KEYS, admin_pb2.ListApiKeysRequest().SerializeToString(), bearer),  # a gateway may not
        ]
    made: Counter[Outcome] = Counter()
    async with aio.insecure_channel(target) as channel:
        pending = iter(calls)

        async def caller() -> None:
            for method, request, metadata in pending:
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                try:
                    await call(request, metadata=metadata, timeout=30)
                    code = grpc.StatusCode.OK
                except aio.AioRpcError as error:
                    code = error.code()
                made[(method, code.name)] += 1

        await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return made


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.outcomes: Counter[Outcome] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.outcomes[(fields["method"], fields["code"])] += 1


@contextmanager
def _access_lines() -> Iterator[_Lines]:
    access = logging.getLogger("posguard_server.access")
    lines, level = _Lines(), access.level
    access.setLevel(logging.INFO)
    access.addHandler(lines)
    try:
        yield lines
    finally:
        access.removeHandler(lines)
        access.setLevel(level)


def _samples(server: RunningServer, name: str) -> Counter[Outcome]:
    counts: Counter[Outcome] = Counter()
    for metric in server.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.labels["method"] in (GET, LIST_KEYS):
                counts[(sample.labels["method"], sample.labels["code"])] += int(sample.value)
    return counts


def test_each_call_under_concurrent_load_gets_one_access_line_and_one_count(server: RunningServer) -> None:
    with _access_lines() as lines:
        made = asyncio.run(_load(server.target, server.key("gateway")))
        # A call's line and count are written as it completes, which may be just after its caller has the
        # answer: wait for the last ones, then compare (an extra line or count would still show).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            lines.outcomes.total() < made.total()
            or _samples(server, "posguard_rpc_latency_seconds_count").total() < made.total()
        ):
            time.sleep(0.01)
    assert set(made) == {
        (GET, "NOT_FOUND"),
        (GET, "UNAUTHENTICATED"),
        (GET, "INVALID_ARGUMENT"),
        (LIST_KEYS, "PERMISSION_DENIED"),
    }
    assert sum(made.values()) == 4 * ROUNDS
    assert lines.outcomes == made
    assert _samples(server, "posguard_rpc_calls_total") == made
    assert _samples(server, "posguard_rpc_latency_seconds_count") == made


def test_a_served_process_writes_every_access_line_before_it_exits(
    tmp_path: Path, cli: Cli, serve_process: ServeProcess
) -> None:
    created = cli("--data-dir", str(tmp_path), "keys", "create", "--role", "gateway", "--json")
    process, port = serve_process(tmp_path)
    assert process.stderr is not None
    stderr = process.stderr
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)  # the pipe must not fill
    reader.start()
    made = asyncio.run(_load(f"127.0.0.1:{port}", json.loads(created.stdout)["token"]))
    process.terminate()  # at once: the lines still queued must be written on the way out
    assert process.wait(timeout=30) == 0
    reader.join(timeout=10)
    entries = [json.loads(line) for line in lines]
    written = Counter((e["method"], e["code"]) for e in entries if e["logger"] == "posguard_server.access")
    assert written == made
    assert entries[-1]["message"] == "stopped"


def test_lines_still_queued_when_a_process_ends_are_written() -> None:
    script = (
        "import logging\n"
        "from posguard_server.logs import configure_logging\n"
        "configure_logging(logging.INFO, 'json', background=True)\n"
        "log = logging.getLogger('posguard_server.access')\n"
        "for i in range(20000):\n"
        "    log.info('line %d', i, extra={'fields': {'n': i}})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["n"] for line in done.stderr.splitlines()] == list(range(20000))
