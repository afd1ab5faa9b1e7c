"""The scripted Hubble stream the bridge's tests serve (gRPC) or write (export
file), and the telemetry it must become, written out by hand from the script
(not computed by the code under test)."""

from __future__ import annotations

import time

from ebpf_otlp.signals.hubble._proto.flow import flow_pb2 as fpb
from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb

NODE = "kind-worker"
# Endpoints: (ip, namespace, pod, workload kind, workload name, identity)
CLIENT = ("10.0.1.10", "shop", "client-7d9f", "Deployment", "client", 1001)
WEB = ("10.0.2.20", "shop", "web-5c4b", "Deployment", "web", 2002)
DB = ("fd00::30", "data", "db-0", "StatefulSet", "db", 3003)
DNS = ("10.0.0.10", "kube-system", "coredns-1", "Deployment", "coredns", 102)
WORLD = ("203.0.113.9", "", "", "", "", 2)
WEB6 = ("fd00::20",) + WEB[1:]
WORLD6 = ("2001:db8::9",) + WORLD[1:]


def _ep(m, e) -> None:
    _, ns, pod, kind, name, ident = e
    m.identity = ident
    if ns:
        m.namespace = ns
    if pod:
        m.pod_name = pod
        m.workloads.add(kind=kind, name=name)


class Script:
    """Builds the stream; ``t`` advances 1 ms per event from ``start_ns``."""

    def __init__(self, start_ns: int | None = None):
        self.t = start_ns if start_ns is not None else time.time_ns() - 60_000_000_000
        self.n = 0
        self.events: list[opb.GetFlowsResponse] = []

    def _flow(self, src, dst, proto: str, sport: int, dport: int, *, event: int,
              verdict: int = fpb.FORWARDED, direction: int = fpb.EGRESS,
              reply: bool | None = None, dt_ns: int = 1_000_000) -> fpb.Flow:
        self.t += dt_ns
        self.n += 1
        r = opb.GetFlowsResponse(node_name=NODE)
        r.time.FromNanoseconds(self.t)
        f = r.flow
        f.time.FromNanoseconds(self.t)
        f.uuid = f"uuid-{self.n:05d}"
        f.node_name = NODE
        f.verdict = verdict
        f.event_type.type = event
        f.traffic_direction = direction
        f.IP.source, f.IP.destination = src[0], dst[0]
        f.IP.ipVersion = fpb.IPv6 if ":" in src[0] else fpb.IPv4
        if proto == "TCP":
            f.l4.TCP.source_port, f.l4.TCP.destination_port = sport, dport
        elif proto == "UDP":
            f.l4.UDP.source_port, f.l4.UDP.destination_port = sport, dport
        elif proto == "ICMPv4":
            f.l4.ICMPv4.type = 8
        _ep(f.source, src)
        _ep(f.destination, dst)
        if reply is not None:
            f.is_reply.value = reply
        f.Type = fpb.L7 if event == 129 else fpb.L3_L4
        self.events.append(r)
        return f

    def lost(self, n: int) -> None:
        self.t += 1_000_000
        r = opb.GetFlowsResponse(node_name=NODE)
        r.time.FromNanoseconds(self.t)
        r.lost_events.source = fpb.HUBBLE_RING_BUFFER
        r.lost_events.num_events_lost = n
        self.events.append(r)


