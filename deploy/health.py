"""Liveness of Flower's processes through their own gRPC health service (`--health-server-address`), for
container healthchecks: `fedaug health --address HOST:PORT` exits 0 while the process answers SERVING."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(address: str, timeout: float = 3.0) -> bool:
    """Whether the health service at ``address`` (no TLS: it is bound to the container's loopback) says SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
