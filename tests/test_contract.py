"""The wire contract: generated code is fresh, and generic gRPC tooling can talk to
the server (health service, server reflection) without our stubs."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from trainctl import codegen


def test_generated_code_is_not_stale():
    stale = codegen.stale_files()
    assert stale == [], f"regenerate with `python -m trainctl.codegen`: {stale}"


def test_health_service_reports_serving(server_only):
    with grpc.insecure_channel(server_only.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "trainctl.v1.Experiments", "trainctl.v1.Workers"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_services(server_only):
    with grpc.insecure_channel(server_only.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"trainctl.v1.Experiments", "trainctl.v1.Workers", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("trainctl.v1.Experiments")
        assert {"Submit", "Watch", "Control", "GetMetrics"} <= {m.name for m in svc.methods}
        # a message type can be resolved from the server alone
        assert "experiment_id" in pool.FindMessageTypeByName("trainctl.v1.ControlRequest").fields_by_name