def build(start_ns: int | None = None) -> Script:
    s = Script(start_ns)
    # L3/L4 trace events, both directions (3 requests out, 2 replies back) + IPv6 + ICMP.
    for _ in range(3):
        s._flow(CLIENT, WEB, "TCP", 40000, 80, event=4, direction=fpb.EGRESS, reply=False)
    for _ in range(2):
        s._flow(WEB, CLIENT, "TCP", 80, 40000, event=4, direction=fpb.EGRESS, reply=True)
    s._flow(WEB6, DB, "TCP", 51000, 5432, event=4, direction=fpb.INGRESS, reply=False)
    s._flow(CLIENT, WORLD, "ICMPv4", 0, 0, event=4, direction=fpb.EGRESS, reply=False)
    # Drops with Cilium's reasons (one unknown to these protos).
    for reason in (fpb.POLICY_DENIED, fpb.POLICY_DENIED, fpb.CT_MAP_INSERTION_FAILED, 999):
        f = s._flow(WORLD, WEB, "TCP", 33000, 22, event=1, verdict=fpb.DROPPED,
                    direction=fpb.INGRESS)
        f.drop_reason_desc = reason
        f.drop_reason = reason
    # Policy verdicts: allowed ingress x2, allowed egress, denied egress x2 (one log),
    # denied ingress.
    for _ in range(2):
        f = s._flow(CLIENT, WEB, "TCP", 40001, 80, event=5, direction=fpb.INGRESS)
        f.policy_match_type = 2
    f = s._flow(CLIENT, WEB, "TCP", 40002, 80, event=5, direction=fpb.EGRESS)
    f.policy_match_type = 2
    for _ in range(2):
        f = s._flow(CLIENT, WORLD, "TCP", 40003, 443, event=5, verdict=fpb.DROPPED,
                    direction=fpb.EGRESS)
        f.policy_match_type = 0
        f.egress_denied_by.add(name="deny-world", namespace="shop", kind="CiliumNetworkPolicy")
    f = s._flow(WORLD6, DB, "TCP", 33001, 5432, event=5, verdict=fpb.DROPPED,
                direction=fpb.INGRESS)
    f.policy_match_type = 0
    s.lost(7)
    # HTTP through the proxy: GET 200 seen at the server side (ingress), POST 503 at the
    # client side.
    f = s._flow(CLIENT, WEB, "TCP", 40010, 80, event=129, direction=fpb.INGRESS)
    f.l7.type = fpb.REQUEST
    f.l7.http.method, f.l7.http.url, f.l7.http.protocol = ("GET",
                                                           "http://web/api/items/42?x=1",
                                                           "HTTP/1.1")
    f = s._flow(WEB, CLIENT, "TCP", 80, 40010, event=129, direction=fpb.INGRESS, reply=True,
                dt_ns=12_000_000)
    f.l7.type = fpb.RESPONSE
    f.l7.latency_ns = 12_000_000
    f.l7.http.code, f.l7.http.method, f.l7.http.url, f.l7.http.protocol = (
        200, "GET", "http://web/api/items/42?x=1", "HTTP/1.1")
    f = s._flow(CLIENT, WEB, "TCP", 40011, 80, event=129, direction=fpb.EGRESS)
    f.l7.type = fpb.REQUEST
    f.l7.http.method, f.l7.http.url, f.l7.http.protocol = ("POST", "http://web/api/orders",
                                                           "HTTP/1.1")
    f = s._flow(WEB, CLIENT, "TCP", 80, 40011, event=129, direction=fpb.EGRESS, reply=True,
                dt_ns=30_000_000)
    f.l7.type = fpb.RESPONSE
    f.l7.latency_ns = 30_000_000
    f.l7.http.code, f.l7.http.method, f.l7.http.url, f.l7.http.protocol = (
        503, "POST", "http://web/api/orders", "HTTP/1.1")
    # DNS through Cilium's DNS proxy: an answer (NOERROR) and a NXDOMAIN.
    for name, qtype, rcode, ips, dt in (("example.com.", "A", 0, ["93.184.216.34"], 2_000_000),
                                        ("missing.example.", "AAAA", 3, [], 3_000_000)):
        f = s._flow(CLIENT, DNS, "UDP", 45000, 53, event=129, direction=fpb.EGRESS)
        f.l7.type = fpb.REQUEST
        f.l7.dns.query = name
        f.l7.dns.qtypes.append(qtype)
        f = s._flow(DNS, CLIENT, "UDP", 53, 45000, event=129, direction=fpb.EGRESS, reply=True,
                    dt_ns=dt)
        f.l7.type = fpb.RESPONSE
        f.l7.latency_ns = dt
        f.l7.dns.query = name
        f.l7.dns.qtypes.append(qtype)
        f.l7.dns.rcode = rcode
        f.l7.dns.ips.extend(ips)
        f.l7.dns.rrtypes.extend(["A"] * len(ips))
    return s


_SHOP_CLIENT = (("k8s.namespace.name", "shop"), ("k8s.pod.name", "client-7d9f"),
                ("k8s.deployment.name", "client"))
_SHOP_WEB = (("k8s.namespace.name", "shop"), ("k8s.pod.name", "web-5c4b"),
             ("k8s.deployment.name", "web"))
