"""TCP health: connection lifecycle, handshake latency, RTT, retransmits,
resets and failures, from tracepoints and sock_ops only (``bpf/tcp.bpf.c``).

Discrete events (open, close, failure, RTT sample) arrive on one ring buffer
of fixed-size records, decoded in batches; retransmitted segments and resets
are counted in a kernel hash map of cumulative counters, drained once per
export interval.
"""

from __future__ import annotations

import logging

import numpy as np

from ...config import ConfigError
from ...otlp.spans import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, SpanRecord
from ...platform.bpfobj import BpfObject
from ...platform.btf import kernel_structs
from ...platform.host import epoch_offset_ns
from ...platform.layout import constant
from ...platform.libbpf import BpfError
from ...platform.ringbuf import RingBuffer
from ..attribution import shared as shared_attribution
from ..base import Signal
from .kernel import OPTIONAL, VARIANTS, attach_sockops
from .records import (
    CKEY,
    CNT_RESET_RX,
    CNT_RESET_TX,
    CNT_RETRANS,
    EV_CLOSE,
    EV_FAIL,
    EV_OPEN,
    EV_RTT,
    EVENT,
    F_ROLE_GUESSED,
    F_TRACKED,
    AttributeMapper,
    counter_deltas,
    failure_cause,
)

log = logging.getLogger(__name__)

# tcp_stats indexes -> health attribute (bpf/tcp.h TCP_STAT_*)
_STATS = {constant("tcp", "TCP_STAT_COUNTERS_FULL"): "counter_map_full",
          constant("tcp", "TCP_STAT_SOCKS_FULL"): "socket_map_full"}
_SYN_MISS = constant("tcp", "TCP_STAT_SYN_MISS")
RTT_SAMPLE_S = 1.0  # one RTT sample per connection per second
IDLE_EVICT_INTERVALS = 10  # drop kernel counter keys unchanged this long

