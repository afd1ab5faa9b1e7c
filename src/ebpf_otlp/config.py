"""The agent's configuration: CLI flags over ``OTEL_*`` variables over defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

ALL_SIGNALS = ("flows", "tcp", "dns", "drops")

FLOW_ATTRIBUTES = (
    "source.address", "source.port", "destination.address", "destination.port",
    "network.transport", "network.type", "network.interface.name", "network.io.direction",
)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def parse_headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` as in ``OTEL_EXPORTER_OTLP_HEADERS``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"bad header {part!r}: expected key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass
class AgentConfig:
    ifaces: list[str] = field(default_factory=list)
    signals: tuple[str, ...] = ALL_SIGNALS
    # OTLP
    endpoint: str = field(default_factory=lambda: os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"))
    headers: dict[str, str] = field(default_factory=lambda: parse_headers(
        os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", "")))
    service_name: str = field(default_factory=lambda: os.environ.get(
        "OTEL_SERVICE_NAME", "ebpf-otlp"))
    interval_s: float = field(default_factory=lambda: _env_float(
        "OTEL_METRIC_EXPORT_INTERVAL", 10000.0) / 1000.0)
    export_timeout_s: float = 10.0
    host_name: str = field(default_factory=socket.gethostname)
    # flows
    max_flows: int = 65536
    flow_hook: str = "tc"  # or "xdp" (ingress; egress stays on TC)
    flow_attributes: tuple[str, ...] = FLOW_ATTRIBUTES
    # "direct": OTLP built from the drained arrays; "sdk": SDK counters (slow
    # above a few thousand series, kept for comparison)
    flow_export: str = field(default_factory=lambda: os.environ.get(
        "EBPF_OTLP_FLOWS_EXPORT", "direct").strip().lower())
    # tcp
    tcp_spans: bool = False
    tcp_attributes: tuple[str, ...] = ("server.address", "server.port")
    cgroup_path: str = "/sys/fs/cgroup/unified"
    # dns
    dns_ports: tuple[int, ...] = (53,)
    dns_names: bool = False
    dns_timeout_s: float = 5.0
    dns_head_bytes: int = 256
    dns_max_pending: int = 65536
    # http
    http_head_bytes: int = 256
    http_capture_query: bool = False
    http_capture_headers: tuple[str, ...] = ()
    http_attributes: tuple[str, ...] = ("server.address", "server.port")
    http_route_patterns: tuple[str, ...] = ()
    http_max_conns: int = 16384
    http_idle_s: float = 300.0
    tls_libs: tuple[str, ...] = ()
    tls_scan_interval_s: float = 2.0
    # drops
    drop_location: bool = False
    drop_exclude_not_specified: bool = False
    drop_logs: bool = False
    max_drops: int = 16384
    # kernel BPF run-time statistics (ebpf_otlp.program.run_time); host-wide
    # while on, costing every BPF program on the host two clock reads per run
    bpf_stats: bool = True
    # ring buffers
    ringbuf_bytes: int = 4 << 20
    ringbuf_wakeup_bytes: int = 64 << 10
    poll_interval_ms: int = 50
