"""Names: Hubble's enums and event types, and the telemetry names they map to.

Enum names are read from the generated descriptors (Cilium's own .proto
files), so a new Cilium version brings its new reasons with ``make build``;
numbers this build does not know are kept as ``UNKNOWN_<n>`` and counted.
"""

from __future__ import annotations

from ._proto.flow import flow_pb2 as fpb

# Cilium's monitor message types (Flow.event_type.type): pkg/monitor/api/types.go.
EVENT_DROP = 1
EVENT_DEBUG = 2
EVENT_CAPTURE = 3
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_TRACE_SOCK = 7
EVENT_ACCESS_LOG = 129  # L7 records from Cilium's proxies
EVENT_AGENT = 130

# Flow.policy_match_type, named as `hubble observe` prints them (api.PolicyMatchType).
POLICY_MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all",
                5: "L3-Proto", 6: "Proto-Only"}


def _enum(name: str) -> dict[int, str]:
    return {v.number: v.name for v in fpb.DESCRIPTOR.enum_types_by_name[name].values}


VERDICT = _enum("Verdict")
DROP_REASON = _enum("DropReason")
LOST_SOURCE = _enum("LostEventSource")
FLOW_TYPE = _enum("FlowType")
L7_TYPE = _enum("L7FlowType")
TRAFFIC_DIRECTION = _enum("TrafficDirection")

V_FORWARDED = fpb.FORWARDED
V_DROPPED = fpb.DROPPED
V_TRACED = fpb.TRACED
V_TRANSLATED = fpb.TRANSLATED
INGRESS = fpb.INGRESS
EGRESS = fpb.EGRESS
L7_REQUEST = fpb.REQUEST
L7_RESPONSE = fpb.RESPONSE
FLOW_L7 = fpb.L7

# Telemetry names (DESIGN.md's contract, README "Hubble bridge").
FLOW_PACKETS = "network.flow.packets"
DROPS = "network.packet.drops"
VERDICTS = "network.policy.verdicts"
HTTP_SERVER = "http.server.request.duration"
HTTP_CLIENT = "http.client.request.duration"
DNS_DURATION = "dns.lookup.duration"
EVENTS_RECEIVED = "ebpf_otlp.events.received"
EVENTS_LOST = "ebpf_otlp.events.lost"
MALFORMED = "ebpf_otlp.hubble.malformed"
IGNORED = "ebpf_otlp.hubble.ignored"
RECONNECTS = "ebpf_otlp.hubble.reconnects"
DUPLICATES = "ebpf_otlp.hubble.duplicates"
UNMATCHED = "ebpf_otlp.hubble.unmatched"
PENDING_EVICTED = "ebpf_otlp.hubble.pending.evicted"
SERIES_OVERFLOW = "ebpf_otlp.hubble.series.overflow"
LOGS_SUPPRESSED = "ebpf_otlp.hubble.logs.suppressed"
SPANS_DROPPED = "ebpf_otlp.hubble.spans.dropped"

# name -> (unit, description) for every sum the bridge exports.
SUMS: dict[str, tuple[str, str]] = {
    FLOW_PACKETS: ("{packet}", "Packets Hubble reported in L3/L4 trace events"),
    DROPS: ("{packet}", "Packets Cilium dropped, by Cilium's drop reason"),
    VERDICTS: ("{flow}", "Cilium policy verdicts"),
    EVENTS_RECEIVED: ("{event}", "Events received, by source"),
    EVENTS_LOST: ("{event}", "Events lost before they reached the agent, by source"),
    MALFORMED: ("{event}", "Hubble events that could not be decoded or carried unknown values"),
    IGNORED: ("{event}", "Hubble events of kinds the bridge does not map"),
    RECONNECTS: ("{connection}", "Reconnections to the Hubble server, or reopenings of the file"),
    DUPLICATES: ("{event}", "Events seen again after a reconnection and skipped"),
    UNMATCHED: ("{event}", "L7 responses without their request"),
    PENDING_EVICTED: ("{request}", "L7 requests dropped from the pairing table (full)"),
    SERIES_OVERFLOW: ("{event}", "Events counted under the overflow series (too many series)"),
    LOGS_SUPPRESSED: ("{record}", "Denial log records not sent (rate limit)"),
    SPANS_DROPPED: ("{span}", "L7 spans over the per-interval bound (their durations are kept)"),
}

TRANSPORTS = {"TCP": "tcp", "UDP": "udp", "ICMPv4": "icmp", "ICMPv6": "icmp", "SCTP": "sctp",
              "VRRP": "vrrp", "IGMP": "igmp"}
NET_TYPE = {fpb.IPv4: "ipv4", fpb.IPv6: "ipv6"}

# Workload kinds -> semantic-convention resource attribute names.
WORKLOAD_ATTR = {"Deployment": "k8s.deployment.name", "ReplicaSet": "k8s.replicaset.name",
                 "StatefulSet": "k8s.statefulset.name", "DaemonSet": "k8s.daemonset.name",
                 "Job": "k8s.job.name", "CronJob": "k8s.cronjob.name"}


def enum_name(table: dict[int, str], value: int) -> tuple[str, bool]:
    """(name, known): ``UNKNOWN_<n>`` for a number this build's protos do not define."""
    name = table.get(value)
    return (name, True) if name is not None else (f"UNKNOWN_{value}", False)
