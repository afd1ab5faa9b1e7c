"""Hubble events -> this project's telemetry contract, with no I/O.

``Mapper.feed`` takes decoded ``GetFlowsResponse`` / ``ExportEvent``
messages (the gRPC follower and the export-file follower both produce them)
and aggregates them; ``Mapper.drain`` hands back one interval: counter
deltas keyed by (metric name, attributes), histogram values, span tuples and
log records. Only the otlp layer encodes and sends.

Mapping (README "Hubble bridge" has the table and the reasons):

- trace events (L3/L4)      -> ``network.flow.packets`` (one per event; Hubble has no byte counts)
- drop events               -> ``network.packet.drops`` with Cilium's reason name
- policy verdict events     -> ``network.policy.verdicts`` + a log record per first denial
- L7 HTTP / DNS records     -> the HTTP and DNS signals' spans and duration histograms
- ``LostEvent``             -> ``ebpf_otlp.events.lost{source=hubble}``

Bad input never raises: unknown enum numbers, events without the fields a
mapping needs and events of kinds not mapped are counted
(``ebpf_otlp.hubble.malformed`` / ``.ignored``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import names as N
from .attrs import ATTRS, Attrs, verdict_attrs
from .l7 import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, PendingTable, Request, dns_span, http_span

# (start_ns, end_ns, name, attribute pairs, error type or None): the batch span path's tuple
SpanItem = tuple

OVERFLOW: Attrs = (("otel.metric.overflow", True),)
HUBBLE: Attrs = (("source", "hubble"),)
MAX_SKEW_NS = 60_000_000_000  # node clocks may differ; a minute ahead is still believed


@dataclass(frozen=True)
class LogItem:
    time_ns: int
    severity_text: str
    severity_number: int
    event_name: str
    body: str
    attributes: Attrs


@dataclass
class Interval:
    """What one drain hands to the otlp layer."""

    sums: dict[tuple[str, Attrs], int] = field(default_factory=dict)
    histograms: list[tuple[str, Attrs, float]] = field(default_factory=list)
    spans: list[tuple[int, SpanItem]] = field(default_factory=list)  # (span kind, item)
    logs: list[LogItem] = field(default_factory=list)


def ts_ns(ts) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at: int | None = None

    def take(self, now_ns: int) -> bool:
        if self.at is not None and now_ns > self.at:
            self.tokens = min(self.burst, self.tokens + (now_ns - self.at) / 1e9 * self.rate)
        self.at = now_ns if self.at is None else max(self.at, now_ns)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


_WORKLOAD = N.WORKLOAD_ATTR.get


class Mapper:
    """Aggregates Hubble events between drains. Thread-safe: feed from one
    thread (the follower), drain from another (the export loop)."""

    def __init__(self, max_series: int = 65536, max_pending: int = 65536,
                 l7_timeout_s: float = 30.0, dns_names: bool = False,
                 denial_log_rate: float = 10.0, denial_log_burst: float = 100.0,
                 denial_memory: int = 65536, dedup_memory: int = 65536,
                 max_spans: int = 65536):
        self.max_series = max_series
        self.max_spans = max_spans
        self.dns_names = dns_names
        self._lock = threading.Lock()
        self._counts: dict[tuple, int] = {}  # raw key (metric tag first) -> count
        self._health: Counter[tuple[str, Attrs]] = Counter()
        self._hist: list[tuple[str, Attrs, float]] = []
        self._spans: list[tuple[int, SpanItem]] = []
        self._logs: list[LogItem] = []
        self._pending = PendingTable(max_pending, int(l7_timeout_s * 1e9))
        self._denied: OrderedDict[tuple, None] = OrderedDict()
        self._denial_memory = denial_memory
        self._log_bucket = TokenBucket(denial_log_rate, denial_log_burst)
        self._seen: OrderedDict[str, None] = OrderedDict()  # recent flow uuids (dedup)
        self._dedup_memory = dedup_memory
        self.stream_time_ns = 0  # newest Hubble timestamp seen: the stream's clock

    # --- input --------------------------------------------------------------------
    def count(self, name: str, attrs: Attrs = (), n: int = 1) -> None:
        """A health counter (sources use it for reconnects, bad lines, ...)."""
        with self._lock:
            self._health[(name, attrs)] += n

    def feed(self, msgs: Iterable) -> None:
        """Map a batch of ``GetFlowsResponse`` or ``ExportEvent`` messages."""
        with self._lock:
            for m in msgs:
                self._guarded(m)

    def feed_one(self, msg) -> None:
        with self._lock:
            self._guarded(msg)

    def _guarded(self, m) -> None:
        try:
            self._one(m)
        except Exception as e:  # a message we cannot map must not stop the stream
            self._health[(N.MALFORMED, (("reason", "mapping"),
                                        ("error", type(e).__name__)))] += 1

    def _one(self, m) -> None:
        h = self._health
        h[(N.EVENTS_RECEIVED, HUBBLE)] += 1
        kind = m.WhichOneof("response_types")
        if kind == "flow":
            self._flow(m.flow, m.node_name)
        elif kind == "lost_events":
            le = m.lost_events
            # Replayed after a reconnection like flows, but without a uuid.
            if self._is_duplicate(f"lost:{ts_ns(m.time)}:{le.source}:{le.num_events_lost}"):
                return
            src, known = N.enum_name(N.LOST_SOURCE, le.source)
            if not known:
                h[(N.MALFORMED, (("reason", "unknown_enum"), ("field", "lost_events.source")))] += 1
            h[(N.EVENTS_LOST, HUBBLE + (("hubble.lost.source", src.lower()),))] += \
                le.num_events_lost
        elif kind is None:
            h[(N.MALFORMED, (("reason", "empty"),))] += 1
        else:
            h[(N.IGNORED, (("kind", kind),))] += 1

    def _flow(self, f, node_name: str) -> None:
        t = ts_ns(f.time)
        if t > self.stream_time_ns:
            # The stream's clock (resume point, L7 timeouts) never follows a timestamp from
            # the future: one bad event would otherwise blind the resume after a reconnect.
            if t <= time.time_ns() + MAX_SKEW_NS:
                self.stream_time_ns = t
            else:
                self._health[(N.MALFORMED, (("reason", "future_time"),))] += 1
        if f.uuid and self._is_duplicate(f.uuid):
            return
        verdict = f.verdict
        if verdict not in N.VERDICT:
            self._health[(N.MALFORMED, (("reason", "unknown_enum"), ("field", "verdict")))] += 1
        et = f.event_type.type
        if et == N.EVENT_POLICY_VERDICT:
            self._verdict(f, node_name)
        elif et == N.EVENT_DROP or (et == 0 and verdict == N.V_DROPPED and f.Type != N.FLOW_L7):
            self._drop(f, node_name)
        elif et == N.EVENT_ACCESS_LOG or f.Type == N.FLOW_L7:
            self._l7(f, t)
        elif et == N.EVENT_TRACE or et == 0:
            self._packet(f, node_name)
        else:
            self._health[(N.IGNORED, (("kind", f"event_type_{et}"),))] += 1

    def _is_duplicate(self, uid: str) -> bool:
        seen = self._seen
        if uid in seen:
            self._health[(N.DUPLICATES, HUBBLE)] += 1
            return True
        seen[uid] = None
        if len(seen) > self._dedup_memory:
            seen.popitem(last=False)
        return False

    # --- L3/L4 --------------------------------------------------------------------
    @staticmethod
    def _l4(f) -> tuple[str | None, int | None, int | None]:
        l4 = f.l4
        which = l4.WhichOneof("protocol")
        if which is None:
            return None, None, None
        m = getattr(l4, which)
        if which in ("TCP", "UDP", "SCTP"):
            return N.TRANSPORTS[which], m.source_port, m.destination_port
        return N.TRANSPORTS.get(which, which.lower()), None, None

    @staticmethod
    def _endpoint(ep) -> tuple:
        """(namespace, pod, ((workload attr, name), ...)) of a Hubble endpoint."""
        wls = ep.workloads
        wl = tuple([(_WORKLOAD(w.kind, "k8s.workload.name"), w.name) for w in wls
                    if w.name]) if wls else ()
        return ep.namespace, ep.pod_name, wl

    def _add(self, key: tuple, n: int = 1) -> None:
        c = self._counts
        if key in c:
            c[key] += n
        elif len(c) < self.max_series:
            c[key] = n
        else:
            c[(key[0], "overflow")] = c.get((key[0], "overflow"), 0) + n
            self._health[(N.SERIES_OVERFLOW, ())] += n

    def _packet(self, f, node: str) -> None:
        ip = f.IP
        if not ip.source and not ip.destination:
            self._health[(N.MALFORMED, (("reason", "no_ip"),))] += 1
            return
        transport, sp, dp = self._l4(f)
        td = f.traffic_direction
        reply = f.is_reply.value  # unset reads False: not known to be a reply
        # traffic_direction is the connection's (replies keep it): the packet's
        # own direction at the local endpoint flips for replies.
        if td == N.EGRESS:
            tx = not reply
        elif td == N.INGRESS:
            tx = reply
        else:
            tx = None
        local = () if tx is None else self._endpoint(f.source if tx else f.destination)
        self._add((N.FLOW_PACKETS, ip.source, sp, ip.destination, dp, transport, ip.ipVersion,
                   tx, f.interface.name, local, f.node_name or node))

    def _drop(self, f, node: str) -> None:
        code = f.drop_reason_desc or f.drop_reason
        reason, known = N.enum_name(N.DROP_REASON, code)
        if not known:
            self._health[(N.MALFORMED, (("reason", "unknown_enum"),
                                        ("field", "drop_reason_desc")))] += 1
        ip = f.IP
        transport, sp, dp = self._l4(f)
        td = f.traffic_direction
        tx = True if td == N.EGRESS else False if td == N.INGRESS else None
        local = () if tx is None else self._endpoint(f.source if tx else f.destination)
        self._add((N.DROPS, ip.source, sp, ip.destination, dp, transport, ip.ipVersion, tx,
                   f.interface.name, local, f.node_name or node, reason))

    # --- policy verdicts ----------------------------------------------------------
    def _verdict(self, f, node: str) -> None:
        verdict, _ = N.enum_name(N.VERDICT, f.verdict)
        mt = N.POLICY_MATCH.get(f.policy_match_type)
        if mt is None:
            mt = f"unknown_{f.policy_match_type}"
            self._health[(N.MALFORMED, (("reason", "unknown_enum"),
                                        ("field", "policy_match_type")))] += 1
        td = f.traffic_direction
        tx = True if td == N.EGRESS else False if td == N.INGRESS else None
        transport, _, dp = self._l4(f)
        src, dst = f.source, f.destination
        node = f.node_name or node
        key = (N.VERDICTS, verdict.lower(), tx, mt, src.identity, dst.identity,
               self._endpoint(src)[::2], self._endpoint(dst)[::2], transport, dp, node)
        self._add(key)
        if f.verdict == N.V_DROPPED:
            self._denial(f, key, transport, dp)

    def _denial(self, f, key: tuple, transport, dport) -> None:
        ip = f.IP
        dkey = (ip.source or f.source.identity, ip.destination or f.destination.identity,
                transport, dport)
        if dkey in self._denied:
            self._denied.move_to_end(dkey)
            return
        self._denied[dkey] = None
        if len(self._denied) > self._denial_memory:
            self._denied.popitem(last=False)
        t = ts_ns(f.time)
        if not self._log_bucket.take(t):
            self._health[(N.LOGS_SUPPRESSED, ())] += 1
            return
        policies = [p for p in (*f.ingress_denied_by, *f.egress_denied_by)]
        pnames = tuple(f"{p.namespace}/{p.name}" if p.namespace else p.name
                       for p in policies if p.name)
        attrs = verdict_attrs(key)
        if ip.source:
            attrs += (("source.address", ip.source),)
        if ip.destination:
            attrs += (("destination.address", ip.destination),)
        if pnames:
            attrs += (("network.policy.names", ",".join(pnames)),)
        direction = {True: "egress", False: "ingress"}.get(key[2], "unknown direction")
        what = f"{transport or 'ip'} {ip.source or f.source.identity} -> " \
               f"{ip.destination or f.destination.identity}" + (f":{dport}" if dport else "")
        body = f"policy denied ({direction}): {what}" + \
            (f" by {', '.join(pnames)}" if pnames else "")
        self._logs.append(LogItem(t, "WARN", 13, "network.policy.denial", body, attrs))

    # --- L7 -------------------------------------------------------------------------
    def _l7(self, f, t: int) -> None:
        l7 = f.l7
        rec = l7.WhichOneof("record")
        if rec not in ("http", "dns"):
            self._health[(N.IGNORED, (("kind", f"l7_{rec or 'none'}"),))] += 1
            return
        ip = f.IP
        transport, sp, dp = self._l4(f)
        here, there = (ip.source, sp), (ip.destination, dp)
        pair = (here, there) if here <= there else (there, here)
        typ = l7.type
        if rec == "http":
            h = l7.http
            ident = ("http", pair, h.method, h.url)
        else:
            d = l7.dns
            ident = ("dns", pair, d.query, d.qtypes[0] if d.qtypes else "")
        if typ == N.L7_REQUEST:
            info = (here, there, transport, ip.ipVersion, f.traffic_direction)
            ev = self._pending.add(Request(t, ident, info))
            if ev is not None:
                self._health[(N.PENDING_EVICTED, (("protocol", ev.key[0]),))] += 1
        elif typ == N.L7_RESPONSE:
            req = self._pending.take(ident)
            if req is None:
                self._health[(N.UNMATCHED, (("protocol", rec),))] += 1
                start = t - l7.latency_ns if 0 < l7.latency_ns <= t else t
                # A response travels server -> client.
                info = (there, here, transport, ip.ipVersion, f.traffic_direction)
            else:
                start, info = req.time_ns, req.info
            if rec == "http":
                h = l7.http
                self._http_span(start, t, info, h.method, h.url, h.code, h.protocol)
            else:
                d = l7.dns
                self._dns_span(start, t, info, d.query, d.qtypes[0] if d.qtypes else "", d)
        else:
            name, known = N.enum_name(N.L7_TYPE, typ)
            self._health[(N.MALFORMED if not known else N.IGNORED,
                          (("reason", "unknown_enum"), ("field", "l7.type")) if not known
                          else (("kind", f"l7_{name.lower()}"),))] += 1

    def _http_span(self, start: int, end: int, info: tuple, method: str, url: str,
                   code: int = 0, protocol: str = "", timeout: bool = False) -> None:
        kind, item, hist_name, hist = http_span(start, end, info, method, url, code, protocol,
                                                timeout)
        self._span(kind, item)
        self._hist.append((hist_name, hist, max(0, end - start) / 1e9))

    def _dns_span(self, start: int, end: int, info: tuple, query: str, qtype: str,
                  response=None) -> None:
        item, hist = dns_span(start, end, info, query, qtype, response, self.dns_names)
        self._span(SPAN_KIND_CLIENT, item)
        self._hist.append((N.DNS_DURATION, hist, max(0, end - start) / 1e9))

    def _span(self, kind: int, item: SpanItem) -> None:
        if len(self._spans) < self.max_spans:
            self._spans.append((kind, item))
        else:  # the histogram still has it; the span path would drop it anyway
            self._health[(N.SPANS_DROPPED, (("reason", "interval_full"),))] += 1

    def _expire(self) -> None:
        for req in self._pending.expire(self.stream_time_ns):
            end = req.time_ns + self._pending.timeout_ns
            if req.key[0] == "http":
                _, _, method, url = req.key
                self._http_span(req.time_ns, end, req.info, method, url, timeout=True)
            else:
                _, _, query, qtype = req.key
                self._dns_span(req.time_ns, end, req.info, query, qtype)

    # --- output ---------------------------------------------------------------------
    def drain(self) -> Interval:
        """Everything aggregated since the last drain (counter deltas)."""
        with self._lock:
            self._expire()
            counts, self._counts = self._counts, {}
            health, self._health = self._health, Counter()
            hist, self._hist = self._hist, []
            spans, self._spans = self._spans, []
            logs, self._logs = self._logs, []
        out = Interval(histograms=hist, spans=spans, logs=logs)
        sums = out.sums
        for key, n in counts.items():
            name = key[0]
            attrs = OVERFLOW if key[1:] == ("overflow",) else ATTRS[name](key)
            sums[(name, attrs)] = sums.get((name, attrs), 0) + n
        for key, n in health.items():
            sums[key] = sums.get(key, 0) + n
        return out

    def pending(self) -> int:
        return len(self._pending)


def sums_by_name(interval: Interval) -> dict[str, dict[Attrs, int]]:
    """The interval's sums grouped per metric name (what the encoders want)."""
    out: dict[str, dict[Attrs, int]] = {}
    for (name, attrs), n in interval.sums.items():
        out.setdefault(name, {})[attrs] = n
    return out


__all__: Sequence[str] = ("Mapper", "Interval", "LogItem", "sums_by_name",
                          "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT")
