"""The HTTP signal: kernel records in, spans and duration histograms out."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

import numpy as np

from ...config import ConfigError
from ...otlp.sampling import NO_PARENT, PARENT_NOT_SAMPLED, PARENT_SAMPLED
from ...otlp.semconv import AddressCache
from ...otlp.spans import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, SpanGroup
from ...platform.bpfobj import BpfObject
from ...platform.cgroups import pid_cgroup_id
from ...platform.host import cgroup2_mount, epoch_offset_ns
from ...platform.layout import constant, record_dtype
from ...platform.ringbuf import HeldBatches, RingBuffer
from ..attribution import shared as shared_attribution
from ..base import Signal
from .capture import capture_mode, unused_programs
from .conn import CLIENT, IN, OUT, SERVER, Conn, ConnTable, Counts, Exchange
from .kinds import ConnKinds
from .parse import Head, WholeHeads, parse_traceparent_flags
from .route import RouteTemplater
from .tls import PROGRAMS as TLS_PROGRAMS
from .tls import TlsAttacher

log = logging.getLogger(__name__)

OP_READ, OP_WRITE, OP_SENDFILE, OP_EOF, OP_CLOSE = 1, 2, 3, 4, 5
# The HTTP semantic conventions' advice for request durations, in seconds.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                         7.5, 10.0)
EXPIRE_EVERY_NS = 1_000_000_000
PACE_RECORDS = 256  # a drain smaller than this: wait one poll interval (PacedRing)
FLUSH_RECORDS = 1024  # held records decoded at the end of a poll (else after hold_s)
HOLD_RECORDS = 4096  # ring records held before decoding them without waiting for the poll
# Records are ~370 bytes with the default head; 16 MiB hold ~45,000 calls.
MIN_RING_BYTES = 16 << 20
KERNEL_STATS = ("calls_untracked", "fds_untracked", "ssl_calls_untracked", "ssl_no_fd",
                "read_failed")


def _connections(pid: np.ndarray, conn: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The distinct (pid, socket) keys of a batch and, per record, its key's index:
    one sort by socket address; when two processes share a socket address in
    the batch (a fork, or a socket freed by one process and allocated again for
    another: new connections), one sort by (socket, pid)."""
    n = len(pid)
    order = np.argsort(conn, kind="stable")
    sc = conn[order]
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(sc[1:], sc[:-1], out=new[1:])
    sp = pid[order]
    if not (new[1:] | (sp[1:] == sp[:-1])).all():
        order = np.lexsort((pid, conn))
        sc, sp = conn[order], pid[order]
        np.not_equal(sc[1:], sc[:-1], out=new[1:])
        new[1:] |= sp[1:] != sp[:-1]
    inv = np.empty(n, np.intp)
    inv[order] = np.cumsum(new) - 1
    return list(zip(sp[new].tolist(), sc[new].tolist())), inv


# The first two bytes of a message head: request methods and "HTTP".
_STARTS = np.zeros(1 << 16, bool)
_STARTS[[int.from_bytes(w, "big") for w in (b"GE", b"PO", b"PU", b"HE", b"DE", b"PA", b"OP",
                                            b"CO", b"TR", b"HT")]] = True
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


