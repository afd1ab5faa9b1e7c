"""The HTTP signal: kernel records in, spans and duration histograms out."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from ...config import ConfigError
from ...otlp.semconv import AddressCache
from ...otlp.spans import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, SpanRecord
from ...platform.bpfobj import BpfObject
from ...platform.host import epoch_offset_ns
from ...platform.layout import constant, record_dtype
from ...platform.ringbuf import RingBuffer
from ..attribution import shared as shared_attribution
from ..base import Signal
from .conn import CLIENT, IN, OUT, SERVER, Conn, ConnTable, Counts, Exchange
from .parse import parse_traceparent
from .route import RouteTemplater
from .tls import PROGRAMS as TLS_PROGRAMS
from .tls import TlsAttacher

log = logging.getLogger(__name__)

OP_READ, OP_WRITE, OP_SENDFILE, OP_EOF, OP_CLOSE = 1, 2, 3, 4, 5
# The HTTP semantic conventions' advice for request durations, in seconds.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                         7.5, 10.0)
EXPIRE_EVERY_NS = 1_000_000_000
# Records are ~370 bytes with the default head; 16 MiB hold ~45,000 calls.
MIN_RING_BYTES = 16 << 20
KERNEL_STATS = ("calls_untracked", "fds_untracked", "ssl_calls_untracked", "ssl_no_fd",
                "read_failed")
ADDRESS_ATTRIBUTES = ("server.address", "server.port", "client.address",
                      "network.peer.address")


def event_dtype(head_bytes: int) -> np.dtype:
    """``struct http_event`` as loaded with ``head_bytes``: the fixed fields, then
    ``head_bytes`` rounded up to 8 (what the BPF side reserves per record)."""
    base = record_dtype("http", "http_event")
    off = base.fields["head"][1]
    n = (head_bytes + 7) & ~7
    names = [k for k in base.names if k != "head"]
    return np.dtype({"names": [*names, "head"],
                     "formats": [base.fields[k][0] for k in names] + [(np.uint8, (n,))],
                     "offsets": [base.fields[k][1] for k in names] + [off],
                     "itemsize": off + n})


class HttpSignal(Signal):
    name = "http"

    def __init__(self, config, exporter):
        super().__init__(config, exporter)
        self.server_duration = exporter.histogram(
            "http.server.request.duration", "s", "Duration of HTTP server requests",
            HTTP_DURATION_BUCKETS)
        self.client_duration = exporter.histogram(
            "http.client.request.duration", "s", "Duration of HTTP client requests",
            HTTP_DURATION_BUCKETS)
        self.spans_dropped = 0  # counted by the exporter too; kept for http.* health
        self.counts = Counts()
        self.table = ConnTable(config.http_max_conns, int(config.http_idle_s * 1e9), self.counts)
        self.route = RouteTemplater(config.http_route_patterns)
        self.capture = frozenset(h.lower() for h in config.http_capture_headers)
        self.keep = frozenset(config.http_attributes)
        self.addrs = AddressCache()
        self._commons: dict[tuple, tuple] = {}
        self.tls: TlsAttacher | None = None
        self._stats = None
        self._lock = threading.Lock()
        self._ring: RingBuffer | None = None
        self._last_expire = 0
        self.attribution = shared_attribution(config, exporter)
        self._register_health()

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        head_max = constant("http", "HTTP_HEAD_MAX")
        if not 16 <= cfg.http_head_bytes <= head_max:
            raise ConfigError(f"--http-head-bytes must be within 16..{head_max}")
        unknown = set(cfg.http_attributes) - set(ADDRESS_ATTRIBUTES)
        if unknown:
            raise ConfigError(f"--http-attributes: unknown {sorted(unknown)}; choose from "
                              f"{', '.join(ADDRESS_ATTRIBUTES)}")
        for p in cfg.tls_libs:
            if not os.path.isfile(p):
                raise ConfigError(f"--tls-lib {p}: no such file")
        obj = BpfObject.open_packaged("http")
        self.objects.append(obj)
        obj.rodata["head_bytes"] = cfg.http_head_bytes
        obj.rodata["self_tgid"] = os.getpid()
        obj.rodata["ringbuf_wakeup_bytes"] = cfg.ringbuf_wakeup_bytes
        for name, value in self.attribution.kernel_flags().items():
            obj.rodata[name] = value  # which workload ids the records carry
        obj.set_max_entries("http_events", max(cfg.ringbuf_bytes, MIN_RING_BYTES))
        obj.load()
        self._stats = obj.maps["http_stats"]
        for prog in obj.programs.values():
            if prog.name not in TLS_PROGRAMS:
                prog.attach()
        self._ring = RingBuffer(obj.maps["http_events"], event_dtype(cfg.http_head_bytes),
                                on_batch=self.on_batch, lost_map=obj.maps["http_events_lost"])
        if cfg.http_tls:
            self.tls = TlsAttacher(obj, cfg.tls_libs, cfg.tls_scan_interval_s,
                                   relocate=cfg.tls_relocate)
            self.tls.start()
        elif cfg.tls_libs:
            raise ConfigError("--tls-lib needs TLS tracing (drop --no-http-tls)")

    def rings(self) -> list[RingBuffer]:
        return [self._ring] if self._ring is not None else []

    def tick(self) -> None:
        now = time.monotonic_ns()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self._last_expire = now
            self.expire()

    def collect(self) -> None:
        self.expire()

    def close(self) -> None:
        if self.tls is not None:
            self.tls.stop()
        self._stats = None
        super().close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def expire(self) -> None:
        with self._lock:
            self.table.expire(time.monotonic_ns())

    # --- the ring callback (poller thread) ---------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        offset = epoch_offset_ns()
        hb = recs.dtype.fields["head"][0].shape[0]
        heads = recs["head"].tobytes()
        pid, conn, op, length, hlen = (recs[k].tolist() for k in
                                       ("pid", "conn", "op", "len", "head_len"))
        start, end, tls = recs["start_ns"].tolist(), recs["end_ns"].tolist(), recs["tls"].tolist()
        out: list[Exchange] = []
        counts, capture, table = self.counts, self.capture, self.table
        cols = None
        with self._lock:
            for i in range(len(op)):
                key = (pid[i], conn[i])
                o = op[i]
                c = table.get(key, end[i])
                if o == OP_CLOSE:
                    if c is not None:
                        table.pop(key)
                        c.close(end[i], out)
                    continue
                if o == OP_EOF:
                    if c is not None:
                        c.close(end[i], out)
                    continue
                if c is None:
                    if cols is None:
                        cols = (recs["family"].tolist(), recs["lport"].tolist(),
                                recs["rport"].tolist(), recs["laddr"].tobytes(),
                                recs["raddr"].tobytes(), recs["comm"].tobytes(),
                                recs["cgroup_id"].tolist(), recs["netns"].tolist())
                    c = table.add(Conn(key, self._info(cols, i), bool(tls[i])), end[i])
                    c.origin = (cols[6][i], cols[7][i])
                if o == OP_SENDFILE:
                    c.feed(OUT, b"", length[i], start[i], end[i], counts, capture, out)
                    continue
                b = i * hb
                c.feed(IN if o == OP_READ else OUT, heads[b:b + hlen[i]], length[i], start[i],
                       end[i], counts, capture, out)
        if out:
            self._emit(out, offset)

    def _info(self, cols: tuple, i: int) -> tuple:
        """(family, local address, local port, remote address, remote port, comm) of
        record ``i``, from the batch's columns (made once per new connection)."""
        fam, lport, rport, laddr, raddr, comm = cols[:6]
        name = comm[16 * i:16 * i + 16].split(b"\0", 1)[0].decode(errors="replace")
        f = fam[i]
        if f == 0:
            return (0, "", 0, "", 0, name)
        return (f, self._addr(laddr[16 * i:16 * i + 16]), lport[i],
                self._addr(raddr[16 * i:16 * i + 16]), rport[i], name)

    def _addr(self, raw: bytes) -> str:
        return self.addrs.text(raw)  # IPv4 records are IPv4-mapped (bpf/http.h)

    # --- telemetry -----------------------------------------------------------------
    def _conn_attrs(self, c: Conn) -> tuple:
        """(span attributes, histogram attributes, span resource key) of one
        connection, made once. The connection's pod/container (from the caller's
        cgroup and the socket's namespace, ``--attribution``) goes on the span's
        resource and, as resource attributes the otlp layer moves onto a resource
        of their own, on the histogram points; the process on metrics only at
        ``--attribution process``."""
        fam, laddr, lport, raddr, rport, comm = c.info
        if c.role == SERVER:
            srv_addr, srv_port, cli_addr = laddr, lport, raddr
        else:
            srv_addr, srv_port, cli_addr = raddr, rport, laddr
        span = (("server.address", srv_addr), ("server.port", srv_port),
                ("client.address", cli_addr), ("network.peer.address", raddr),
                ("network.peer.port", rport), ("process.pid", c.key[0]),
                ("process.executable.name", comm))
        hist = tuple(kv for kv in span[:4] if kv[0] in self.keep)
        res = None
        a = self.attribution
        if a.enabled:
            if a.per_process:
                hist += span[5:]
            w, res = a.socket_resource(*c.origin)
            hist += tuple(w.items())
        c.attrs = (span, hist, res)
        return c.attrs

    def _emit(self, done: list[Exchange], offset: int) -> None:
        spans, server_h, client_h = [], [], []
        route, capture_query = self.route, self.config.http_capture_query
        commons = self._commons
        for c, req, req_ns, resp, resp_ns, error in done:
            span_part, hist_part, res = c.attrs or self._conn_attrs(c)
            server = c.role == SERVER
            target = req.target
            if target.startswith(("http://", "https://")):  # absolute form (proxies)
                target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
            path, _, query = target.partition("?")
            status = resp.status if resp is not None else 0
            ckey = (req.method, path, req.version, c.tls, status)
            common = commons.get(ckey)
            if common is None:
                r = route(path)
                common = (("http.request.method", req.method),
                          ("url.scheme", "https" if c.tls else "http"),
                          ("network.protocol.version", req.version), ("http.route", r))
                if status:
                    common += (("http.response.status_code", status),)
                common = (common, (("url.path", path),), f"{req.method} {r}")
                if len(commons) >= 65536:
                    commons.clear()
                commons[ckey] = common
            common, path_part, name = common
            if error is None and (status >= 500 or (not server and status >= 400)):
                error = str(status)
            attrs = common + path_part + span_part
            if capture_query and query:
                attrs += (("url.query", query),)
            if req.captured:
                attrs += tuple((f"http.request.header.{k}", v) for k, v in req.captured.items())
            parent = parse_traceparent(req.traceparent) if req.traceparent else None
            start = req_ns + offset
            end = max(resp_ns + offset, start)
            spans.append(SpanRecord(start, end, name, attrs, error,
                                    SPAN_KIND_SERVER if server else SPAN_KIND_CLIENT,
                                    parent[0] if parent else None,
                                    parent[1] if parent else None, resource=res))
            hkey = common + hist_part
            if error is not None:
                hkey += (("error.type", error),)
            (server_h if server else client_h).append((hkey, (end - start) / 1e9))
        self.spans_dropped += self.exporter.submit_spans(spans)
        if server_h:
            self.server_duration.record_batch(server_h)
        if client_h:
            self.client_duration.record_batch(client_h)

    def _register_health(self) -> None:
        t, n = self.exporter, self.counts

        def kernel_stats():
            if self._stats is None:
                return []
            return [(self._stats.sum_u64(i), {"reason": r}) for i, r in enumerate(KERNEL_STATS)]

        t.observe("ebpf_otlp.http.messages", "{message}", "HTTP message heads parsed",
                  lambda: [(v, {"kind": k}) for k, v in dict(n.messages).items()])
        t.observe("ebpf_otlp.http.malformed", "{message}",
                  "HTTP heads that did not parse, by reason",
                  lambda: [(v, {"reason": k}) for k, v in dict(n.malformed).items()])
        t.observe("ebpf_otlp.http.requests.unanswered", "{request}",
                  "requests without a span: evicted, expired, too many pending",
                  lambda: [(v, {"reason": k}) for k, v in dict(n.unanswered).items()])
        t.observe("ebpf_otlp.http.responses.unmatched", "{response}",
                  "responses with no request waiting for them", lambda: [(n.unmatched, {})])
        t.observe("ebpf_otlp.http.bytes.unparsed", "By",
                  "bytes on HTTP connections that could not be followed (garbage, bodies "
                  "of unknown length, data beyond the copied head)",
                  lambda: [(n.bytes_unparsed, {})])
        t.observe("ebpf_otlp.http.records.ignored", "{record}",
                  "records on upgraded connections or against the connection's role",
                  lambda: [(n.records_ignored, {})])
        t.observe("ebpf_otlp.http.connections.dropped", "{connection}",
                  "connection states let go before they closed",
                  lambda: [(n.conns_evicted, {"reason": "evicted"}),
                           (n.conns_expired, {"reason": "expired"})])
        t.observe("ebpf_otlp.http.connections", "{connection}", "connections followed",
                  lambda: [(len(self.table), {})], kind="gauge")
        t.observe("ebpf_otlp.http.kernel.untracked", "{event}",
                  "calls the kernel side could not follow, by reason", kernel_stats)
        t.observe("ebpf_otlp.http.tls.libraries", "{file}",
                  "TLS library files with SSL uprobes attached",
                  lambda: [(len(self.tls.files) if self.tls else 0, {})], kind="gauge")
        t.observe("ebpf_otlp.http.spans.dropped", "{span}",
                  "HTTP spans the span queue had no room for (export failures are in "
                  "ebpf_otlp.spans.dropped)",
                  lambda: [(self.spans_dropped, {"reason": "queue_full"})])


__all__ = ["ADDRESS_ATTRIBUTES", "CLIENT", "HttpSignal", "event_dtype"]
