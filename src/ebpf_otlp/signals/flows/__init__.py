"""Flows: per-flow packet, byte and segment counters counted in the kernel by
TC (or XDP) programs, drained once per interval and exported as
``network.flow.*`` counters.

The programs are the shared packet object's (:mod:`ebpf_otlp.signals.packet`).
Per interval (``collect``): flip the active table, wait out programs still
writing the old one, batch-drain it with its per-CPU front slots, project the keys
onto the kept attributes and sum over the dropped ones (numpy), then export.
The export builds the OTLP request directly from the arrays (the exporter's
sums path, :mod:`ebpf_otlp.otlp.sums`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from ...otlp.semconv import DIRECTIONS
from ...otlp.sums import SumMetric
from ...platform.bpfobj import BpfObject
from ...platform.maps import Map
from ...platform.tables import AlternatingTables
from ..attribution import shared as shared_attribution
from ..base import Signal
from ..packet import PacketDatapath, PacketHooks
from . import agg
from . import attrs as fattrs

if TYPE_CHECKING:
    from ...config import AgentConfig
    from ...otlp import Exporter

log = logging.getLogger(__name__)

TABLES = ("flows_a", "flows_b")
# One read of the overflow map serves the callbacks of one SDK collection.
OVF_REUSE_S = 0.1
METRICS = (
    SumMetric("network.flow.bytes", "By", "bytes of the flow's frames as the hook saw "
              "them, L2 header included", 1),
    SumMetric("network.flow.packets", "{packet}", "packets (skbs at TC, frames at XDP) "
              "of the flow; one GSO/GRO skb counts once", 0),
    SumMetric("network.flow.segments", "{segment}", "wire segments of the flow: each "
              "GSO/GRO skb counts its gso_segs", 2),
)


class FlowsSignal(PacketHooks, Signal):
    name = "flows"

    def __init__(self, config: AgentConfig, exporter: Exporter):
        super().__init__(config, exporter)
        self.kept = tuple(config.flow_attributes)
        self.store = agg.SeriesStore(not exporter.delta, cap=max(4 * config.max_flows, 16384))
        self.ifnames: dict[int, str] = {}
        self.obj: BpfObject | None = None
        self.dp: PacketDatapath | None = None
        self._lock = threading.Lock()
        self._interval_start_ns = time.time_ns()
        self.drains = 0
        self.last_entries = 0
        self.flows_drained = 0
        self._ovf_cache: list[tuple[dict, np.ndarray]] = []
        self._ovf_read_at = -1e9
        self.attribution = shared_attribution(config, exporter)
        self._register_health()

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        # The packet object (bpf/packet.bpf.c) is shared with DNS: one program per
        # hook and direction parses each packet once for both signals.
        self.dp = PacketDatapath.for_config(self.config).acquire(self.name, self.exporter)
        self.obj = self.dp.obj
        self.ifnames = self.dp.ifnames
        self.tables = AlternatingTables(self.obj, "flows_active", TABLES)
        self._interval_start_ns = time.time_ns()

    def programs(self) -> list:
        return self.dp.programs(self.name) if self.dp is not None else []

    def close(self) -> None:
        """Detach, drain both tables (the agent exports once more after), free the maps."""
        with self._lock:
            if self.obj is not None and self.obj.loaded:
                try:
                    self.dp.detach_hooks()
                    self._ovf_cache = self._read_overflow(fresh=True)
                    for table in self.tables.both():
                        self._ingest(self._drain(table))
                except Exception:
                    log.exception("final flows drain failed")
            self.obj = None
            if self.dp is not None:
                self.dp.release(self.name)
            super().close()

    # --- per interval ---------------------------------------------------------------
    def collect(self) -> None:
        with self._lock:
            if self.obj is None:
                return
            self._ingest(self._swap_and_drain())
        self.dp.interval_tick(self.config.interval_s)

    def _swap_and_drain(self) -> agg.Drained:
        return self._drain(self.tables.swap())

    def _drain(self, m: Map) -> agg.Drained:
        keys, vals = m.drain()
        # the per-CPU front slots of this table (bpf/flows.h) go with it
        fk, fv = agg.drain_front(self.obj.maps["flows_front"], TABLES.index(m.name))
        keys, vals = np.concatenate([keys, fk]), np.concatenate([vals, fv])
        self.drains += 1
        self.last_entries = len(keys)
        self.flows_drained += len(keys)
        return agg.fold(keys, vals, m.ncpus)

    def _ingest(self, d: agg.Drained) -> None:
        now = time.time_ns()
        if self.taps:  # the live views: one drain, full keys (agg.Drained)
            self.tap("flows", d)
        series, counts = agg.aggregate(agg.project(d, self.kept), d.counts)
        before = self.store.dropped_points
        self.store.merge(series, counts, self._interval_start_ns)
        lost = self.store.dropped_points - before  # delta series pushed out unexported
        if lost:
            self.exporter.count_dropped("metrics", "pending_full", lost * len(METRICS))
        self._interval_start_ns = now

    def export(self) -> None:
        with self._lock:
            st = self.store
            if len(st) == 0:
                return
            attrs = fattrs.encoded(st.series, self.kept, self.ifnames)
            # What was not delivered stays pending (delta) for the next interval;
            # the failed request is counted by the exporter's sender.
            resources, index = self._resources(st.series)
            st.exported(self.exporter.send_sums(METRICS, attrs, st.counts, st.start_ns,
                                                time.time_ns(), resources=resources,
                                                resource_index=index))

    def _resources(self, series: np.ndarray) -> tuple[list | None, np.ndarray | None]:
        """Per series, the resource of the workload behind its interface (a veth
        whose peer is a pod's or container's namespace); host interfaces: none."""
        if not self.attribution.enabled or not len(series):
            return None, None
        ifx, index = np.unique(series["key"]["ifindex"], return_inverse=True)
        keys = [self.attribution.key(self.attribution.interface(int(i))) for i in ifx]
        if not any(keys):
            return None, None
        return keys, index.reshape(-1)

    # --- health ------------------------------------------------------------------------
    def _read_overflow(self, fresh: bool = False) -> list[tuple[dict, np.ndarray]]:
        """The overflow map's totals; the five instruments read by one collection
        share one read of the map (their callbacks run within milliseconds)."""
        if self.obj is None or not self.obj.loaded:
            return self._ovf_cache
        now = time.monotonic()
        if not fresh and now - self._ovf_read_at < OVF_REUSE_S:
            return self._ovf_cache
        self._ovf_read_at = now
        m = self.obj.maps["flows_overflow"]
        out = []
        stride = (agg.OVF_VAL_DT.itemsize + 7) & ~7
        for kb, vb in m.items():
            k = np.frombuffer(kb, agg.OVF_KEY_DT)[0]
            raw = np.frombuffer(vb, np.uint8).reshape(m.ncpus, stride)[:, :agg.OVF_VAL_DT.itemsize]
            v = np.ascontiguousarray(raw).view(agg.OVF_VAL_DT).reshape(m.ncpus)
            totals = np.array([v[f].sum(dtype=np.uint64) for f in agg.OVF_VAL_DT.names],
                              np.uint64)
            attrs = {"network.io.direction": DIRECTIONS[int(k["direction"])]}
            if int(k["ifindex"]):
                attrs["network.interface.name"] = self.ifnames.get(int(k["ifindex"]),
                                                                   str(int(k["ifindex"])))
            out.append((attrs, totals))
        self._ovf_cache = out
        return out

    def _ovf(self, field: str) -> Callable[[], list[tuple[int, dict]]]:
        i = agg.OVF_VAL_DT.names.index(field)
        return lambda: [(int(t[i]), a) for a, t in self._read_overflow()]

    def _register_health(self) -> None:
        t = self.exporter
        t.observe("ebpf_otlp.flows.overflow.packets", "{packet}",
                  "packets of new flows counted here because the flow table was full",
                  self._ovf("packets"))
        t.observe("ebpf_otlp.flows.overflow.bytes", "By",
                  "bytes of new flows counted here because the flow table was full",
                  self._ovf("bytes"))
        t.observe("ebpf_otlp.flows.overflow.segments", "{segment}",
                  "segments of new flows counted here because the flow table was full",
                  self._ovf("segments"))
        t.observe("ebpf_otlp.flows.table_full", "{event}",
                  "flow inserts refused because the table was full", self._ovf("table_full"))
        t.observe("ebpf_otlp.flows.insert_errors", "{event}",
                  "flow inserts refused for another reason (counted as overflow too)",
                  self._ovf("errors"))
        t.observe("ebpf_otlp.flows.table.entries", "{flow}",
                  "flows in the table at the last drain",
                  lambda: [(self.last_entries, {"max": self.config.max_flows})], kind="gauge")
        t.observe("ebpf_otlp.flows.series.dropped", "{series}",
                  "flow series lost: export kept failing and the pending set hit its bound",
                  lambda: [(self.store.dropped_points, {})])
        t.observe("ebpf_otlp.flows.dropped.packets", "{packet}",
                  "packets of flow series dropped unexported (export kept failing)",
                  lambda: [(int(self.store.dropped_counts[0]), {"reason": "export_backlog"})])
        t.observe("ebpf_otlp.flows.dropped.bytes", "By",
                  "bytes of flow series dropped unexported (export kept failing)",
                  lambda: [(int(self.store.dropped_counts[1]), {"reason": "export_backlog"})])
        t.observe("ebpf_otlp.flows.series.evicted", "{series}",
                  "cumulative series forgotten (restart from 0 with a new start time)",
                  lambda: [(self.store.evicted_series if self.store.cumulative else 0, {})])
