"""The Node.js client (clients/node) against a real server: its example end to end, over plaintext and mutual
TLS, a wrong key, and its type declarations.

The tests need node and the client's installed packages (`npm ci --prefix clients/node`, which
scripts/test.sh runs). Without them they skip on a developer's machine but fail in CI, where a skip would
hide that the client was never exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import posguard
from posguard.v1 import common_pb2

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import Pki, RunningServer

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, once the client's packages are installed."""
    executable = shutil.which("node")
    missing = []
    if executable is None:
        missing.append("node is not on PATH")
    if not (CLIENT_DIR / "node_modules").is_dir():
        missing.append("clients/node/node_modules is missing (run `npm ci --prefix clients/node`)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail("the Node.js client must be tested in CI: " + "; ".join(missing))
        pytest.skip("; ".join(missing))
    assert executable is not None
    return executable


def run_example(node: str, target: str, api_key: str, **env: str) -> subprocess.CompletedProcess[str]:
    # Only the variables given here: a POSGUARD_* setting of the caller's shell must not change the run.
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSGUARD_")}
    return subprocess.run(
        [node, "example.js"],
        cwd=CLIENT_DIR,
        env={**base, "POSGUARD_TARGET": target, "POSGUARD_API_KEY": api_key, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def example_output(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    output: dict[str, Any] = json.loads(result.stdout)
    return output


def assert_example_results(output: dict[str, Any]) -> None:
    assert output["health"] == "SERVING"

    issued = output["issued"]
    assert issued["number"].isdigit()
    assert len(issued["number"]) == 20
    assert issued["display"].replace(" ", "") == issued["number"]
    assert issued["status"] == "NUMBER_STATUS_ACTIVE"

    verified = output["verified"]
    assert verified["valid"] is True
    assert verified["reason"] == "VERIFICATION_REASON_OK"
    assert verified["status"] == "NUMBER_STATUS_ACTIVE"
    assert verified["customerId"] == issued["customerId"]
    assert verified["normalizedNumber"] == issued["number"]

    scored = output["scored"]
    assert scored["transactionId"].startswith("node-example-")
    assert scored["customerId"] == issued["customerId"]
    assert 0.0 <= scored["riskScore"] <= 1.0
    assert scored["decision"] in ("DECISION_APPROVE", "DECISION_REVIEW", "DECISION_DECLINE")
    # No model is trained on a fresh server, so the cold-start policy may answer (scope NONE); what must
    # not happen is a decline by an identity rule, since the number is new and active.
    assert scored["model"]["scope"] in ("MODEL_SCOPE_CUSTOMER", "MODEL_SCOPE_GLOBAL", "MODEL_SCOPE_NONE")
    assert not [r for r in scored["reasons"] if r["code"].startswith(("NUMBER_", "DYNAMIC_CODE_"))]
    assert scored["model"]["historySize"] == "0"  # an int64, sent as a string by the client
    assert scored["replayed"] is False

    # The refusal came through with its google.rpc.Status details: reason and the field at fault.
    error = output["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["reason"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["fieldViolations"]] == ["transaction.amount.currency"]
    assert all(v["description"] for v in error["fieldViolations"])


def test_example_issues_verifies_and_scores(node: str, server: RunningServer) -> None:
    output = example_output(run_example(node, server.target, server.key("gateway")))
    assert_example_results(output)

    # What the Node client did is really on the server: the Python client sees the same customer, with the
    # one scored transaction in its profile (the refused one left nothing behind).
    with posguard.Client(server.target, api_key=server.key("gateway")) as client:
        answer = client.verify_customer_id(number=output["issued"]["number"])
        assert answer.valid
        assert answer.customer_id == output["issued"]["customerId"]
        profile = client.get_customer_risk_profile(
            customer=common_pb2.CustomerSelector(customer_id=output["issued"]["customerId"])
        )
        assert profile.transaction_count == 1


def test_example_reports_a_wrong_key_with_its_code(node: str, server: RunningServer) -> None:
    server.key("gateway")  # a real key exists; this one only looks like one
    result = run_example(node, server.target, "pgk_000000000000_notarealsecret")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "UNAUTHENTICATED" in result.stderr


def test_example_over_mutual_tls(node: str, server_factory: Callable[..., RunningServer], pki: Pki) -> None:
    running = server_factory(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    )
    key = running.key("gateway")
    tls = {"POSGUARD_CA_FILE": str(pki.ca), "POSGUARD_SERVER_NAME": "localhost"}
    client_cert = {"POSGUARD_CERT_FILE": str(pki.client_cert), "POSGUARD_KEY_FILE": str(pki.client_key)}
    assert_example_results(example_output(run_example(node, running.target, key, **tls, **client_cert)))

    # Without its client certificate the same client is turned away at the handshake.
    refused = run_example(node, running.target, key, **tls)
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr


def test_type_declarations_check(node: str) -> None:
    """index.d.ts is valid TypeScript and example.js uses the client as its types say."""
    result = subprocess.run(
        [node, str(CLIENT_DIR / "node_modules" / "typescript" / "bin" / "tsc"), "-p", str(CLIENT_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