_DATA_DB = (("k8s.namespace.name", "data"), ("k8s.pod.name", "db-0"),
            ("k8s.statefulset.name", "db"))
_NODE = (("k8s.node.name", NODE),)


def _tcp(src, sp, dst, dp, direction, local, ntype="ipv4", transport="tcp") -> dict:
    d = {"source.address": src, "destination.address": dst, "network.transport": transport,
         "network.type": ntype, "network.io.direction": direction, **dict(local), **dict(_NODE)}
    if sp is not None:
        d["source.port"] = sp
    if dp is not None:
        d["destination.port"] = dp
    return d


# metric name -> list of (attributes, total); every point the bridge must export for the script.
EXPECTED_SUMS: dict[str, list[tuple[dict, int]]] = {
    "network.flow.packets": [
        (_tcp("10.0.1.10", 40000, "10.0.2.20", 80, "transmit", _SHOP_CLIENT), 3),
        (_tcp("10.0.2.20", 80, "10.0.1.10", 40000, "receive", _SHOP_CLIENT), 2),
        (_tcp("fd00::20", 51000, "fd00::30", 5432, "receive", _DATA_DB, ntype="ipv6"), 1),
        (_tcp("10.0.1.10", None, "203.0.113.9", None, "transmit", _SHOP_CLIENT,
              transport="icmp"), 1),
    ],
    "network.packet.drops": [
        ({**_tcp("203.0.113.9", 33000, "10.0.2.20", 22, "receive", _SHOP_WEB),
          "network.drop.reason": "POLICY_DENIED"}, 2),
        ({**_tcp("203.0.113.9", 33000, "10.0.2.20", 22, "receive", _SHOP_WEB),
          "network.drop.reason": "CT_MAP_INSERTION_FAILED"}, 1),
        ({**_tcp("203.0.113.9", 33000, "10.0.2.20", 22, "receive", _SHOP_WEB),
          "network.drop.reason": "UNKNOWN_999"}, 1),
    ],
    "network.policy.verdicts": [
        ({"network.policy.verdict": "forwarded", "network.io.direction": "receive",
          "network.policy.match_type": "L3-L4", "source.cilium.identity": 1001,
          "source.k8s.namespace.name": "shop", "source.k8s.deployment.name": "client",
          "destination.cilium.identity": 2002, "destination.k8s.namespace.name": "shop",
          "destination.k8s.deployment.name": "web", "network.transport": "tcp",
          "destination.port": 80, "k8s.node.name": NODE}, 2),
        ({"network.policy.verdict": "forwarded", "network.io.direction": "transmit",
          "network.policy.match_type": "L3-L4", "source.cilium.identity": 1001,
          "source.k8s.namespace.name": "shop", "source.k8s.deployment.name": "client",
          "destination.cilium.identity": 2002, "destination.k8s.namespace.name": "shop",
          "destination.k8s.deployment.name": "web", "network.transport": "tcp",
          "destination.port": 80, "k8s.node.name": NODE}, 1),
        ({"network.policy.verdict": "dropped", "network.io.direction": "transmit",
          "network.policy.match_type": "none", "source.cilium.identity": 1001,
          "source.k8s.namespace.name": "shop", "source.k8s.deployment.name": "client",
          "destination.cilium.identity": 2, "network.transport": "tcp",
          "destination.port": 443, "k8s.node.name": NODE}, 2),
        ({"network.policy.verdict": "dropped", "network.io.direction": "receive",
          "network.policy.match_type": "none", "source.cilium.identity": 2,
          "destination.cilium.identity": 3003, "destination.k8s.namespace.name": "data",
          "destination.k8s.statefulset.name": "db", "network.transport": "tcp",
          "destination.port": 5432, "k8s.node.name": NODE}, 1),
    ],
}