CAUSES = ("refused", "timeout", "reset", "other")
CAUSE_CODES = {c: i for i, c in enumerate(CAUSES)}


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
        self._last: dict[bytes, int] = {}
        self._idle: dict[bytes, int] = {}
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
        obj.rodata["ringbuf_wakeup_bytes"] = cfg.ringbuf_wakeup_bytes
        obj.set_max_entries("tcp_events", cfg.ringbuf_bytes)
        obj.set_max_entries("counters", max(1024, min(cfg.max_flows, 1 << 20)))
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
        for idx in (*_STATS, _SYN_MISS):
            self._stat(idx)  # last values, for the final export
        self._ring = None
        self._obj = None
        super().close()

    # --- ring records (poller thread) -----------------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        """Decode one batch: group records by exported attributes with numpy and
        make one SDK call per group and instrument, not per record."""
        kinds = recs["kind"]
        known = np.isin(kinds, (EV_OPEN, EV_CLOSE, EV_FAIL, EV_RTT))
        if not known.all():
            self.bad_records += int((~known).sum())
        opens, closes = recs[kinds == EV_OPEN], recs[kinds == EV_CLOSE]
        fails, rtts = recs[kinds == EV_FAIL], recs[kinds == EV_RTT]
        if len(opens):
            self._on_opens(opens)
        if len(closes):
            self._on_closes(closes)
        if len(fails):
            self._on_fails(fails)
        if len(rtts):
            inv, groups, _ = self.mapper.groups(rtts, process=True)
            self._histogram(self.rtt, rtts["srtt_us"] / 1e6, inv, groups)
        if self.spans and (len(closes) or len(fails)):
            self._spans(closes, fails)

    @staticmethod
    def _histogram(hist, values: np.ndarray, inv: np.ndarray, groups: list[dict],
                   mask: np.ndarray | None = None) -> None:
        for g, attrs in enumerate(groups):
            sel = inv == g if mask is None else (inv == g) & mask
            if sel.any():
                hist.record_many(tuple(attrs.items()), values[sel])

    def _on_opens(self, recs: np.ndarray) -> None:
        # Opens happen in softirq for servers, before accept() names the owner:
        # opened/active/handshake carry no process attributes.
        inv, groups, _ = self.mapper.groups(recs, process=False)
        counts = np.bincount(inv, minlength=len(groups))
        for attrs, n in zip(groups, counts.tolist()):
            self.opened.add(n, attrs)
            self.active.add(n, attrs)
        start, est = recs["start_ns"].astype(np.int64), recs["est_ns"].astype(np.int64)
        self._histogram(self.handshake, (est - start) / 1e9, inv, groups,
                        (start > 0) & (est >= start))

    def _on_closes(self, recs: np.ndarray) -> None:
        tracked = ((recs["flags"] & F_TRACKED) != 0) & (recs["est_ns"] != 0)
        self.untracked_closes += int((~tracked).sum())
        if tracked.any():  # the matching -1 of each counted open
            inv, groups, _ = self.mapper.groups(recs[tracked], process=False)
            for attrs, n in zip(groups, np.bincount(inv, minlength=len(groups)).tolist()):
                self.active.add(-n, attrs)
        inv, groups, _ = self.mapper.groups(recs, process=True)
        tx = np.bincount(inv, weights=recs["bytes_tx"].astype(np.float64), minlength=len(groups))
        rx = np.bincount(inv, weights=recs["bytes_rx"].astype(np.float64), minlength=len(groups))
        for attrs, t, r in zip(groups, tx.tolist(), rx.tolist()):
            if t:
                self.bytes.add(int(t), dict(attrs, **{"network.io.direction": "transmit"}))
            if r:
                self.bytes.add(int(r), dict(attrs, **{"network.io.direction": "receive"}))
        start = np.where(recs["start_ns"] != 0, recs["start_ns"], recs["est_ns"]).astype(np.int64)
        end = recs["ts_ns"].astype(np.int64)
        self._histogram(self.duration, (end - start) / 1e9, inv, groups,
                        tracked & (start > 0) & (end >= start))

    def _on_fails(self, recs: np.ndarray) -> None:
        causes = np.array([CAUSE_CODES[failure_cause(int(e), int(f))]
                           for e, f in zip(recs["cause"].tolist(), recs["flags"].tolist())],
                          np.uint8)
        inv, groups, extras = self.mapper.groups(recs, process=True, extra=causes)
        for attrs, code, n in zip(groups, extras,
                                  np.bincount(inv, minlength=len(groups)).tolist()):
            self.failed.add(n, dict(attrs, **{"error.type": CAUSES[code]}))

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
        res = (self.attribution.key(self.attribution.socket(int(rec["cgroup_id"]),
                                                            int(rec["netns"])))
               if self.attribution.enabled else None)
        return SpanRecord(start_ns, max(end_ns, start_ns), name, tuple(attrs.items()), error,
                          SPAN_KIND_SERVER if server else SPAN_KIND_CLIENT, resource=res)

    # --- counters (export thread) ----------------------------------------------------
    def collect(self) -> None:
        if self._obj is None:
            return
        cmap = self._obj.maps["counters"]
        keys, vals = cmap.drain(delete=False)
        if not len(keys):
            return
        values = vals[:, :8].copy().view("<u8").reshape(-1)
        seen = set()
        for kb, delta in counter_deltas(keys, values, self._last):
            seen.add(kb)
            k = np.frombuffer(kb, CKEY)[0]
            attrs = dict(self.mapper.base(int(k["role"]), k["saddr"].tobytes(),
                                          k["caddr"].tobytes(), int(k["sport"]),
                                          int(k["cport"])))
            if self.mapper.resource is not None:
                attrs.update(self.mapper.resource(int(k["cgroup_id"]), int(k["netns"])))
            kind = int(k["kind"])
            if kind == CNT_RETRANS:
                self.retransmits.add(delta, attrs)
            elif kind == CNT_RESET_TX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "transmit"}))
            elif kind == CNT_RESET_RX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "receive"}))
        self._evict_idle(cmap, keys, seen)

    def _evict_idle(self, cmap, keys: np.ndarray, changed: set[bytes]) -> None:
        """Delete kernel counter keys idle for a while: the map stays small and
        an increment can only be lost if it races a key idle for 10 intervals."""
        for k in keys:
            kb = k.tobytes()
            if kb in changed:
                self._idle.pop(kb, None)
                continue
            n = self._idle.get(kb, 0) + 1
            if n < IDLE_EVICT_INTERVALS:
                self._idle[kb] = n
                continue
            cmap.delete(kb)
            self._idle.pop(kb, None)
            self._last.pop(kb, None)

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
                  "evicted from the socket table): bytes counted, no duration, not in active",
                  lambda: [(self.untracked_closes, {})])
        t.observe("ebpf_otlp.tcp.handshake.estimated", "{connection}",
                  "server handshakes without a SYN stamp from sock_ops (estimated from the "
                  "SYN-ACK RTT, or not recorded)", lambda: [(self._stat(_SYN_MISS), {})])
