"""Liveness of Flower's processes through their own gRPC health service (`--health-server-address`), for
container healthchecks: `fedaug health --config DAEMON.toml` (or `--address HOST:PORT`) exits 0 while the process
answers SERVING. A daemon starts the health service only where its config sets ``health_address`` ([aggregator] or
[merchant])."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedaug.common.errors import ConfigError, read_toml

ROLES = ("aggregator", "merchant")


def serving(address: str, timeout: float = 3.0) -> bool:
    """Whether the health service at ``address`` (no TLS: it is bound to the container's loopback) says SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def configured_address(config: Path) -> str:
    """The ``health_address`` a daemon's config gives Flower: its [aggregator] or [merchant] table's.

    The TOML is read here rather than validated as the daemon validates it: a healthcheck runs every few seconds and
    needs this one key, not the recipe (whose module loads torch)."""
    raw = read_toml(config)
    roles = [role for role in ROLES if isinstance(raw.get(role), dict)]
    if len(roles) != 1:
        raise ConfigError(f"{config}: not a daemon's config (expected one [aggregator] or [merchant] table)")
    address = raw[roles[0]].get("health_address")
    if not address:
        example = "127.0.0.1:9098" if roles[0] == "aggregator" else "127.0.0.1:9099"
        raise ConfigError(f"{config}: key {roles[0]}.health_address is not set, so the daemon starts no health "
                          f'service (set e.g. health_address = "{example}" and restart it)')
    if not isinstance(address, str):
        raise ConfigError(f"{config}: key {roles[0]}.health_address: expected host:port text")
    return address
