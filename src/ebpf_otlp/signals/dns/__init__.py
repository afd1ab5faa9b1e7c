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

import numpy as np

from ...config import ConfigError
from ...otlp.semconv import FAMILIES, AddressCache, transport
from ...otlp.spans import SpanGroup
from ...platform.bpfobj import BpfObject
from ...platform.host import epoch_offset_ns, in_initial_pid_namespace, libc_path
from ...platform.layout import constant, record_dtype
from ...platform.libbpf import BpfError
from ...platform.ringbuf import HeldBatches, RingBuffer
from ..attribution import shared as shared_attribution
from ..base import Signal
from ..batch import group, split
from ..packet import PacketDatapath, PacketHooks
from . import lookups
from .decode import (
    Decoder,
    PendingTable,
    Query,
    TcpContinuations,
    event_dtype,
    new_query,
    pair_key_array,
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
# Ring batches are processed together once this many records wait, or the oldest
# waited this long: ~2 x cheaper per query than a 50 ms poll's worth at 10,000
# queries/s (bench/dns_replay.py).
BATCH_RECORDS = 4096
BATCH_WAIT_NS = 200_000_000


class DnsSignal(PacketHooks, Signal):
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
        self._span_groups: dict[tuple, tuple[SpanGroup, tuple]] = {}
        self._held = HeldBatches(BATCH_RECORDS)  # ring batches waiting for process()
        self._flush_lock = threading.Lock()
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
        now = time.monotonic_ns()
        if self._held.waited() * 1e9 >= BATCH_WAIT_NS:
            self._flush()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self.expire()

    def programs(self) -> list:
        own = super().programs()
        return own + (self.dp.programs(self.name) if self.dp is not None else [])

    def collect(self) -> None:
        if self.dp is not None:
            self.dp.interval_tick(self.config.interval_s)
        self._flush()
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
            self._flush()
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
        """Collect ring batches until :data:`BATCH_RECORDS` wait (or, from
        :meth:`tick`, the oldest waited :data:`BATCH_WAIT_NS`): the numpy work
        per batch is then shared by thousands of messages, not a poll's worth."""
        if self._held.add(recs):
            self._flush()

    def _flush(self) -> None:
        with self._flush_lock:
            recs = self._held.take()
            if recs is None:
                return
            try:
                self.process(recs)
            except Exception:
                # what the ring counts for a failing consumer (events.lost{callback_failed})
                if self._ring is not None:
                    self._ring.dropped["callback_failed"] += len(recs)
                log.exception("DNS: a batch of %d records failed", len(recs))

    def process(self, recs: np.ndarray) -> None:
        """Decode, count, pair and emit one batch with numpy: exchanges complete
        within the batch pair without a Python object each; the rest go
        through the pending table one by one."""
        skip = self.tcp.mask(recs)
        if skip is not None and skip.any():
            recs = recs[~skip]
        d = self.decoder.decode_columns(recs)
        if not len(d.rows):
            return
        offset = epoch_offset_ns()
        sub = recs[d.rows]
        keys = pair_key_array(sub, d.response)
        with self._lock:
            self._count(sub, d)
            qi, ai, rest = self.table.fast_pairs(keys, d.response, d.ts_ns)
            done = self._one_by_one(sub, d, keys, rest) if len(rest) else []
        fast = lookups.from_pairs(sub, d, qi, ai)
        self._emit(lookups.concat(fast, lookups.from_queries(done, len(d.questions))),
                   d.questions + [(q.name, q.qtype) for q, *_ in done], offset)
        now = time.monotonic_ns()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self.expire()

    def _count(self, sub: np.ndarray, d) -> None:
        """dns.queries / dns.responses per (type, server, ...), one Counter add per group."""
        names = self.config.dns_names
        qs = d.questions
        for resp, counts in ((False, self._query_counts), (True, self._response_counts)):
            sel = d.response == resp
            if not sel.any():
                continue
            r, question = sub[sel], d.question[sel]
            rcode = d.rcode[sel] if resp else None
            ifxs = r["ifindex"]
            for ifx in np.unique(ifxs).tolist():  # per interface: its workload's resource
                m = ifxs == ifx
                ri = r[m]
                server = ri["saddr"] if resp else ri["daddr"]
                port = ri["sport"] if resp else ri["dport"]
                rows, n = lookups.group_rows(question[m], server, port, ri["proto"],
                                             ri["family"], rcode[m] if resp else None)
                for (q, addr, p, proto, fam, rc), c in zip(rows, n):
                    name, qtype = qs[q]
                    lname = name.lower() if names else None
                    if resp:
                        counts[(qtype, rc, addr, p, proto, fam, lname, ifx)] += c
                    else:
                        counts[(qtype, addr, p, proto, fam, lname, ifx)] += c

    def _one_by_one(self, sub: np.ndarray, d, keys: np.ndarray, rest: np.ndarray
                    ) -> list[tuple[Query, int, int, int]]:
        """Messages that did not pair within the batch, through the pending table."""
        add, answer = self.table.add, self.table.answer
        qs = d.questions
        done = []
        r = sub[rest]
        saddr, daddr = r["saddr"].tobytes(), r["daddr"].tobytes()
        for k, (key, resp, ts, q, rcode, ans, sp, dp, proto, fam, ifx) in enumerate(zip(
                keys[rest].tolist(), d.response[rest].tolist(), d.ts_ns[rest].tolist(),
                d.question[rest].tolist(), d.rcode[rest].tolist(), d.answers[rest].tolist(),
                r["sport"].tolist(), r["dport"].tolist(), r["proto"].tolist(),
                r["family"].tolist(), r["ifindex"].tolist())):
            o = 16 * k
            if not resp:
                name, qtype = qs[q]
                add(key, new_query(ts, name, qtype, (saddr[o:o + 16], sp, daddr[o:o + 16], dp,
                                                     proto, fam, ifx)))
            else:
                got = answer(key, ts)
                if got is not None:
                    done.append((got, ts, rcode, ans))
        return done

    def expire(self, flush_all: bool = False) -> None:
        """Turn queries older than the timeout (all of them at shutdown) into timeouts."""
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        with self._lock:
            self._last_expire = now
            expired = self.table.expire(now + (self.table.timeout_ns if flush_all else 0))
        if expired:
            done = [(q, None, -1, 0) for q in expired]
            self._emit(lookups.from_queries(done, 0), [(q.name, q.qtype) for q in expired],
                       offset)

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

    def _span_group(self, question: tuple[str, str], sa: bytes, sp: int, proto: int, fam: int,
                    ifx: int, rcode: int) -> tuple[SpanGroup, tuple]:
        """The span group and the dns.lookup.duration attributes of lookups sharing these."""
        name, qtype = question
        span_part, hist_part = self._server(sa, sp, proto, fam, ifx)
        qattrs = (("dns.question.name", name), ("dns.question.type", qtype))
        hist = (("dns.question.type", qtype),) + hist_part
        if self.config.dns_names:
            # Lower case on metrics: resolvers that randomise case (0x20
            # encoding) would otherwise multiply the series. Spans keep the wire's.
            hist += (("dns.question.name", name.lower()),)
        if rcode < 0:
            err = TIMEOUT
            attrs = qattrs + span_part
            hist += (("error.type", TIMEOUT),)
        else:
            rc = rcode_text(rcode)
            err = None if rcode in OK_RCODES else rc
            attrs = qattrs + (("dns.response_code", rc),) + span_part
            hist += (("dns.response_code", rc),)
            if err is not None:
                hist += (("error.type", err),)
        w = self._workload(ifx)  # the pod/container behind the interface: its resource
        return SpanGroup("DNS " + qtype, attrs, err,
                         resource=self.attribution.key(w)), hist + tuple(w.items())

    def _emit(self, lk: lookups.Lookups, questions: list[tuple[str, str]], offset: int) -> None:
        """One span and one dns.lookup.duration value per lookup, from columns:
        attributes are built once per group of lookups that share them."""
        m = len(lk.q_ts)
        if not m:
            return
        timeout = lk.rcode < 0
        end = np.where(timeout, lk.q_ts + self.table.timeout_ns, lk.end_ts)
        dur = np.where(end > lk.q_ts, (end - lk.q_ts) / 1e9, 0.0)
        rows, inv = lookups.span_groups(lk)
        groups, hist_keys = [], []
        cache = self._span_groups
        for q, sa, sp, proto, fam, ifx, rcode in rows:
            ck = (questions[q], sa, sp, proto, fam, ifx, rcode)
            hit = cache.get(ck)
            if hit is None:
                if len(cache) >= 65536:  # bounded: names and servers churn
                    cache.clear()
                hit = cache[ck] = self._span_group(questions[q], sa, sp, proto, fam, ifx, rcode)
            groups.append(hit[0])
            hist_keys.append(hit[1])
        # Spans also share the client's address and the answer count (few distinct
        # values): only the client port is left per span.
        text = self.addrs.text
        first, sub, _ = group(inv.astype("<i8"), lk.c_addr, lk.family.astype("u1"),
                              lk.answers.astype("<i8"))
        raw = np.ascontiguousarray(lk.c_addr[first]).tobytes()
        span_groups = []
        for k, (g, _fam, ans) in enumerate(zip(inv[first].tolist(), lk.family[first].tolist(),
                                              lk.answers[first].tolist())):
            base = groups[g]
            extra = (("client.address", text(raw[16 * k:16 * k + 16])),)
            if base.error != TIMEOUT:
                extra += (("dns.answer.count", ans),)
            span_groups.append(base._replace(attributes=tuple(base.attributes) + extra))
        self.spans_dropped += self.exporter.submit_span_groups(
            lk.q_ts + offset, end + offset, sub, span_groups,
            [("client.port", lk.c_port.tolist())])
        # span groups that share a histogram series (names off: all but the question)
        series: dict[tuple, int] = {}
        to_series = np.array([series.setdefault(h, len(series)) for h in hist_keys], np.int64)
        keys = list(series)
        for g, vals in split(to_series[inv], dur, len(keys)):
            self.duration.record_many(keys[g], vals)

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
                  "DNS spans refused by the full span queue (every span the export path "
                  "gives up counts under ebpf_otlp.export.dropped{signal=traces})",
                  lambda: [(self.spans_dropped, {"reason": "queue_full"})])
        t.observe("ebpf_otlp.dns.lookups.unexported", "{lookup}",
                  "lookups missing from dns.lookup.duration: folded into the overflow "
                  "series (failed delta exports are retried; their evictions count "
                  "under ebpf_otlp.export.dropped)",
                  lambda: [(self.duration.points_lost, {"reason": "export_failed"}),
                           (self.duration.overflowed, {"reason": "overflow"})])
