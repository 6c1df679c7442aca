"""Registered methods are served from the pipeline's own table, never from gRPC's table of registered methods.

gRPC's asyncio server waits, on every call, on one pending request per method in its table, so each method
there costs every call of every method (``PipelinedServer``). The generated ``add_*_to_server`` functions
register every service in both tables; here they do so on a real server on loopback, and calls are counted
by the pipeline's metrics to show the composed handlers answered them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from posguard.v1 import risk_pb2, risk_pb2_grpc
from posguard_server.api.auth import NoAuthenticator
from posguard_server.api.metrics import Metrics
from posguard_server.app import build_pipeline
from posguard_server.config import Settings

PROFILE = "/posguard.v1.Risk/GetCustomerRiskProfile"


class _Risk(risk_pb2_grpc.RiskServicer):
    async def GetCustomerRiskProfile(
        self, request: risk_pb2.GetCustomerRiskProfileRequest, context: Any
    ) -> risk_pb2.GetCustomerRiskProfileResponse:
        return risk_pb2.GetCustomerRiskProfileResponse()


def _calls(metrics: Metrics, method: str) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "posguard_rpc_calls_total" and sample.labels["method"] == method
    )


def test_generated_registration_fills_the_pipelines_table_and_the_pipeline_answers() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        inner = aio.server()
        into_grpcs_table: list[str] = []
        inner.add_registered_method_handlers = lambda name, handlers: into_grpcs_table.append(name)  # type: ignore[attr-defined]
        server = build_pipeline(Settings(), NoAuthenticator(), metrics).serve(inner)
        # The stubs call every method abstract; the others answer UNIMPLEMENTED, as generated.
        risk_pb2_grpc.add_RiskServicer_to_server(_Risk(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                profile = channel.unary_unary(PROFILE, request_serializer=None, response_deserializer=None)
                for _ in range(3):
                    await profile(risk_pb2.GetCustomerRiskProfileRequest().SerializeToString(), timeout=10)
                unknown = channel.unary_unary(
                    "/posguard.v1.Risk/NoSuchMethod", request_serializer=None, response_deserializer=None
                )
                with pytest.raises(aio.AioRpcError) as caught:
                    await unknown(b"", timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)
        assert into_grpcs_table == []
        assert _calls(metrics, PROFILE) == 3

    asyncio.run(scenario())
