"""DNS: every query and answer on the watched interfaces, as spans and metrics.

Kernel: ``dns.bpf.c`` copies the head of each DNS message into a ring
buffer (TC ingress and egress on every ``--iface``). Here: batches are
decoded (``dns_decode``), queries are paired with answers by transaction id
and 5-tuple, each finished lookup becomes one CLIENT span (through the batch
span path in ``dns_spans``, not the SDK's) and one ``dns.lookup.duration``
measurement. Unanswered queries become timeouts after ``--dns-timeout``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter

import numpy as np
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import AggregationTemporality

from ..bpfobj import BpfObject
from ..dns_decode import (
    AddressCache,
    Decoder,
    PendingTable,
    Query,
    event_dtype,
    rcode_text,
)
from ..dns_metrics import BatchHistogram
from ..dns_spans import SpanBatchExporter, SpanItem, otlp_sender
from ..layout import constant
from ..ringbuf import RingBuffer
from ..telemetry import DURATION_BUCKETS, SCOPE, signal_endpoint
from .base import Signal

log = logging.getLogger(__name__)

# Answers that are not failures of the lookup: NOERROR, and NXDOMAIN (a
# definite "no such name"). Every other code is an error with error.type=<code>.
OK_RCODES = frozenset((0, 3))
TIMEOUT = "timeout"
TRANSPORT = {6: "tcp", 17: "udp"}
NET_TYPE = {4: "ipv4", 6: "ipv6"}
EXPIRE_EVERY_NS = 100_000_000  # timeouts are checked at least this often under traffic


class DnsSignal(Signal):
    name = "dns"

    def __init__(self, config, telemetry):
        super().__init__(config, telemetry)
        m = telemetry.meter
        pref = getattr(telemetry.metric_exporter, "_preferred_temporality", None) or {}
        self.duration = BatchHistogram(
            "dns.lookup.duration", "s",
            "DNS lookups seen on the wire: query to answer (or timeout)", DURATION_BUCKETS,
            dict(telemetry.resource.attributes), SCOPE,
            delta=pref.get(SdkHistogram) == AggregationTemporality.DELTA,
            cardinality_limit=telemetry.cardinality_limit,
            send=otlp_sender("metrics", signal_endpoint(
                config.endpoint, "/v1/metrics", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
                config.headers, config.export_timeout_s))
        self.queries = m.create_counter("dns.queries", unit="{query}",
                                        description="DNS queries seen on the wire")
        self.responses = m.create_counter("dns.responses", unit="{response}",
                                          description="DNS responses seen, by response code")
        self.decoder = Decoder()
        self.table = PendingTable(config.dns_max_pending, int(config.dns_timeout_s * 1e9))
        self.addrs = AddressCache()
        self.spans = SpanBatchExporter(
            dict(telemetry.resource.attributes),
            signal_endpoint(config.endpoint, "/v1/traces", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            config.headers, config.export_timeout_s,
            max_queue=max(65536, config.dns_max_pending))
        self.spans.tick = self.expire
        self._lock = threading.Lock()
        self._query_counts: Counter[tuple] = Counter()
        self._response_counts: Counter[tuple] = Counter()
        self._ifnames: dict[int, str] = {}
        self._last_expire = 0
        self._ring: RingBuffer | None = None
        self._register_health()

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        from ..agent import ConfigError

        cfg = self.config
        max_ports = constant("dns", "DNS_MAX_PORTS")
        head_max = constant("dns", "DNS_HEAD_MAX")
        ports = tuple(dict.fromkeys(cfg.dns_ports))
        if not ports or len(ports) > max_ports:
            raise ConfigError(f"--dns-ports takes 1 to {max_ports} ports, got {len(ports)}")
        if not 12 <= cfg.dns_head_bytes <= head_max:
            raise ConfigError(f"--dns-head-bytes must be within 12..{head_max}")
        obj = BpfObject.open_packaged("dns")
        self.objects.append(obj)
        obj.rodata["dns_ports"] = np.array(list(ports) + [0] * (max_ports - len(ports)),
                                           dtype="<u2").tobytes()
        obj.rodata["n_dns_ports"] = len(ports)
        obj.rodata["head_bytes"] = cfg.dns_head_bytes
        obj.rodata["ringbuf_wakeup_bytes"] = cfg.ringbuf_wakeup_bytes
        obj.set_max_entries("dns_events", cfg.ringbuf_bytes)
        obj.load()
        for ifname in cfg.ifaces:
            idx = socket.if_nametoindex(ifname)
            obj.programs["dns_ingress"].attach_tc(idx, "ingress")
            obj.programs["dns_egress"].attach_tc(idx, "egress")
        self._ring = RingBuffer(obj.maps["dns_events"], event_dtype(cfg.dns_head_bytes),
                                on_batch=self.on_batch, lost_map=obj.maps["dns_events_lost"])
        self.spans.start()

    def rings(self) -> list[RingBuffer]:
        return [self._ring] if self._ring is not None else []

    def collect(self) -> None:
        self.expire()
        self.duration.export()
        with self._lock:
            qc, self._query_counts = self._query_counts, Counter()
            rc, self._response_counts = self._response_counts, Counter()
        names = self.config.dns_names
        for (qtype, server, port, transport, qname), n in qc.items():
            a = {"dns.question.type": qtype, "server.address": server, "server.port": port,
                 "network.transport": transport}
            if names:
                a["dns.question.name"] = qname
            self.queries.add(n, a)
        for (qtype, rcode, server, port, transport, qname), n in rc.items():
            a = {"dns.question.type": qtype, "dns.response_code": rcode,
                 "server.address": server, "server.port": port, "network.transport": transport}
            if names:
                a["dns.question.name"] = qname
            self.responses.add(n, a)

    def close(self) -> None:
        self.spans.shutdown(5.0)
        super().close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    # --- the ring callback (poller thread) ---------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        msgs = self.decoder.decode(recs)
        if not msgs:
            return
        offset = time.time_ns() - time.monotonic_ns()
        sport, dport = recs["sport"].tolist(), recs["dport"].tolist()
        proto, family, ifindex = (recs["proto"].tolist(), recs["family"].tolist(),
                                  recs["ifindex"].tolist())
        saddr, daddr = recs["saddr"].tobytes(), recs["daddr"].tobytes()
        names = self.config.dns_names
        done: list[tuple[Query, int, int, int]] = []
        with self._lock:
            table, qc, rc = self.table, self._query_counts, self._response_counts
            for m in msgs:
                i = m.row
                fam = family[i]
                transport = TRANSPORT.get(proto[i], str(proto[i]))
                if not m.response:
                    server = self.addrs.text(daddr[16 * i:16 * i + 16], fam)
                    row = (self.addrs.text(saddr[16 * i:16 * i + 16], fam), sport[i], server,
                           dport[i], transport, NET_TYPE.get(fam, ""), self._ifname(ifindex[i]))
                    table.add(m.key, Query(m.ts_ns, m.name, m.qtype, row))
                    qc[(m.qtype, server, dport[i], transport, m.name if names else None)] += 1
                else:
                    server = self.addrs.text(saddr[16 * i:16 * i + 16], fam)
                    rc[(m.qtype, rcode_text(m.rcode), server, sport[i], transport,
                        m.name if names else None)] += 1
                    q = table.answer(m.key, m.ts_ns)
                    if q is not None:
                        done.append((q, m.ts_ns, m.rcode, m.answers))
        self._emit(done, [], offset)
        now = time.monotonic_ns()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self.expire()

    def expire(self) -> None:
        """Turn queries older than the timeout into timeout lookups."""
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        with self._lock:
            self._last_expire = now
            expired = self.table.expire(now)
        if expired:
            self._emit([], expired, offset)

    # --- telemetry -----------------------------------------------------------------
    def _emit(self, done: list[tuple[Query, int, int, int]], expired: list[Query],
              offset: int) -> None:
        spans: list[SpanItem] = []
        durations: list[tuple[tuple, float]] = []
        record = durations.append
        for q, rts, rcode, answers in done:
            rc = rcode_text(rcode)
            err = None if rcode in OK_RCODES else rc
            ca, cp, sa, sp, tr, nt, ifn = q.row
            attrs = (("dns.question.name", q.name), ("dns.question.type", q.qtype),
                     ("dns.response_code", rc), ("dns.answer.count", answers),
                     ("server.address", sa), ("server.port", sp), ("client.address", ca),
                     ("client.port", cp), ("network.transport", tr), ("network.type", nt),
                     ("network.interface.name", ifn))
            spans.append((q.ts_ns + offset, rts + offset, "DNS " + q.qtype, attrs, err))
            record((self._attrs(q, rc, err), max(rts - q.ts_ns, 0) / 1e9))
        timeout_ns = self.table.timeout_ns
        for q in expired:
            ca, cp, sa, sp, tr, nt, ifn = q.row
            attrs = (("dns.question.name", q.name), ("dns.question.type", q.qtype),
                     ("server.address", sa), ("server.port", sp), ("client.address", ca),
                     ("client.port", cp), ("network.transport", tr), ("network.type", nt),
                     ("network.interface.name", ifn))
            start = q.ts_ns + offset
            spans.append((start, start + timeout_ns, "DNS " + q.qtype, attrs, TIMEOUT))
            record((self._attrs(q, None, TIMEOUT), timeout_ns / 1e9))
        if spans:
            self.spans.submit(spans)
            self.duration.record_batch(durations)

    def _attrs(self, q: Query, rcode: str | None, err: str | None) -> tuple:
        """The histogram's attribute set, as a hashable tuple of pairs."""
        _, _, sa, sp, tr, _, _ = q.row
        key = (("dns.question.type", q.qtype), ("server.address", sa), ("server.port", sp),
               ("network.transport", tr))
        if rcode is not None:
            key += (("dns.response_code", rcode),)
        if err is not None:
            key += (("error.type", err),)
        if self.config.dns_names:
            key += (("dns.question.name", q.name),)
        return key

    def _ifname(self, ifindex: int) -> str:
        n = self._ifnames.get(ifindex)
        if n is None:
            try:
                n = socket.if_indextoname(ifindex)
            except OSError:
                n = str(ifindex)
            self._ifnames[ifindex] = n
        return n

    def _register_health(self) -> None:
        t = self.telemetry
        t.observe("ebpf_otlp.dns.malformed", "{message}",
                  "DNS messages skipped: too short, truncated, invalid, no question",
                  lambda: [(n, {"reason": r}) for r, n in self.decoder.malformed.items()])
        t.observe("ebpf_otlp.dns.unmatched", "{response}",
                  "DNS responses with no query waiting for them",
                  lambda: [(self.table.unmatched, {})])
        t.observe("ebpf_otlp.dns.duplicates", "{message}",
                  "copies of a query already waiting, or of an answer already paired",
                  lambda: [(self.table.duplicates, {})])
        t.observe("ebpf_otlp.dns.pending.evicted", "{query}",
                  "queries pushed out of the full pending table (no span)",
                  lambda: [(self.table.evicted, {})])
        t.observe("ebpf_otlp.dns.pending", "{query}", "queries waiting for an answer",
                  lambda: [(len(self.table), {})], kind="gauge")
        t.observe("ebpf_otlp.dns.spans.dropped", "{span}",
                  "DNS spans not exported: queue full, export failed, shutdown",
                  lambda: [(n, {"reason": r}) for r, n in self.spans.dropped.items()])
        t.observe("ebpf_otlp.dns.spans.exported", "{span}", "DNS spans exported",
                  lambda: [(self.spans.exported, {})])
        t.observe("ebpf_otlp.dns.export.failures", "{export}",
                  "DNS's own OTLP requests that failed (spans; the duration histogram)",
                  lambda: [(self.spans.failures, {"signal": "traces"}),
                           (self.duration.failures, {"signal": "metrics"})])
        t.observe("ebpf_otlp.dns.lookups.unexported", "{lookup}",
                  "lookups missing from dns.lookup.duration: failed delta export, or "
                  "folded into the overflow series",
                  lambda: [(self.duration.points_lost, {"reason": "export_failed"}),
                           (self.duration.overflowed, {"reason": "overflow"})])