class PacedRing(RingBuffer):
    """The HTTP ring, paced: after a drain that found fewer than PACE_RECORDS
    records, the poller thread waits one poll interval before polling again,
    so nginx and wrk writing all the time are read in batches of what one
    interval brings, not one ``--ringbuf-wakeup-bytes`` wake-up at a time.
    Measured here with the edge-triggered poller (bench/http_load.py, agent
    CPU per 1,000 requests): fewer wake-ups and bigger batches cost the agent
    and the traced processes less. The other rings on the poller wait the same
    interval at most, as they do for the poll timer; the HTTP ring holds far
    more than one interval of records (MIN_RING_BYTES)."""

    def __init__(self, *args: object, pace_s: float = 0.05, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.pace_s = pace_s

    def drain(self, limit: int = 1 << 30) -> int:
        n = super().drain(limit)
        if 0 < n < PACE_RECORDS:
            time.sleep(self.pace_s)
        return n


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
        # Exchanges measured but not exported as spans by the sampler's decision:
        # not a loss (the histograms hold every exchange).
        self.spans_sampled_out = 0
        self.sampler = config.http_sampler()
        self.counts = Counts()
        self.table = ConnTable(config.http_max_conns, int(config.http_idle_s * 1e9), self.counts)
        self.route = RouteTemplater(config.http_route_patterns)
        self.capture = frozenset(h.lower() for h in config.http_capture_headers)
        self.whole = WholeHeads(self.capture)
        self.keep = frozenset(config.http_attributes)
        self.addrs = AddressCache()
        self._commons: dict[tuple, tuple] = {}
        self._kind_attrs: dict[tuple, tuple] = {}  # per connection kind (_conn_attrs)
        self._kinds_of: tuple[np.dtype, ConnKinds] | None = None  # their records' bytes
        # A process's name and cgroup (ConnKinds.ids bytes) by pid: the kernel
        # sends them on its first record per connection only.
        self._proc_ids: dict[int, bytes] = {}
        self._cgroup_mount: str | None = None
        self.tls: TlsAttacher | None = None
        self.capture_mode = ""  # socket or syscall, from start()
        self._stats = None
        self._lock = threading.Lock()
        self._held = HeldBatches(HOLD_RECORDS)  # ring batches not decoded yet (ring_batch)
        self.hold_s = config.poll_interval_ms / 1000
        self._flush_lock = threading.Lock()  # one flush at a time: records stay in order
        self.records_failed = 0
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
        self.capture_mode = capture_mode(cfg.http_capture)
        for name in unused_programs(self.capture_mode):
            obj.programs[name].autoload = False
        obj.load()
        self._stats = obj.maps["http_stats"]
        for prog in obj.programs.values():
            if prog.name not in TLS_PROGRAMS and prog.autoload:
                prog.attach()
        log.info("HTTP: plaintext from the %s", "socket tracepoints"
                 if self.capture_mode == "socket" else "syscall exit (every syscall pays)")
        self._ring = PacedRing(obj.maps["http_events"], event_dtype(cfg.http_head_bytes),
                               on_batch=self.ring_batch, lost_map=obj.maps["http_events_lost"],
                               pace_s=cfg.poll_interval_ms / 1000)
        if cfg.http_tls:
            self.tls = TlsAttacher(obj, cfg.tls_libs, cfg.tls_scan_interval_s,
                                   relocate=cfg.tls_relocate)
            self.tls.start()
        elif cfg.tls_libs:
            raise ConfigError("--tls-lib needs TLS tracing (drop --no-http-tls)")

    def rings(self) -> list[RingBuffer]:
        return [self._ring] if self._ring is not None else []

    def tick(self) -> None:
        if self._held.count >= FLUSH_RECORDS or self._held.waited() >= self.hold_s:
            self.flush()
        now = time.monotonic_ns()
        if now - self._last_expire >= EXPIRE_EVERY_NS:
            self._last_expire = now
            self.expire()

    def collect(self) -> None:
        self.flush()
        self.expire()

    def close(self) -> None:
        self.flush()
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
    def ring_batch(self, recs: np.ndarray) -> None:
        """The ring's callback: batches are held until FLUSH_RECORDS wait at a
        poll's end (``tick``), the oldest waited one poll interval, or
        HOLD_RECORDS wait, so the per-batch work of ``on_batch`` (~0.2 ms
        here) is spread over many records however the ring was drained (a
        wake-up per ``--ringbuf-wakeup-bytes``, split at the ring's wrap or at
        a record not committed yet). Spans keep kernel times: holding delays
        them, it does not change them. The ring gives copies, so holding them
        is safe."""
        if self._held.add(recs):
            self.flush()

    def flush(self) -> None:
        """Decode what ``ring_batch`` holds, in order (poller and export threads)."""
        with self._flush_lock:
            recs = self._held.take()
            if recs is None:
                return
            # No cyclic GC within a batch: its per-record lists and exchanges
            # (tens of thousands of references) would be walked by every young
            # collection that the batch's allocations start, ~25 % of the agent's
            # CPU on new connections (bench/http_replay.py). What the batch leaves
            # behind is collected after it as usual (nothing here makes cycles).
            was = gc.isenabled()
            gc.disable()
            try:
                self.on_batch(recs)
            except Exception:  # as RingBuffer does for a consumer that raises
                first = not self.records_failed
                self.records_failed += len(recs)
                if first:
                    log.exception("HTTP: a batch of %d records failed (counted in "
                                  "ebpf_otlp.http.records.failed)", len(recs))
            finally:
                if was:
                    gc.enable()

    def on_batch(self, recs: np.ndarray) -> None:
        """One batch of records, decoded now. Per batch, with numpy: the connection
        of each record (one table lookup per connection, not per record) and which records hold
        a whole message head at their start (their heads parsed once, from the
        parse cache mostly). Per record, in Python, only what depends on the
        connection's state: a body-only record (``sendfile``, a read within a
        body) moves a byte count; a record starting with a whole head on an idle
        stream is paired directly; anything else goes through ``Conn.feed``."""
        n = len(recs)
        if n == 0:
            return
        offset = epoch_offset_ns()
        hb = recs.dtype.fields["head"][0].shape[0]
        ukeys, inv = _connections(recs["pid"], recs["conn"])
        last = np.zeros(len(ukeys), np.uint64)
        np.maximum.at(last, inv, recs["end_ns"])
        op, length, hlen = recs["op"].tolist(), recs["len"].tolist(), recs["head_len"].tolist()
        start, end, tls = recs["start_ns"].tolist(), recs["end_ns"].tolist(), recs["tls"].tolist()
        heads = recs["head"].tobytes()
        counts, capture, table = self.counts, self.capture, self.table
        parsed = self._whole_heads(recs, heads, hb)
        inv_l = inv.tolist()
        out: list[Exchange] = []
        cols = None
        with self._lock:
            last_l = last.tolist()
            conns = [table.get(k, t) for k, t in zip(ukeys, last_l)]
            where = {k: j for j, k in enumerate(ukeys)}

            def evicted(old: Conn) -> None:
                j = where.get(old.key)
                if j is not None and conns[j] is old:
                    conns[j] = None

            table.on_evict = evicted
            try:
                for i in range(n):
                    j = inv_l[i]
                    c = conns[j]
                    o = op[i]
                    if o >= OP_EOF:
                        if c is not None:
                            if o == OP_CLOSE:
                                table.pop(c.key)
                                conns[j] = None
                            c.close(end[i], out)
                        continue
                    if c is None:
                        if cols is None:
                            kinds = self._conn_kinds(recs.dtype)
                            cols = (recs["lport"].tolist(), recs["rport"].tolist(),
                                    kinds.columns(recs), kinds.width, recs["ids"].tolist())
                        lports, rports, kb, kw, ids = cols
                        key, pid = kb[kw * i:kw * i + kw], ukeys[j][0]
                        if ids[i]:
                            self._remember_ids(pid, key[kinds.ids])
                        else:
                            key = kinds.with_ids(key, self._process_ids(kinds, pid, recs, i, kb,
                                                                        kw))
                        fam, la, ra, name, origin = kinds.kind(key)
                        info = ((fam, la, lports[i], ra, rports[i], name) if fam else
                                (0, "", 0, "", 0, name))
                        c = conns[j] = table.add(Conn(ukeys[j], info, bool(tls[i])), end[i])
                        c.origin = origin
                    total = length[i]
                    if c.upgraded:
                        counts.records_ignored += 1
                        continue
                    d = IN if o == OP_READ else OUT
                    s = c.streams[d]
                    bl = s.body_left
                    if bl >= total:  # within a body: sendfile, a read of body bytes
                        s.body_left = bl - total
                        continue
                    if o == OP_SENDFILE:
                        c.feed(OUT, b"", total, start[i], end[i], counts, capture, out)
                        continue
                    h = parsed[i]
                    if h is not None and bl == 0 and not s.chunked and s.buf is None:
                        s.lost = False  # a whole head at the start: as Conn.feed would
                        c.body(s, c.pair(d, h, start[i] if d == OUT else end[i], end[i],
                                         counts, out))
                        rest = total - h.length
                        if rest:
                            if 0 < rest <= s.body_left:  # the body's first bytes
                                s.body_left -= rest
                                continue
                            b = i * hb
                            c.feed(d, heads[b:b + hlen[i]], total, start[i], end[i], counts,
                                   capture, out, h.length)
                        continue
                    b = i * hb
                    c.feed(d, heads[b:b + hlen[i]], total, start[i], end[i], counts, capture,
                           out)
            finally:
                table.on_evict = None
            for c, t in zip(conns, last_l):
                if c is not None:
                    c.last_ns = t
        if out:
            self._emit(out, offset)

    def _remember_ids(self, pid: int, ids: bytes) -> None:
        """A process's name and cgroup (``ConnKinds.ids`` bytes), as last seen."""
        if self._proc_ids.get(pid) != ids:
            if len(self._proc_ids) >= 65536:
                self._proc_ids.clear()  # bounded: a miss reads /proc
            self._proc_ids[pid] = ids

    def _process_ids(self, kinds: ConnKinds, pid: int, recs: np.ndarray, i: int, kb: bytes,
                     kw: int) -> bytes:
        """The name and cgroup of record ``i``'s process (a record without
        them): its last ones, else those of a later record of the batch (two
        threads of it raced for the first record), else /proc's (that record
        lost, or the table cleared)."""
        ids = self._proc_ids.get(pid)
        if ids is None:
            later = np.flatnonzero((recs["pid"][i:] == pid) & (recs["ids"][i:] != 0))
            if len(later):
                k = i + int(later[0])
                ids = kb[kw * k:kw * k + kw][kinds.ids]
            else:
                ids = self._ids_from_proc(pid)
            self._remember_ids(pid, ids)
        return ids

    def _ids_from_proc(self, pid: int) -> bytes:
        """A process's name and cgroup id as the kernel would give them."""
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().rstrip(b"\n")[:15]
        except OSError:
            comm = b""
        cg = 0
        if self.attribution.kernel_flags().get("keep_cgroup", 1):
            if self._cgroup_mount is None:
                self._cgroup_mount = cgroup2_mount() or ""
            cg = pid_cgroup_id(pid, self._cgroup_mount)
        self.counts.ids_from_proc += 1
        return comm.ljust(16, b"\0") + cg.to_bytes(8, "little")

    def _whole_heads(self, recs: np.ndarray, heads: bytes, hb: int) -> list[Head | None]:
        """Per record: the message head its copied bytes start with, when they
        hold all of it (found with numpy by the first two bytes, then the blank
        line), else None."""
        n = len(recs)
        out: list[Head | None] = [None] * n
        h = recs["head"]
        word = (h[:, 0].astype(np.intp) << 8) | h[:, 1]
        op = recs["op"]
        hl = recs["head_len"]
        cand = np.flatnonzero(_STARTS[word] & (hl >= 16) & ((op == OP_READ) | (op == OP_WRITE)))
        if not len(cand):
            return out
        known = self.whole.by_copy
        miss = self.whole.copied
        for i, k in zip(cand.tolist(), hl[cand].tolist()):
            b = i * hb
            data = heads[b:b + k]
            h = known.get(data, False)
            out[i] = miss(data) if h is False else h
        return out

    def _conn_kinds(self, dtype: np.dtype) -> ConnKinds:
        """The kinds of new connections, for records of ``dtype`` (one per signal)."""
        if self._kinds_of is None or self._kinds_of[0] != dtype:
            self._kinds_of = (dtype, ConnKinds(dtype, self.addrs))
        return self._kinds_of[1]

    # --- telemetry -----------------------------------------------------------------
    def _conn_attrs(self, c: Conn) -> tuple:
        """(kind, peer port) of one connection, made once. The kind, (span
        attributes but ``network.peer.port``, histogram attributes, span resource
        key, is server), is one object shared by the connections that differ only
        in the peer's port (a client's new connections, their servers' sides):
        a batch groups exchanges by it. The connection's pod/container (from the
        caller's cgroup and the socket's namespace, ``--attribution``) goes on the
        span's resource and, as resource attributes the otlp layer moves onto a
        resource of their own, on the histogram points; the process on metrics
        only at ``--attribution process``."""
        fam, laddr, lport, raddr, rport, comm = c.info
        server = c.role == SERVER
        key = (server, laddr, lport if server else rport, raddr, comm, c.key[0], c.origin)
        kind = self._kind_attrs.get(key)
        if kind is None:
            if server:
                srv_addr, srv_port, cli_addr = laddr, lport, raddr
            else:
                srv_addr, srv_port, cli_addr = raddr, rport, laddr
            span = (("server.address", srv_addr), ("server.port", srv_port),
                    ("client.address", cli_addr), ("network.peer.address", raddr),
                    ("process.pid", c.key[0]), ("process.executable.name", comm))
            hist = tuple(kv for kv in span[:4] if kv[0] in self.keep)
            res = None
            a = self.attribution
            if a.enabled:
                if a.per_process:
                    hist += span[4:]
                w, res = a.socket_resource(*c.origin)
                hist += tuple(w.items())
            kind = (span, hist, res, server)
            if len(self._kind_attrs) >= 65536:
                self._kind_attrs.clear()  # bounded; connections keep theirs
            self._kind_attrs[key] = kind
        c.attrs = (kind, rport)
        return c.attrs

    def _group(self, c: Conn, req, status: int, error: str | None) -> tuple:
        """(SpanGroup, histogram attributes, is server) shared by every exchange of
        connections of ``c``'s kind with this request line, status and closing error."""
        span_part, hist_part, res, server = c.attrs[0]
        target = req.target
        if target.startswith(("http://", "https://")):  # absolute form (proxies)
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("?")
        ckey = (req.method, path, req.version, c.tls, status)
        commons = self._commons
        common = commons.get(ckey)
        if common is None:
            r = self.route(path)
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
        if self.config.http_capture_query and query:
            attrs += (("url.query", query),)
        if req.captured:
            attrs += tuple((f"http.request.header.{k}", v) for k, v in req.captured.items())
        hkey = common + hist_part
        if error is not None:
            hkey += (("error.type", error),)
        kind = SPAN_KIND_SERVER if server else SPAN_KIND_CLIENT
        return SpanGroup(name, attrs, error, kind, res), hkey, server

    def _emit(self, done: list[Exchange], offset: int) -> None:
        """Every exchange into its histogram; the sampled ones into spans. Exchanges
        of one connection with the same request line, status and error share one
        group (attributes, span name, histogram key), made once per batch."""
        index: dict[tuple, int] = {}
        groups: list[tuple] = []
        gof: list[int] = []
        t0: list[int] = []
        t1: list[int] = []
        parents: list[tuple[int, str]] = []
        cap = bool(self.capture)
        ports: list[int] = []
        for j, (c, req, req_ns, resp, resp_ns, error) in enumerate(done):
            status = resp.status if resp is not None else 0
            kind, port = c.attrs or self._conn_attrs(c)
            ports.append(port)
            key = (id(kind), req.method, req.target, status, error)
            if cap and req.captured:
                key += tuple(req.captured.items())
            g = index.get(key)
            if g is None:
                g = index[key] = len(groups)
                groups.append(self._group(c, req, status, error))
            gof.append(g)
            t0.append(req_ns)
            t1.append(resp_ns)
            if req.traceparent:
                parents.append((j, req.traceparent))
        start = np.array(t0, np.int64) + offset
        end = np.maximum(np.array(t1, np.int64) + offset, start)
        secs = (end - start) / 1e9
        g_arr = np.array(gof, np.int64)
        if len(groups) <= 16:  # keep-alive: a few groups per batch, one array each
            for g, (_, hkey, server) in enumerate(groups):
                (self.server_duration if server else self.client_duration).record_many(
                    hkey, secs[g_arr == g])
        else:
            server_h, client_h = [], []
            for g, d in zip(gof, secs.tolist()):
                _, hkey, server = groups[g]
                (server_h if server else client_h).append((hkey, d))
            if server_h:
                self.server_duration.record_batch(server_h)
            if client_h:
                self.client_duration.record_batch(client_h)
        self._spans(start, end, g_arr, [g[0] for g in groups], parents, ports)

    def _spans(self, start: np.ndarray, end: np.ndarray, gof: np.ndarray,
               groups: list[SpanGroup], parents: list[tuple[int, str]],
               ports: list[int]) -> None:
        """Sample (``self.sampler``), then encode and queue the spans kept; the
        others are counted in ``spans_sampled_out`` (not a loss)."""
        n = len(start)
        sampler = self.sampler
        if sampler.name == "always_off":
            self.spans_sampled_out += n
            return
        trace_ids = None
        parent_ids: list[bytes | None] | None = None
        pflag = None
        if parents or not sampler.keeps_all:
            trace_ids = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
            pflag = np.full(n, NO_PARENT, np.int8)
        if parents:
            parent_ids = [None] * n
            for j, tp in parents:
                p = parse_traceparent_flags(tp)
                if p is not None:
                    trace_ids[j] = np.frombuffer(p[0], np.uint8)
                    parent_ids[j] = p[1]
                    pflag[j] = PARENT_SAMPLED if p[2] & 1 else PARENT_NOT_SAMPLED
        if not sampler.keeps_all:
            keep = sampler.decide(trace_ids, pflag)
            k = int(keep.sum())
            self.spans_sampled_out += n - k
            if k == 0:
                return
            if k < n:
                sel = np.flatnonzero(keep)
                start, end, gof, trace_ids = start[sel], end[sel], gof[sel], trace_ids[sel]
                picked = sel.tolist()
                ports = [ports[i] for i in picked]
                if parent_ids is not None:
                    parent_ids = [parent_ids[i] for i in picked]
        if parent_ids is not None and not any(parent_ids):
            parent_ids = None
        self.spans_dropped += self.exporter.submit_span_groups(
            start, end, gof, groups, [("network.peer.port", ports)], trace_ids=trace_ids,
            parent_ids=parent_ids)

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
        t.observe("ebpf_otlp.http.records.failed", "{record}",
                  "records whose batch raised in the agent (a bug; logged once)",
                  lambda: [(self.records_failed, {})])
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
        t.observe("ebpf_otlp.http.spans.sampled_out", "{span}",
                  "HTTP exchanges measured (in the duration histograms) but not exported "
                  "as spans by the trace sampler's decision (not a loss)",
                  lambda: [(self.spans_sampled_out, {"sampler": self.sampler.describe()})])
        t.observe("ebpf_otlp.http.spans.dropped", "{span}",
                  "HTTP spans the span queue had no room for (export failures are in "
                  "ebpf_otlp.spans.dropped)",
                  lambda: [(self.spans_dropped, {"reason": "queue_full"})])


__all__ = ["ADDRESS_ATTRIBUTES", "CLIENT", "HttpSignal", "event_dtype"]
