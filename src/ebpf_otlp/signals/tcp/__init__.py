"""TCP health: connection lifecycle, handshake latency, RTT, retransmits,
resets and failures, from tracepoints and sock_ops only (``bpf/tcp.bpf.c``).

Counts are aggregated in the kernel per exported key (``counters.py``):
opened connections, the ``active`` gauge (+1 at ESTABLISHED, -1 at CLOSE
of the same tracked socket, so it cannot drift), retransmitted segments and
resets; two alternating tables, drained once per export interval. Discrete
events (open, close, failure, RTT sample) arrive on one ring buffer of
fixed-size records, decoded and aggregated per batch with numpy: histogram
values, bytes and failures per attribute group, one update per instrument
and group per batch.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from ...config import ConfigError
from ...otlp.spans import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, SpanRecord
from ...platform.bpfobj import BpfObject
from ...platform.btf import kernel_structs
from ...platform.host import epoch_offset_ns
from ...platform.layout import constant
from ...platform.libbpf import BpfError
from ...platform.ringbuf import RingBuffer
from ...platform.tables import AlternatingTables
from ..attribution import shared as shared_attribution
from ..base import Signal
from . import agg, counters
from .kernel import OPTIONAL, VARIANTS, attach_sockops
from .records import (
    EV_CLOSE,
    EV_FAIL,
    EV_OPEN,
    EV_RTT,
    EVENT,
    F_ROLE_GUESSED,
    F_TRACKED,
    AttributeMapper,
    failure_cause,
)

log = logging.getLogger(__name__)

# tcp_stats indexes -> health attribute (bpf/tcp.h TCP_STAT_*)
_STATS = {constant("tcp", "TCP_STAT_COUNTERS_FULL"): "counter_map_full",
          constant("tcp", "TCP_STAT_SOCKS_FULL"): "socket_map_full"}
_SYN_MISS = constant("tcp", "TCP_STAT_SYN_MISS")
_STALE = constant("tcp", "TCP_STAT_STALE")
RTT_SAMPLE_S = 1.0  # one RTT sample per connection per second
COUNTER_TABLES = ("counters_a", "counters_b")



class TcpSignal(Signal):
    name = "tcp"

    def __init__(self, config, exporter):
        super().__init__(config, exporter)
        try:
            self.mapper = AttributeMapper(config.tcp_attributes)
        except ValueError as e:  # a bad flag: one line and exit status 2, no traceback
            raise ConfigError(f"--tcp-attributes: {e}") from None
        m = exporter.meter
        self.opened = m.create_counter(
            "network.tcp.connections.opened", "{connection}",
            "TCP connections that completed the handshake")
        self.failed = m.create_counter(
            "network.tcp.connections.failed", "{connection}",
            "client handshakes that ended without ESTABLISHED, by error.type")
        self.active = m.create_up_down_counter(
            "network.tcp.connections.active", "{connection}",
            "established TCP connections opened since the agent started and not yet closed")
        self.duration = exporter.histogram(
            "network.tcp.connection.duration", "s",
            "from the first SYN (sent or received) to CLOSE")
        self.handshake = exporter.histogram(
            "network.tcp.handshake.duration", "s",
            "client: SYN sent to ESTABLISHED; server: SYN received to ESTABLISHED")
        self.rtt = exporter.histogram(
            "network.tcp.rtt", "s",
            "smoothed RTT of live connections, sampled once per second per connection")
        self.retransmits = m.create_counter(
            "network.tcp.retransmits", "{segment}",
            "retransmitted segments, counted as the kernel's RetransSegs")
        self.resets = m.create_counter("network.tcp.resets", "{reset}",
                                       "TCP resets sent (transmit) and received (receive)")
        self.bytes = m.create_counter("network.tcp.bytes", "By",
                                      "payload bytes of closed connections, per direction")
        self.spans = config.tcp_spans
        self.attribution = shared_attribution(config, exporter)
        if self.attribution.enabled:
            self.mapper.resource = self.attribution.socket
            if self.attribution.per_process:
                self.mapper.keep |= {"process.pid", "process.executable.name"}
        self._ring: RingBuffer | None = None
        self._obj: BpfObject | None = None
        self._tables: AlternatingTables | None = None
        self._keys: dict[bytes, dict] = {}  # counter key -> attributes (bounded)
        self._drain_lock = threading.Lock()
        self._byte_sums = agg.Sums()  # per series, until export()
        self._fail_sums = agg.Sums()
        self._derived: dict[tuple, dict] = {}
        self.sockops_attached = False
        self.bad_records = 0
        self.untracked_closes = 0
        self._stats_seen: dict[int, int] = {}
        self._register_health()

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        obj = BpfObject.open_packaged("tcp")
        self.objects.append(obj)
        self._obj = obj
        keep = self.mapper.keep
        obj.rodata["keep_saddr"] = int("server.address" in keep)
        obj.rodata["keep_sport"] = int("server.port" in keep)
        obj.rodata["keep_caddr"] = int("client.address" in keep)
        obj.rodata["keep_cport"] = int("client.port" in keep)
        obj.rodata["rtt_sample_ns"] = int(RTT_SAMPLE_S * 1e9)
        for name, value in self.attribution.kernel_flags().items():
            obj.rodata[name] = value  # counter keys split per workload only when exported
        # Nothing here waits on a single record (the poller also drains every
        # poll interval), so wake up per eighth of the ring: batches of ~4,000
        # records cost ~0.5 us each instead of ~1 us at 500 (bench/tcp_churn.py).
        obj.rodata["ringbuf_wakeup_bytes"] = max(cfg.ringbuf_wakeup_bytes,
                                                 cfg.ringbuf_bytes // 8)
        obj.set_max_entries("tcp_events", cfg.ringbuf_bytes)
        obj.set_max_entries("socks", cfg.tcp_max_sockets)
        self._tables = AlternatingTables(obj, "counters_active", COUNTER_TABLES)
        # Distinct (role, server, kind) keys with retransmits, resets or opens in one
        # interval: a quarter of the flow table is ample, and keeps the default agent
        # under 64 MiB of kernel memory at 256 CPUs (tests/app/test_kmem.py).
        self._tables.set_max_entries(max(1024, min(cfg.max_flows // 4, 1 << 20)))
        self._pick_variants(obj)
        obj.load()
        for prog in obj.programs.values():
            if not prog.autoload or not prog.section.startswith("tracepoint/"):
                continue
            _, cat, tp = prog.section.split("/")
            try:
                prog.attach_tracepoint(cat, tp)
            except (BpfError, OSError) as e:
                if prog.name not in OPTIONAL:
                    raise
                log.warning("tcp: %s:%s not attached (%s): passive opens keep no owner",
                            cat, tp, e)
        try:
            attach_sockops(obj.programs["tcp_sockops"], cfg.cgroup())
            self.sockops_attached = True
        except (BpfError, OSError) as e:
            # Lifecycle, bytes, retransmits and resets still work; RTT samples
            # do not, and server handshakes fall back to the SYN-ACK RTT.
            log.warning("tcp: sock_ops not attached to %s (%s): no RTT samples, server "
                        "handshake estimated from the SYN-ACK RTT", cfg.cgroup(), e)
        self._ring = RingBuffer(obj.maps["tcp_events"], EVENT, on_batch=self.on_batch,
                                lost_map=obj.maps["tcp_events_lost"])

    @staticmethod
    def _pick_variants(obj: BpfObject) -> None:
        wanted = {n for new, _, old in VARIANTS.values() for n in (new, old)}
        have = kernel_structs(wanted)
        for new_prog, (new_struct, old_prog, old_struct) in VARIANTS.items():
            use_new = new_struct in have or old_struct not in have
            obj.programs[new_prog].autoload = use_new
            obj.programs[old_prog].autoload = not use_new
            if not use_new:
                log.info("tcp: older kernel record layout, using %s", old_prog)

    def rings(self) -> list[RingBuffer]:
        return [self._ring] if self._ring is not None else []

    def close(self) -> None:
        with self._drain_lock:
            obj = self._obj
            if obj is not None and obj.loaded and self._tables is not None:
                try:  # detach, then the last counts of both tables (the agent exports after)
                    obj.detach_all()
                    for table in self._tables.both():
                        self._ingest(*table.drain())
                except Exception:
                    log.exception("final TCP counter drain failed")
        for idx in (*_STATS, _SYN_MISS, _STALE):
            self._stat(idx)  # last values, for the final export
        self._ring = None
        self._obj = None
        self._tables = None
        super().close()

    # --- ring records (poller thread) -----------------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        """Aggregate one batch with numpy: group records by exported attributes,
        bucket histogram values per group, total counters per group (handed to
        the SDK once per interval by :meth:`export`); nothing per record."""
        kinds = recs["kind"]
        opens, closes = kinds == EV_OPEN, kinds == EV_CLOSE
        fails, rtts = kinds == EV_FAIL, kinds == EV_RTT
        bad = len(recs) - int(opens.sum() + closes.sum() + fails.sum() + rtts.sum())
        if bad:
            self.bad_records += bad
        closes_r = recs[closes] if closes.any() else recs[:0]
        fails_r = recs[fails] if fails.any() else recs[:0]
        if opens.any():
            self._on_opens(recs[opens])
        if len(closes_r):
            self._on_closes(closes_r)
        if len(fails_r):
            self._on_fails(fails_r)
        if rtts.any():
            r = recs[rtts]
            inv, groups, _, _ = self.mapper.groups(r, process=True)
            self._histogram(self.rtt, r["srtt_us"] / 1e6, inv, groups)
        if self.spans and (len(closes_r) or len(fails_r)):
            self._spans(closes_r, fails_r)
        if self.taps:  # the live views: the batch's records (EVENT dtype)
            self.tap("tcp", recs)

    @staticmethod
    def _histogram(hist, values: np.ndarray, inv: np.ndarray, groups: list[dict],
                   mask: np.ndarray | None = None) -> None:
        for g, vals in agg.split(inv, values, len(groups), mask):
            hist.record_many(tuple(groups[g].items()), vals)

    def _on_opens(self, recs: np.ndarray) -> None:
        # Opens happen in softirq for servers, before accept() names the owner:
        # handshake carries no process attributes (opened/active: kernel counters).
        inv, groups, _, _ = self.mapper.groups(recs, process=False)
        start, est = recs["start_ns"].astype(np.int64), recs["est_ns"].astype(np.int64)
        self._histogram(self.handshake, (est - start) / 1e9, inv, groups,
                        (start > 0) & (est >= start))

    def _on_closes(self, recs: np.ndarray) -> None:
        tracked = ((recs["flags"] & F_TRACKED) != 0) & (recs["est_ns"] != 0)
        self.untracked_closes += int(len(recs) - tracked.sum())
        inv, groups, _, keys = self.mapper.groups(recs, process=True)
        ng = len(groups)
        for direction, field in (("transmit", "bytes_tx"), ("receive", "bytes_rx")):
            totals = np.bincount(inv, weights=recs[field].astype(np.float64), minlength=ng)
            self._byte_sums.add([(direction, k) for k in keys],
                                [self._with(a, "network.io.direction", direction, k)
                                 for a, k in zip(groups, keys)],
                                [int(t) for t in totals.tolist()])
        start = np.where(recs["start_ns"] != 0, recs["start_ns"], recs["est_ns"]).astype(np.int64)
        end = recs["ts_ns"].astype(np.int64)
        self._histogram(self.duration, (end - start) / 1e9, inv, groups,
                        tracked & (start > 0) & (end >= start))

    def _on_fails(self, recs: np.ndarray) -> None:
        causes = agg.failure_causes(recs["cause"], recs["flags"])
        inv, groups, extras, keys = self.mapper.groups(recs, process=True, extra=causes)
        counts = np.bincount(inv, minlength=len(groups)).tolist()
        self._fail_sums.add(keys, [self._with(a, "error.type", agg.CAUSES[c], k)
                                   for a, c, k in zip(groups, extras, keys)], counts)

    def _with(self, attrs: dict, key: str, value: str, row: bytes) -> dict:
        """``attrs`` plus one attribute, cached per group (bounded)."""
        ck = (row, key, value)
        out = self._derived.get(ck)
        if out is None:
            if len(self._derived) >= 65536:
                self._derived.clear()
            out = self._derived[ck] = dict(attrs, **{key: value})
        return out

    def export(self) -> None:
        """The interval's byte and failure totals: one SDK add per series."""
        for attrs, n in self._byte_sums.take():
            self.bytes.add(n, attrs)
        for attrs, n in self._fail_sums.take():
            self.failed.add(n, attrs)

    def _spans(self, closes: np.ndarray, fails: np.ndarray) -> None:
        offset = epoch_offset_ns()
        out = []
        for rec in closes:
            start = int(rec["start_ns"]) or int(rec["est_ns"])
            flags = int(rec["flags"])
            if start and flags & F_TRACKED and int(rec["est_ns"]) and not flags & F_ROLE_GUESSED:
                out.append(self._span(rec, start + offset, int(rec["ts_ns"]) + offset, None))
        for rec in fails:
            if int(rec["start_ns"]):
                out.append(self._span(rec, int(rec["start_ns"]) + offset,
                                      int(rec["ts_ns"]) + offset,
                                      failure_cause(int(rec["cause"]), int(rec["flags"]))))
        if out:
            self.exporter.submit_spans(out)

    def _span(self, rec: np.void, start_ns: int, end_ns: int, error: str | None) -> SpanRecord:
        attrs = self.mapper.span(rec)
        attrs["network.tcp.bytes.transmit"] = int(rec["bytes_tx"])
        attrs["network.tcp.bytes.receive"] = int(rec["bytes_rx"])
        attrs["network.tcp.retransmits"] = int(rec["retrans"])
        attrs["network.tcp.segments.transmit"] = int(rec["segs_out"])
        attrs["network.tcp.segments.receive"] = int(rec["segs_in"])
        if int(rec["srtt_us"]):
            attrs["network.tcp.rtt"] = int(rec["srtt_us"]) / 1e6
        est = int(rec["est_ns"])
        if est and int(rec["start_ns"]):
            attrs["network.tcp.handshake.duration"] = (est - int(rec["start_ns"])) / 1e9
        server = attrs["network.tcp.handshake.role"] == "server"
        name = f"tcp {'accept' if server else 'connect'} {attrs['server.port']}"
        res = (self.attribution.socket_resource(int(rec["cgroup_id"]), int(rec["netns"]))[1]
               if self.attribution.enabled else None)
        return SpanRecord(start_ns, max(end_ns, start_ns), name, tuple(attrs.items()), error,
                          SPAN_KIND_SERVER if server else SPAN_KIND_CLIENT, resource=res)

    # --- counters (export thread) ----------------------------------------------------
    def collect(self) -> None:
        with self._drain_lock:
            if self._obj is None or self._tables is None:
                return
            self._ingest(*self._tables.swap().drain())

    def _ingest(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """One SDK update per drained key: the interval's delta of each counter."""
        for kb, kind, delta in counters.fold(keys, vals):
            attrs = self._key_attrs(kb)
            if kind == counters.CNT_OPENED:
                self.opened.add(delta, attrs)
            elif kind == counters.CNT_ACTIVE:
                self.active.add(delta, attrs)
            elif kind == counters.CNT_RETRANS:
                self.retransmits.add(delta, attrs)
            elif kind == counters.CNT_RESET_TX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "transmit"}))
            elif kind == counters.CNT_RESET_RX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "receive"}))

    def _key_attrs(self, kb: bytes) -> dict:
        attrs = self._keys.get(kb)
        if attrs is None:
            k = np.frombuffer(kb, counters.CKEY)[0]
            attrs = dict(self.mapper.base(int(k["role"]), k["saddr"].tobytes(),
                                          k["caddr"].tobytes(), int(k["sport"]),
                                          int(k["cport"])))
            if self.mapper.resource is not None:
                attrs.update(self.mapper.resource(int(k["cgroup_id"]), int(k["netns"])))
            if len(self._keys) >= 65536:  # bounded: addresses churn
                self._keys.clear()
            self._keys[kb] = attrs
        return attrs

    # --- health ------------------------------------------------------------------------
    def _stat(self, idx: int) -> int:
        # After close the map is gone: keep reporting the last value read, so the
        # final export does not see the counter fall back to 0.
        if self._obj is not None and self._obj.loaded:
            self._stats_seen[idx] = self._obj.maps["tcp_stats"].sum_u64(idx)
        return self._stats_seen.get(idx, 0)

    def _register_health(self) -> None:
        t = self.exporter
        t.observe("ebpf_otlp.tcp.dropped", "{event}",
                  "TCP updates the kernel side could not record (map full)",
                  lambda: [(self._stat(i), {"reason": r}) for i, r in _STATS.items()]
                  + [(self.bad_records, {"reason": "bad_record"})])
        t.observe("ebpf_otlp.tcp.closes.untracked", "{connection}",
                  "closes of connections whose open was not seen (older than the agent, or "
                  "refused by the full socket table): bytes counted, no duration, not in "
                  "active",
                  lambda: [(self.untracked_closes, {})])
        t.observe("ebpf_otlp.tcp.handshake.estimated", "{connection}",
                  "server handshakes without a SYN stamp from sock_ops (estimated from the "
                  "SYN-ACK RTT, or not recorded)", lambda: [(self._stat(_SYN_MISS), {})])
