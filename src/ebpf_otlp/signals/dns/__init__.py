"""DNS: every query and answer on the watched interfaces, as spans and metrics.

Kernel: ``dns.bpf.c`` copies the head of each DNS message into a ring
buffer (TC ingress and egress on every ``--iface``). Here: batches are
decoded (``decode``), queries are paired with answers by transaction id and
5-tuple, each finished lookup becomes one CLIENT span (the exporter's batch
span path) and one ``dns.lookup.duration`` value (its bulk histogram path).
Unanswered queries become timeouts after ``--dns-timeout``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from itertools import chain

import numpy as np

from ...config import ConfigError
from ...otlp.semconv import FAMILIES, AddressCache, transport
from ...otlp.spans import SpanRecord
from ...platform.bpfobj import BpfObject
from ...platform.host import epoch_offset_ns, in_initial_pid_namespace, libc_path
from ...platform.layout import constant, record_dtype
from ...platform.libbpf import BpfError
from ...platform.ringbuf import RingBuffer
from ..attribution import shared as shared_attribution
from ..base import Signal
from ..packet import PacketDatapath
from .decode import (
    Decoder,
    PendingTable,
    Query,
    TcpContinuations,
    event_dtype,
    new_query,
    rcode_text,
)
from .gai import GaiMetrics

log = logging.getLogger(__name__)

# Answers that are not failures of the lookup: NOERROR, and NXDOMAIN (a
# definite "no such name"). Every other code is an error with error.type=<code>.
OK_RCODES = frozenset((0, 3))
TIMEOUT = "timeout"
GAI_TABLE_FULL = constant("dns", "DNS_GAI_TABLE_FULL")
GAI_NO_START = constant("dns", "DNS_GAI_NO_START")
EXPIRE_EVERY_NS = 100_000_000  # timeouts are checked at least this often under traffic


class DnsSignal(Signal):
    name = "dns"

    def __init__(self, config, exporter):
        super().__init__(config, exporter)
        m = exporter.meter
        self.duration = exporter.histogram(
            "dns.lookup.duration", "s",
            "DNS lookups seen on the wire: query to answer (or timeout)")
        self.queries = m.create_counter("dns.queries", unit="{query}",
                                        description="DNS queries seen on the wire")
        self.responses = m.create_counter("dns.responses", unit="{response}",
                                          description="DNS responses seen, by response code")
        self.decoder = Decoder()
        self.tcp = TcpContinuations()
        self.table = PendingTable(config.dns_max_pending, int(config.dns_timeout_s * 1e9))
        self.addrs = AddressCache()
        self.spans_dropped = 0  # counted by the exporter too; kept for dns.* health
        self._lock = threading.Lock()
        self._query_counts: Counter[tuple] = Counter()
        self._response_counts: Counter[tuple] = Counter()
        self._ifnames: dict[int, str] = {}
        self._servers: dict[tuple, tuple[tuple, tuple]] = {}
        self._last_expire = 0
        self._ring: RingBuffer | None = None
        self.dp: PacketDatapath | None = None
        self._gai_ring: RingBuffer | None = None
        self._gai_untracked = None
        self._gai_calls = None
        self._gai_seen = (0, 0)
        self.gai_abandoned = 0
        self._host_pids = in_initial_pid_namespace()
        self.gai = GaiMetrics(exporter.histogram(
            "dns.getaddrinfo.duration", "s",
            "getaddrinfo() calls as applications saw them (libc uprobes): caches and "
            "/etc/hosts included"), config.dns_names)
        self.attribution = shared_attribution(config, exporter)
        if self.attribution.enabled:
            self.gai.resource = self.attribution.socket
        self._register_health()

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        max_ports = constant("dns", "DNS_MAX_PORTS")
        head_max = constant("dns", "DNS_HEAD_MAX")
        ports = tuple(dict.fromkeys(cfg.dns_ports))  # (order kept, duplicates out)
        if not ports or len(ports) > max_ports:
            raise ConfigError(f"--dns-ports takes 1 to {max_ports} ports, got {len(ports)}")
        if not 12 <= cfg.dns_head_bytes <= head_max:
            raise ConfigError(f"--dns-head-bytes must be within 12..{head_max}")
        # The wire view: the packet object (bpf/packet.bpf.c) shared with flows, one
        # program per hook and direction parsing each packet once for both.
        self.dp = PacketDatapath.for_config(cfg).acquire(self.name, self.exporter)
        self._ring = RingBuffer(self.dp.obj.maps["dns_events"], event_dtype(cfg.dns_head_bytes),
                                on_batch=self.on_batch,
                                lost_map=self.dp.obj.maps["dns_events_lost"])
        libc = libc_path()
        if libc is None:
            log.warning("no libc found for getaddrinfo uprobes; DNS on the wire only")
            return
        try:
            obj = self._load_gai()
        except BpfError as e:
            # The uprobes are the optional part: the wire view must not depend on them.
            log.warning("getaddrinfo uprobes not loaded (%s); DNS on the wire only", e)
            return
        self._attach_gai(obj, libc)

    def add_interface(self, name: str, ifindex: int) -> None:
        """Capture on an interface that appeared while running (agent.watch_interfaces)."""
        if self.dp is not None:
            self.dp.add_interface(name, ifindex)

    def _load_gai(self) -> BpfObject:
        obj = BpfObject.open_packaged("dns")
        self.objects.append(obj)
        obj.rodata["ringbuf_wakeup_bytes"] = self.config.ringbuf_wakeup_bytes
        try:
            obj.load()
        except BpfError:
            self.objects.remove(obj)
            obj.close()
            raise
        return obj

    def _attach_gai(self, obj: BpfObject, libc: str) -> None:
        try:
            obj.programs["gai_enter"].attach_uprobe(libc, "getaddrinfo")
            obj.programs["gai_exit"].attach_uprobe(libc, "getaddrinfo", retprobe=True)
        except BpfError as e:
            log.warning("getaddrinfo uprobes on %s not attached (%s); DNS on the wire only",
                        libc, e)
            obj.detach_all()  # only the uprobe links exist yet
            return
        self._gai_untracked = obj.maps["gai_untracked"]
        self._gai_calls = obj.maps["gai_calls"]
        self._gai_ring = RingBuffer(obj.maps["gai_events"], record_dtype("dns", "gai_event"),
                                    on_batch=self.gai.on_batch,
                                    lost_map=obj.maps["gai_events_lost"])

    def rings(self) -> list[RingBuffer]:
        return [r for r in (self._ring, self._gai_ring) if r is not None]

    def tick(self) -> None:
        if time.monotonic_ns() - self._last_expire >= EXPIRE_EVERY_NS:
            self.expire()

    def programs(self) -> list:
        own = super().programs()
        return own + (self.dp.programs(self.name) if self.dp is not None else [])

    def collect(self) -> None:
        if self.dp is not None:
            self.dp.interval_tick(self.config.interval_s)
        self.expire()
        self._sweep_gai()
        with self._lock:
            qc, self._query_counts = self._query_counts, Counter()
            rc, self._response_counts = self._response_counts, Counter()
        names = self.config.dns_names
        for (qtype, server, port, proto, _fam, qname, ifx), n in qc.items():
            a = {"dns.question.type": qtype, "server.address": self.addrs.text(server),
                 "server.port": port, "network.transport": transport(proto),
                 **self._workload(ifx)}
            if names:
                a["dns.question.name"] = qname
            self.queries.add(n, a)
        for (qtype, rcode, server, port, proto, _fam, qname, ifx), n in rc.items():
            a = {"dns.question.type": qtype, "dns.response_code": rcode_text(rcode),
                 "server.address": self.addrs.text(server), "server.port": port,
                 "network.transport": transport(proto), **self._workload(ifx)}
            if names:
                a["dns.question.name"] = qname
            self.responses.add(n, a)

    def _sweep_gai(self) -> None:
        """Entries of threads that died inside getaddrinfo: never measured; delete and count."""
        m = self._gai_calls
        if m is None or not self._host_pids:  # BPF's pids are not ours to look up
            return
        for k in list(m.keys()):
            pid_tgid = int.from_bytes(k, "little")
            task = f"/proc/{pid_tgid >> 32}/task/{pid_tgid & 0xFFFFFFFF}"
            if not os.path.exists(task) and m.delete(k):
                self.gai_abandoned += 1

    def _gai_untracked_points(self) -> list[tuple[int, dict]]:
        m = self._gai_untracked
        if m is not None:  # after close the map is gone: keep the last values
            self._gai_seen = (m.sum_u64(GAI_TABLE_FULL), m.sum_u64(GAI_NO_START))
        full, no_start = self._gai_seen
        return [(full, {"reason": "table_full"}), (no_start, {"reason": "no_start"}),
                (self.gai_abandoned, {"reason": "abandoned"})]

    def close(self) -> None:
        """Queries still waiting become timeouts now (the agent exports once more after)."""
        self._gai_untracked_points()  # last values, for the final export
        self._gai_untracked = self._gai_calls = None  # their maps go with the object
        if self.dp is not None:
            self.dp.detach_hooks()
        try:
            self.expire(flush_all=True)
        except Exception:
            log.exception("final DNS expiry failed")
        super().close()
        for r in self.rings():
            r.close()
        self._ring = self._gai_ring = None
        if self.dp is not None:
            self.dp.release(self.name)
            self.dp = None

    # --- the ring callback (poller thread) ---------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        skip = self.tcp.mask(recs)
        if skip is not None and skip.any():
            recs = recs[~skip]
        msgs = self.decoder.decode(recs)
        if not msgs:
            return
        offset = epoch_offset_ns()
        sport, dport = recs["sport"].tolist(), recs["dport"].tolist()
        proto, family, ifindex = (recs["proto"].tolist(), recs["family"].tolist(),
                                  recs["ifindex"].tolist())
        saddr, daddr = recs["saddr"].tobytes(), recs["daddr"].tobytes()
        names = self.config.dns_names
        done: list[tuple[Query, int, int, int]] = []
        # Addresses stay raw bytes here; text only for what is emitted (_emit,
        # collect), through caches.
        with self._lock:
            add, answer = self.table.add, self.table.answer
            qc, rc = self._query_counts, self._response_counts
            for key, response, ts, name, qtype, rcode, answers, i in msgs:
                o = 16 * i
                if not response:
                    server = daddr[o:o + 16]
                    add(key, new_query(ts, name, qtype, (saddr[o:o + 16], sport[i], server,
                                                         dport[i], proto[i], family[i],
                                                         ifindex[i])))
                    qc[(qtype, server, dport[i], proto[i], family[i],
                        name.lower() if names else None, ifindex[i])] += 1
                else:
                    rc[(qtype, rcode, saddr[o:o + 16], sport[i], proto[i], family[i],
                        name.lower() if names else None, ifindex[i])] += 1
                    q = answer(key, ts)
                    if q is not None:
                        done.append((q, ts, rcode, answers))
        self._emit(done, [], offset)
        now = time.monotonic_ns()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self.expire()

    def expire(self, flush_all: bool = False) -> None:
        """Turn queries older than the timeout (all of them at shutdown) into timeouts."""
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        with self._lock:
            self._last_expire = now
            expired = self.table.expire(now + (self.table.timeout_ns if flush_all else 0))
        if expired:
            self._emit([], expired, offset)

    # --- telemetry -----------------------------------------------------------------
    def _server(self, raw: bytes, port: int, proto: int, family: int,
                ifindex: int) -> tuple[tuple, tuple]:
        """(span attribute pairs, histogram attribute pairs) of one server and path, cached."""
        key = (raw, port, proto, family, ifindex)
        v = self._servers.get(key)
        if v is None:
            sa = self.addrs.text(raw)
            tr = transport(proto)
            v = ((("server.address", sa), ("server.port", port), ("network.transport", tr),
                  ("network.type", FAMILIES.get(family, "")),
                  ("network.interface.name", self._ifname(ifindex))),
                 (("server.address", sa), ("server.port", port), ("network.transport", tr)))
            if len(self._servers) > 65536:
                self._servers.clear()
            self._servers[key] = v
        return v

    def _workload(self, ifindex: int) -> dict[str, str]:
        """Resource attributes of the pod or container behind a watched interface."""
        return self.attribution.interface(ifindex) if self.attribution.enabled else {}

    def _emit(self, done: list[tuple[Query, int, int, int]], expired: list[Query],
              offset: int) -> None:
        spans: list[SpanRecord] = []
        durations: list[tuple[tuple, float]] = []
        names = self.config.dns_names
        text, server = self.addrs.text, self._server
        timeout_ns = self.table.timeout_ns
        workloads: dict[int, tuple] = {}
        for q, rts, rcode, answers in chain(done, ((q, None, None, 0) for q in expired)):
            ts, name, qtype, (ca, cp, sa, sp, proto, fam, ifx) = q
            span_part, hist_part = server(sa, sp, proto, fam, ifx)
            wl = workloads.get(ifx)
            if wl is None:
                w = self._workload(ifx)
                wl = workloads[ifx] = (tuple(w.items()), self.attribution.key(w))
            qattrs = (("dns.question.name", name), ("dns.question.type", qtype))
            client = (("client.address", text(ca)), ("client.port", cp))
            hist = (("dns.question.type", qtype),) + hist_part + wl[0]
            if names:
                # Lower case on metrics: resolvers that randomise case (0x20
                # encoding) would otherwise multiply the series. Spans keep the wire's.
                hist += (("dns.question.name", name.lower()),)
            if rts is None:
                err, end = TIMEOUT, ts + timeout_ns
                attrs = qattrs + span_part + client
                hist += (("error.type", TIMEOUT),)
            else:
                rc = rcode_text(rcode)
                err, end = (None if rcode in OK_RCODES else rc), rts
                attrs = qattrs + (("dns.response_code", rc), ("dns.answer.count", answers)) \
                    + span_part + client
                hist += (("dns.response_code", rc),)
                if err is not None:
                    hist += (("error.type", err),)
            spans.append(SpanRecord(ts + offset, end + offset, "DNS " + qtype, attrs, err,
                                    resource=wl[1]))
            durations.append((hist, (end - ts) / 1e9 if end > ts else 0.0))
        if spans:
            self.spans_dropped += self.exporter.submit_spans(spans)
            self.duration.record_batch(durations)

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
        t = self.exporter
        t.observe("ebpf_otlp.dns.malformed", "{message}",
                  "DNS messages skipped: too short, truncated, invalid, no question",
                  lambda: [(n, {"reason": r})
                           for r, n in dict(self.decoder.malformed).items()])
        t.observe("ebpf_otlp.dns.getaddrinfo.untracked", "{call}",
                  "getaddrinfo() calls not measured: the in-flight table was full, a return "
                  "without its start (evicted, or begun before the agent), or a thread that "
                  "died inside the call", self._gai_untracked_points)
        t.observe("ebpf_otlp.dns.tcp.continuations", "{segment}",
                  "TCP segments continuing a multi-segment DNS message (skipped, not parsed)",
                  lambda: [(self.tcp.skipped, {})])
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
                  "DNS spans refused by the full span queue (export failures count under "
                  "ebpf_otlp.spans.dropped)",
                  lambda: [(self.spans_dropped, {"reason": "queue_full"})])
        t.observe("ebpf_otlp.dns.lookups.unexported", "{lookup}",
                  "lookups missing from dns.lookup.duration: failed delta export, or "
                  "folded into the overflow series",
                  lambda: [(self.duration.points_lost, {"reason": "export_failed"}),
                           (self.duration.overflowed, {"reason": "overflow"})])