# (name, kind, start offset from the request, duration ns, attributes, status error type)
EXPECTED_SPANS = [
    ("GET /api/items/*", "SERVER", 12_000_000,
     {"http.request.method": "GET", "url.path": "/api/items/42", "url.scheme": "http",
      "http.response.status_code": 200, "server.address": "10.0.2.20", "server.port": 80,
      "client.address": "10.0.1.10", "network.protocol.version": "1.1"}, None),
    ("POST /api/orders", "CLIENT", 30_000_000,
     {"http.request.method": "POST", "url.path": "/api/orders", "url.scheme": "http",
      "http.response.status_code": 503, "server.address": "10.0.2.20", "server.port": 80,
      "client.address": "10.0.1.10", "network.protocol.version": "1.1",
      "error.type": "503"}, "503"),
    ("DNS A", "CLIENT", 2_000_000,
     {"dns.question.name": "example.com", "dns.question.type": "A",
      "dns.response_code": "NOERROR", "dns.answer.count": 1, "server.address": "10.0.0.10",
      "server.port": 53, "network.transport": "udp", "network.type": "ipv4",
      "client.address": "10.0.1.10", "client.port": 45000}, None),
    ("DNS AAAA", "CLIENT", 3_000_000,
     {"dns.question.name": "missing.example", "dns.question.type": "AAAA",
      "dns.response_code": "NXDOMAIN", "dns.answer.count": 0, "server.address": "10.0.0.10",
      "server.port": 53, "network.transport": "udp", "network.type": "ipv4",
      "client.address": "10.0.1.10", "client.port": 45000}, None),
]

# histogram name -> list of (attributes, count, sum seconds)
EXPECTED_HISTOGRAMS = {
    "http.server.request.duration": [
        ({"http.request.method": "GET", "http.response.status_code": 200,
          "http.route": "/api/items/*", "url.scheme": "http", "server.address": "10.0.2.20",
          "server.port": 80}, 1, 0.012)],
    "http.client.request.duration": [
        ({"http.request.method": "POST", "http.response.status_code": 503,
          "http.route": "/api/orders", "url.scheme": "http", "server.address": "10.0.2.20",
          "server.port": 80, "error.type": "503"}, 1, 0.030)],
    "dns.lookup.duration": [
        ({"dns.question.type": "A", "server.address": "10.0.0.10", "server.port": 53,
          "network.transport": "udp", "dns.response_code": "NOERROR"}, 1, 0.002),
        ({"dns.question.type": "AAAA", "server.address": "10.0.0.10", "server.port": 53,
          "network.transport": "udp", "dns.response_code": "NXDOMAIN"}, 1, 0.003)],
}

EXPECTED_LOST = 7  # ebpf_otlp.events.lost{source=hubble}
# Denial logs: one per (source, destination, port): two distinct tuples were denied.
EXPECTED_DENIAL_LOGS = [
    ("10.0.1.10", "203.0.113.9", 443, "shop/deny-world"),
    ("2001:db8::9", "fd00::30", 5432, None),
]


def sums_by_name(out) -> dict[str, dict]:
    by: dict[str, dict] = {}
    for (name, attrs), n in out.sums.items():
        by.setdefault(name, {})[attrs] = n
    return by


def _rows(points) -> list:
    return sorted((sorted(dict(a).items(), key=str), n) for a, n in points)


def assert_mapped(out) -> None:
    """A mapper drain (``Interval``) holds exactly what the script must become."""
    by = sums_by_name(out)
    for name, rows in EXPECTED_SUMS.items():
        assert _rows(by.get(name, {}).items()) == _rows((tuple(a.items()), n)
                                                        for a, n in rows), name
    assert by["ebpf_otlp.events.lost"] == {
        (("source", "hubble"), ("hubble.lost.source", "hubble_ring_buffer")): EXPECTED_LOST}
    kinds = {2: "SERVER", 3: "CLIENT"}
    spans = sorted((it[2], kinds[k], it[1] - it[0], dict(it[3]), it[4]) for k, it in out.spans)
    want = sorted((n, k, d, {a: v for a, v in attrs.items() if a != "error.type"}, e)
                  for n, k, d, attrs, e in EXPECTED_SPANS)
    assert spans == want
    hist: dict[str, list] = {}
    for name, attrs, v in out.histograms:
        hist.setdefault(name, []).append((sorted(dict(attrs).items(), key=str), round(v, 9)))
    assert set(hist) == set(EXPECTED_HISTOGRAMS)
    for name, rows in EXPECTED_HISTOGRAMS.items():
        assert sorted(hist[name], key=str) == sorted(
            ((sorted(a.items(), key=str), s) for a, _, s in rows), key=str), name
    logs = [tuple(dict(r.attributes).get(k) for k in ("source.address", "destination.address",
                                                      "destination.port", "network.policy.names"))
            for r in out.logs]
    assert logs == EXPECTED_DENIAL_LOGS
