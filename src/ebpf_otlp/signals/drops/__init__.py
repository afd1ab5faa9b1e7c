"""Packet drops with the kernel's own reason (``skb:kfree_skb``).

The kernel counts drops per (reason, location, flow, interface) in one of
two tables; once per interval :meth:`DropsSignal.collect` flips the table
the program writes, waits for programs already running to finish, drains
the idle table in one batch and adds each row to ``network.packet.drops``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from ...config import ConfigError
from ...platform.bpfobj import BpfObject
from ...platform.host import epoch_offset_ns
from ...platform.kallsyms import KernelSymbols
from ...platform.layout import constant
from ...platform.tables import AlternatingTables
from ..attribution import shared as shared_attribution
from ..base import Signal
from .decode import DropDecoder, key_dtype, own_netns
from .logs import FirstDropLogger
from .reasons import DropReasons

if TYPE_CHECKING:
    from ...config import AgentConfig
    from ...otlp import Exporter

log = logging.getLogger(__name__)

PROGRAM = "on_kfree_skb"
# No semantic convention names a network namespace: the inode (as `ip netns
# identify` / /proc/PID/ns/net show it) under our own prefix.
NETNS_ATTRIBUTE = "ebpf_otlp.network.namespace"
TABLES = ("drops_0", "drops_1")
LOG_RATE_PER_S = 10.0
LOG_BURST = 100.0


class DropsSignal(Signal):
    name = "drops"

    def __init__(self, config: AgentConfig, exporter: Exporter):
        super().__init__(config, exporter)
        telemetry = exporter
        self.obj: BpfObject | None = None
        self.reasons = DropReasons({})
        self.decoder: DropDecoder | None = None
        self.symbols = KernelSymbols() if config.drop_location else None
        self.first_drops: FirstDropLogger | None = None
        self._overflow_seen: dict[int, int] = {}  # reason -> cumulative, last read
        self.last_entries = 0
        self._slots = {n: constant("drops", n) for n in
                       ("DROP_STAT_TABLE_FULL", "DROP_STAT_OVERFLOW_LOST", "DROP_STAT_EVENTS")}
        self.drained_packets = 0
        self._stats_seen: dict[str, int] = {}
        self.counter = telemetry.meter.create_counter(
            "network.packet.drops", unit="{packet}",
            description="packets the kernel dropped, by its drop reason")
        self.attribution = shared_attribution(config, exporter)
        telemetry.observe("ebpf_otlp.drops.overflow", "{packet}",
                          "drops counted without their flow: the drop table was full",
                          self._overflow_points)
        telemetry.observe("ebpf_otlp.drops.table_full", "{event}",
                          "times a drop found the drop table full",
                          lambda: [(self._stat("DROP_STAT_TABLE_FULL"), {})])
        telemetry.observe("ebpf_otlp.drops.lost", "{packet}",
                          "drops not counted at all (the per-reason overflow table was full)",
                          lambda: [(self._stat("DROP_STAT_OVERFLOW_LOST"), {})])
        telemetry.observe("ebpf_otlp.drops.events", "{packet}",
                          "drops the kernel program counted",
                          lambda: [(self._stat("DROP_STAT_EVENTS"), {})])
        telemetry.observe("ebpf_otlp.drops.table.entries", "{entry}",
                          "entries drained from the drop table in the last interval",
                          lambda: [(self.last_entries, {"capacity": config.max_drops})],
                          kind="gauge")
        telemetry.observe("ebpf_otlp.drops.logs", "{record}",
                          "first-drop log records, emitted or suppressed by the rate limit",
                          self._log_points)

    # --- lifecycle -------------------------------------------------------------
    def _reason_bits(self, wanted: tuple[str, ...]) -> bytes:
        """The kernel-side filter (bpf/drops.h): one bit per wanted reason value."""
        words = constant("drops", "DROP_REASON_WORDS")
        bits = np.zeros(words, "<u8")
        for name in wanted:
            short = name.upper().removeprefix("SKB_DROP_REASON_")
            v = self.reasons.value(short)
            if v is None:
                raise ConfigError(f"--drop-reasons: this kernel has no drop reason {name!r} "
                                  f"(known: {', '.join(sorted(self.reasons.names.values()))})")
            if v >= 64 * words:
                raise ConfigError(f"--drop-reasons: reason {short} ({v}) is beyond the "
                                  f"{64 * words} the filter holds")
            bits[v >> 6] |= np.uint64(1 << (v & 63))
        return bits.tobytes()

    def start(self) -> None:
        cfg = self.config
        self.reasons = DropReasons.from_kernel()
        if not self.reasons.names:
            log.warning("kernel BTF has no enum skb_drop_reason: drops count as UNKNOWN")
        obj = BpfObject.open_packaged("drops")
        self.objects.append(obj)
        self.obj = obj
        obj.rodata["reason_consumed"] = self.reasons.consumed
        obj.rodata["reason_not_specified"] = self.reasons.not_specified
        obj.rodata["exclude_not_specified"] = int(cfg.drop_exclude_not_specified)
        obj.rodata["keep_location"] = int(cfg.drop_location)
        # --attribution none: drops of every other namespace share a key (bpf/drops.bpf.c)
        obj.rodata["keep_netns"] = int(self.attribution.enabled)
        netns = own_netns()
        obj.rodata["own_netns"] = netns
        if cfg.drop_reasons:
            obj.rodata["reason_filter"] = 1
            obj.rodata["reason_bits"] = self._reason_bits(cfg.drop_reasons)
        self.tables = AlternatingTables(obj, "active", TABLES)
        self.tables.set_max_entries(cfg.max_drops)
        obj.load()
        obj.programs[PROGRAM].attach_tracepoint("skb", "kfree_skb")
        keep = tuple(a for a in cfg.flow_attributes if a != "network.io.direction")
        self.decoder = DropDecoder(self.reasons, keep,
                                   self.symbols.name if self.symbols else None, netns=netns)
        if cfg.drop_logs:
            self.first_drops = FirstDropLogger(self.exporter.logs, cfg.max_drops,
                                               LOG_RATE_PER_S, LOG_BURST)
        log.info("drops: %d reasons from BTF, table of %d, location %s",
                 len(self.reasons.names), cfg.max_drops, "on" if cfg.drop_location else "off")

    def collect(self) -> None:
        if self.obj is None or not self.obj.loaded:
            return
        self._ingest(*self.tables.swap().drain())

    def _ingest(self, keys, values) -> None:
        self.last_entries = len(keys)
        if self.symbols is not None and len(keys):
            loc = keys.view(key_dtype()).reshape(-1)["location"]
            self.symbols.resolve(set(loc.tolist()))
        offset = epoch_offset_ns()
        rows = []
        host_ns = self.decoder.netns if self.decoder is not None else 0
        for row in self.decoder.rows(keys, values):
            attrs = row.attributes
            if self.attribution.enabled and row.netns and row.netns != host_ns:
                # Not the host's namespace: name it, and its pod/container as resource.
                attrs = {**attrs, NETNS_ATTRIBUTE: row.netns,
                         **self.attribution.netns(row.netns)}
                row = dataclasses.replace(row, attributes=attrs)
            self.counter.add(row.packets, attrs)
            self.drained_packets += row.packets
            if self.first_drops is not None:
                self.first_drops.offer(row, offset)
            if self.taps:
                rows.append(row)
        if rows:  # the live views: the drained DropRows of one interval
            self.tap("drops", rows)
        self._export_overflow()

    def _export_overflow(self) -> None:
        """Drops without a flow (table full) still count, under their reason alone."""
        for reason, total in self._overflow_totals().items():
            delta = total - self._overflow_seen.get(reason, 0)
            if delta > 0:
                self.counter.add(delta, {"network.drop.reason": self.reasons.name(reason)})
            self._overflow_seen[reason] = total

    # --- reading the kernel's counters -------------------------------------------
    def _overflow_totals(self) -> dict[int, int]:
        if self.obj is None or not self.obj.loaded:
            return {}
        m = self.obj.maps["drop_overflow"]
        return {int.from_bytes(k, "little"): int(m.per_cpu(v).sum()) for k, v in m.items()}

    def _overflow_points(self) -> list[tuple[int, dict]]:
        return [(n, {"network.drop.reason": self.reasons.name(r)})
                for r, n in self._overflow_seen.items()]

    def _stat(self, slot: str) -> int:
        # After close the map is gone: report the last value read (counters never fall).
        if self.obj is not None and self.obj.loaded:
            self._stats_seen[slot] = self.obj.maps["drop_stats"].sum_u64(self._slots[slot])
        return self._stats_seen.get(slot, 0)

    def _log_points(self) -> list[tuple[int, dict]]:
        if self.first_drops is None:
            return []
        return [(self.first_drops.emitted, {"outcome": "emitted"}),
                (self.first_drops.suppressed, {"outcome": "suppressed"})]

    def close(self) -> None:
        """Detach, then count what the tables still hold (the agent exports after)."""
        if self.obj is not None and self.obj.loaded:
            try:
                self.obj.detach_all()
                for slot in self._slots:
                    self._stat(slot)
                for table in self.tables.both():
                    self._ingest(*table.drain())
            except Exception:
                log.exception("final drops drain failed")
        self.obj = None
        super().close()

