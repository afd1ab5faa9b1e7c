"""TCP health: connection lifecycle, handshake latency, RTT, retransmits,
resets and failures, from tracepoints and sock_ops only (``bpf/tcp.bpf.c``).

Discrete events (open, close, failure, RTT sample) arrive on one ring buffer
of fixed-size records, decoded in batches; retransmitted segments and resets
are counted in a kernel hash map of cumulative counters, drained once per
export interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..bpfobj import BpfObject
from ..libbpf import BpfError
from ..ringbuf import RingBuffer
from ..tcp_records import (
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
from .base import Signal

log = logging.getLogger(__name__)

TRACEPOINTS = {
    "tcp_state": ("sock", "inet_sock_set_state"),
    "tcp_retransmit": ("tcp", "tcp_retransmit_skb"),
    "tcp_retransmit_synack": ("tcp", "tcp_retransmit_synack"),
    "tcp_send_reset": ("tcp", "tcp_send_reset"),
    "tcp_receive_reset": ("tcp", "tcp_receive_reset"),
    "tcp_accept4": ("syscalls", "sys_exit_accept4"),
    "tcp_accept": ("syscalls", "sys_exit_accept"),
}
# tcp_stats indexes (bpf/tcp.h TCP_STAT_*)
_STATS = {0: "counter_map_full", 1: "socket_map_full"}
_SYN_MISS = 2
RTT_SAMPLE_S = 1.0  # one RTT sample per connection per second
IDLE_EVICT_INTERVALS = 10  # drop kernel counter keys unchanged this long

Attrs = tuple[tuple[str, object], ...]


def attach_sockops(prog, path: str):
    """Attach ``prog`` to the cgroup v2 directory ``path``.

    ``ip netns exec`` (and many containers) remount /sys, hiding the host's
    cgroup2 mount while the cgroups themselves still exist. Then the root of
    our cgroup namespace is mounted on a private temporary directory just for
    the attach and unmounted right after: the link keeps the cgroup.
    """
    if os.path.isdir(path):
        return prog.attach_cgroup(path)
    tmp = tempfile.mkdtemp(prefix="ebpf-otlp-cg-")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.mount(b"cgroup2", tmp.encode(), b"cgroup2", 0, None) != 0:
            raise OSError(ctypes.get_errno(), f"{path} missing and cgroup2 mount failed")
        try:
            log.info("tcp: %s not mounted here, attached sock_ops via a private cgroup2 mount",
                     path)
            return prog.attach_cgroup(tmp)
        finally:
            libc.umount2(tmp.encode(), 2)  # MNT_DETACH
    finally:
        os.rmdir(tmp)


class TcpSignal(Signal):
    name = "tcp"

    def __init__(self, config, telemetry):
        super().__init__(config, telemetry)
        self.mapper = AttributeMapper(config.tcp_attributes)
        m = telemetry.meter
        self.opened = m.create_counter(
            "network.tcp.connections.opened", "{connection}",
            "TCP connections that completed the handshake")
        self.failed = m.create_counter(
            "network.tcp.connections.failed", "{connection}",
            "client handshakes that ended without ESTABLISHED, by error.type")
        self.active = m.create_up_down_counter(
            "network.tcp.connections.active", "{connection}",
            "established TCP connections opened since the agent started and not yet closed")
        self.duration = m.create_histogram(
            "network.tcp.connection.duration", "s",
            "from the first SYN (sent or received) to CLOSE")
        self.handshake = m.create_histogram(
            "network.tcp.handshake.duration", "s",
            "client: SYN sent to ESTABLISHED; server: SYN received to ESTABLISHED")
        self.rtt = m.create_histogram(
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
        self._ring: RingBuffer | None = None
        self._obj: BpfObject | None = None
        self._last: dict[bytes, int] = {}
        self._idle: dict[bytes, int] = {}
        self.sockops_attached = False
        self.bad_records = 0
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
        obj.load()
        for prog, (cat, tp) in TRACEPOINTS.items():
            obj.programs[prog].attach_tracepoint(cat, tp)
        try:
            attach_sockops(obj.programs["tcp_sockops"], cfg.cgroup_path)
            self.sockops_attached = True
        except (BpfError, OSError) as e:
            # Lifecycle, bytes, retransmits and resets still work; RTT samples
            # do not, and server handshakes fall back to the SYN-ACK RTT.
            log.warning("tcp: sock_ops not attached to %s (%s): no RTT samples, server "
                        "handshake estimated from the SYN-ACK RTT", cfg.cgroup_path, e)
        self._ring = RingBuffer(obj.maps["tcp_events"], EVENT, on_batch=self.on_batch,
                                lost_map=obj.maps["tcp_events_lost"])

    def rings(self) -> list[RingBuffer]:
        return [self._ring] if self._ring is not None else []

    def close(self) -> None:
        self._ring = None
        self._obj = None
        super().close()

    # --- ring records (poller thread) -----------------------------------------------
    def on_batch(self, recs: np.ndarray) -> None:
        offset = time.time_ns() - time.monotonic_ns()
        kinds = recs["kind"]
        known = np.isin(kinds, (EV_OPEN, EV_CLOSE, EV_FAIL, EV_RTT))
        if not known.all():
            self.bad_records += int((~known).sum())
        for rec in recs[kinds == EV_OPEN]:
            self._on_open(rec)
        self._on_closes(recs[kinds == EV_CLOSE], offset)
        self._on_fails(recs[kinds == EV_FAIL], offset)
        for rec in recs[kinds == EV_RTT]:
            self.rtt.record(int(rec["srtt_us"]) / 1e6, dict(self.mapper.event(rec)))

    def _base(self, rec: np.void) -> dict:
        return dict(self.mapper.base(int(rec["role"]), rec["saddr"].tobytes(),
                                     rec["caddr"].tobytes(), int(rec["sport"]),
                                     int(rec["cport"])))

    def _on_open(self, rec: np.void) -> None:
        # Opens happen in softirq for servers, before accept() names the owner:
        # opened/active/handshake carry no process attributes.
        attrs = self._base(rec)
        self.opened.add(1, attrs)
        self.active.add(1, attrs)
        start, est = int(rec["start_ns"]), int(rec["est_ns"])
        if start and est >= start:
            self.handshake.record((est - start) / 1e9, attrs)

    def _on_closes(self, recs: np.ndarray, offset: int) -> None:
        sums: dict[Attrs, list[int]] = defaultdict(lambda: [0, 0])
        for rec in recs:
            flags = int(rec["flags"])
            attrs = self.mapper.event(rec)
            s = sums[attrs]
            s[0] += int(rec["bytes_tx"])
            s[1] += int(rec["bytes_rx"])
            start = int(rec["start_ns"]) or int(rec["est_ns"])
            tracked = bool(flags & F_TRACKED) and int(rec["est_ns"]) != 0
            if tracked:
                self.active.add(-1, self._base(rec))
                if start:
                    self.duration.record((int(rec["ts_ns"]) - start) / 1e9, dict(attrs))
            if self.spans and tracked and start and not flags & F_ROLE_GUESSED:
                self._span(rec, start + offset, int(rec["ts_ns"]) + offset, None)
        for attrs, (tx, rx) in sums.items():
            if tx:
                self.bytes.add(tx, dict(attrs, **{"network.io.direction": "transmit"}))
            if rx:
                self.bytes.add(rx, dict(attrs, **{"network.io.direction": "receive"}))

    def _on_fails(self, recs: np.ndarray, offset: int) -> None:
        for rec in recs:
            cause = failure_cause(int(rec["cause"]), int(rec["flags"]))
            self.failed.add(1, dict(self.mapper.event(rec), **{"error.type": cause}))
            start = int(rec["start_ns"])
            if self.spans and start:
                self._span(rec, start + offset, int(rec["ts_ns"]) + offset, cause)

    def _span(self, rec: np.void, start_ns: int, end_ns: int, error: str | None) -> None:
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
        if error:
            attrs["error.type"] = error
        server = attrs["network.tcp.handshake.role"] == "server"
        name = f"tcp {'accept' if server else 'connect'} {attrs['server.port']}"
        span = self.telemetry.tracer.start_span(
            name, kind=SpanKind.SERVER if server else SpanKind.CLIENT, attributes=attrs,
            start_time=start_ns)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=max(end_ns, start_ns))

    # --- counters (export thread) ----------------------------------------------------
    def collect(self) -> None:
        if self._obj is None:
            return
        cmap = self._obj.maps["counters"]
        keys, vals = cmap.drain(delete=False)
        if not len(keys):
            return
        recs = keys.view(CKEY).reshape(-1)
        values = vals[:, :8].copy().view("<u8").reshape(-1)
        seen = set()
        for kb, delta in counter_deltas(keys, values, self._last):
            seen.add(kb)
            k = np.frombuffer(kb, CKEY)[0]
            attrs = dict(self.mapper.base(int(k["role"]), k["saddr"].tobytes(),
                                          k["caddr"].tobytes(), int(k["sport"]),
                                          int(k["cport"])))
            kind = int(k["kind"])
            if kind == CNT_RETRANS:
                self.retransmits.add(delta, attrs)
            elif kind == CNT_RESET_TX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "transmit"}))
            elif kind == CNT_RESET_RX:
                self.resets.add(delta, dict(attrs, **{"network.io.direction": "receive"}))
        self._evict_idle(cmap, keys, seen)
        del recs

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
        if self._obj is None or not self._obj.loaded:
            return 0
        return self._obj.maps["tcp_stats"].sum_u64(idx)

    def _register_health(self) -> None:
        t = self.telemetry
        t.observe("ebpf_otlp.tcp.dropped", "{event}",
                  "TCP updates the kernel side could not record (map full)",
                  lambda: [(self._stat(i), {"reason": r}) for i, r in _STATS.items()]
                  + [(self.bad_records, {"reason": "bad_record"})])
        t.observe("ebpf_otlp.tcp.handshake.estimated", "{connection}",
                  "server handshakes without a SYN stamp from sock_ops (estimated from the "
                  "SYN-ACK RTT, or not recorded)", lambda: [(self._stat(_SYN_MISS), {})])
