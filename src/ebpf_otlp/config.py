"""The agent's configuration: CLI flags over ``OTEL_*`` variables over defaults,
and every check of a value, so a bad one is one line and exit status 2."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from .otlp.sampling import Sampler, parse_ratio
from .otlp.settings import ExportSettings, SettingsError, env_seconds, parse_headers
from .platform.host import cgroup2_mount

ALL_SIGNALS = ("flows", "tcp", "dns", "drops")

FLOW_ATTRIBUTES = (
    "source.address", "source.port", "destination.address", "destination.port",
    "network.transport", "network.type", "network.interface.name", "network.io.direction",
)

__all__ = ["ALL_SIGNALS", "FLOW_ATTRIBUTES", "AgentConfig", "ConfigError", "parse_headers"]


class ConfigError(ValueError):
    """A bad flag, variable or a missing interface: reported in one line, exit status 2."""


def _interval_from_env() -> float:
    try:
        return env_seconds("OTEL_METRIC_EXPORT_INTERVAL", 10.0)
    except SettingsError as e:
        raise ConfigError(str(e)) from None


@dataclass
class AgentConfig:
    ifaces: list[str] = field(default_factory=list)
    signals: tuple[str, ...] = ALL_SIGNALS
    # OTLP: None = not given explicitly, so the OTEL_* variables decide (see otlp.settings)
    endpoint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    service_name: str = field(default_factory=lambda: os.environ.get(
        "OTEL_SERVICE_NAME", "").strip() or "ebpf-otlp")
    interval_s: float = field(default_factory=_interval_from_env)
    export_timeout_s: float | None = None
    host_name: str = field(default_factory=socket.gethostname)
    # flows
    max_flows: int = 65536
    flow_hook: str = "tc"  # or "xdp" (ingress; egress stays on TC)
    # how TC programs attach: "tcx" links (6.6+), "tc" clsact filters, or "auto"
    tc_mode: str = "auto"
    flow_attributes: tuple[str, ...] = FLOW_ATTRIBUTES
    # tcp
    tcp_spans: bool = False
    tcp_attributes: tuple[str, ...] = ("server.address", "server.port")
    tcp_max_sockets: int = 65536  # connections tracked at once (kernel socket table)
    cgroup_path: str | None = None  # None: the cgroup2 mount found in /proc/self/mountinfo
    # dns
    dns_ports: tuple[int, ...] = (53,)
    dns_names: bool = False
    dns_timeout_s: float = 5.0
    dns_head_bytes: int = 256
    dns_max_pending: int = 65536
    # http
    http_head_bytes: int = 256
    # plaintext capture: socket tracepoints (6.3+) or the syscall exit (signals/http/capture.py)
    http_capture: str = "auto"
    http_capture_query: bool = False
    http_capture_headers: tuple[str, ...] = ()
    http_attributes: tuple[str, ...] = ("server.address", "server.port")
    http_route_patterns: tuple[str, ...] = ()
    http_max_conns: int = 16384
    http_idle_s: float = 300.0
    http_tls: bool = True  # SSL uprobes (each hit costs tens of us here: bench/http_load.py)
    tls_libs: tuple[str, ...] = ()
    tls_relocate: bool = True  # SSL probes on emulated instructions (signals/http/placement.py)
    tls_scan_interval_s: float = 2.0
    # HTTP span sampling: --http-span-sample RATIO (parentbased_traceidratio) over
    # OTEL_TRACES_SAMPLER/OTEL_TRACES_SAMPLER_ARG over the SDK's parentbased_always_on
    http_span_sample: float | None = None
    # drops
    drop_location: bool = False
    drop_exclude_not_specified: bool = False
    drop_logs: bool = False
    max_drops: int = 16384
    # only these drop reasons (names without SKB_DROP_REASON_), filtered in the kernel
    drop_reasons: tuple[str, ...] = ()
    # kernel BPF run-time statistics (ebpf_otlp.program.run_time); host-wide
    # while on, costing every BPF program run on the host ~85 ns here
    # (bench/pktcost.py): off unless asked for
    bpf_stats: bool = False
    # workload attribution (signals/attribution.py): none|namespace|container|process
    attribution: str = "container"
    node_name: str = field(default_factory=lambda: os.environ.get("K8S_NODE_NAME", "").strip()
                           or socket.gethostname())
    # ring buffers
    ringbuf_bytes: int = 4 << 20
    ringbuf_wakeup_bytes: int = 64 << 10
    poll_interval_ms: int = 50
    # operability
    config_file: str | None = None  # --config: re-read on SIGHUP
    health_listen: str | None = None  # HOST:PORT of /healthz, /readyz, /status
    export_queue_bytes: int = 16 << 20  # undelivered requests kept per OTLP signal

    @property
    def cardinality_limit(self) -> int:
        """Series per instrument before the SDK folds into an overflow series."""
        return max(2000, 2 * self.max_flows + 1000)

    def cgroup(self) -> str:
        """The cgroup v2 directory sock_ops attaches to ("" when none is mounted here:
        the TCP signal then mounts one privately for the attach)."""
        return self.cgroup_path or cgroup2_mount() or ""

    def http_sampler(self) -> Sampler:
        """The sampler of HTTP spans: ``--http-span-sample RATIO`` is
        ``parentbased_traceidratio`` with that ratio and wins over the
        ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` variables, which win
        over the SDK's default ``parentbased_always_on`` (otlp/sampling.py)."""
        try:
            if self.http_span_sample is not None:
                return Sampler("parentbased_traceidratio",
                               parse_ratio(self.http_span_sample, "--http-span-sample"))
            return Sampler.from_env(os.environ)
        except SettingsError as e:
            raise ConfigError(str(e)) from None

    def export_settings(self) -> ExportSettings:
        """Where OTLP goes; a bad ``OTEL_*`` value raises :class:`ConfigError`."""
        try:
            return ExportSettings.resolve(
                endpoint=self.endpoint, headers=self.headers, timeout_s=self.export_timeout_s,
                resource={"service.name": self.service_name, "host.name": self.host_name})
        except SettingsError as e:
            raise ConfigError(str(e)) from None
