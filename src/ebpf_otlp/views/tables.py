"""What ``top`` shows, as plain rows: flows by rate over the last intervals, TCP
peers, DNS names and drop reasons since the start. Pure (events in, rows out),
so it is tested without a terminal; :mod:`.top` draws it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .events import Event

MAX_KEYS = 4096  # per table; the least active entries go first beyond this
FLOW_WINDOW = 3  # intervals the flow rates average over


def rate(n: float) -> str:
    """Bytes per second, as a person reads them."""
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if n < 1000 or unit == "GB/s":
            return f"{n:.0f} {unit}" if unit == "B/s" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB/s"


def count(n: float) -> str:
    return f"{n:.0f}" if n < 100_000 else f"{n / 1000:.0f}k"


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.2f}"


def _ep(ev: Event, side: str, port: bool = True) -> str:
    a = str(ev.get(f"{side}.address", "-"))
    p = ev.get(f"{side}.port")
    if p is None or not port:
        return a
    return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"


@dataclass
class Column:
    title: str
    key: Callable[[dict], object]  # sort key (numbers: descending)
    text: Callable[[dict], str]
    numeric: bool = True
    width: int = 0  # at least this wide, and takes a share of spare width (addresses, names)
    wide: bool = False  # only shown on terminals of WIDE columns or more

WIDE = 100


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]
    rows: dict[tuple, dict] = field(default_factory=dict)
    sort: int = 0  # index into the numeric columns

    @property
    def sortable(self) -> list[Column]:
        return [c for c in self.columns if c.numeric]

    def shown(self, width: int = WIDE) -> list[Column]:
        return [c for c in self.columns if width >= WIDE or not c.wide]

    def sorted_rows(self, limit: int | None = None, width: int = WIDE) -> list[list[str]]:
        col = self.sortable[self.sort % len(self.sortable)]
        rows = sorted(self.rows.values(), key=lambda r: col.key(r), reverse=True)
        cols = self.shown(width)
        return [[c.text(r) for c in cols] for r in rows[:limit]]

    def trim(self) -> None:
        if len(self.rows) > MAX_KEYS:
            col = self.sortable[0]
            keep = sorted(self.rows.items(), key=lambda kv: col.key(kv[1]), reverse=True)
            self.rows = dict(keep[:MAX_KEYS // 2])


def _avg(r: dict, total: str, n: str) -> float | None:
    return r[total] / r[n] if r[n] else None


class TopState:
    """Four tables fed by events; :meth:`end_interval` after each drain."""

    def __init__(self) -> None:
        self.flows = Table("flows", f"Top flows ({FLOW_WINDOW} intervals)", [
            Column("RATE", lambda r: r["rate"], lambda r: rate(r["rate"])),
            Column("SOURCE", lambda r: r["src"], lambda r: r["src"], False, width=21),
            Column("DESTINATION", lambda r: r["dst"], lambda r: r["dst"], False, width=21),
            Column("PROTO", lambda r: r["proto"], lambda r: r["proto"], False),
            Column("DIR", lambda r: r["dir"], lambda r: r["dir"], False),
            Column("IFACE", lambda r: r["iface"], lambda r: r["iface"], False,
                   wide=True),
            Column("PACKETS", lambda r: r["packets"], lambda r: count(r["packets"])),
        ])
        self.tcp = Table("tcp", "TCP peers (since start)", [
            Column("CONNS", lambda r: r["opened"], lambda r: count(r["opened"])),
            Column("PEER", lambda r: r["peer"], lambda r: r["peer"], False, width=21),
            Column("ROLE", lambda r: r["role"], lambda r: r["role"], False),
            Column("FAILED", lambda r: r["failed"], lambda r: count(r["failed"])),
            Column("RETRANS", lambda r: r["retrans"], lambda r: count(r["retrans"])),
            Column("RTT ms", lambda r: _avg(r, "rtt_sum", "rtt_n") or 0,
                   lambda r: ms(_avg(r, "rtt_sum", "rtt_n"))),
            Column("CONN/S", lambda r: r["rate"], lambda r: f"{r['rate']:.1f}"),
        ])
        self.dns = Table("dns", "DNS names (since start)", [
            Column("QUERIES", lambda r: r["queries"], lambda r: count(r["queries"])),
            Column("NAME", lambda r: r["name"], lambda r: r["name"], False, width=21),
            Column("TYPE", lambda r: r["type"], lambda r: r["type"], False),
            Column("ERRORS", lambda r: r["errors"], lambda r: count(r["errors"])),
            Column("ERR %", lambda r: r["errors"] / r["queries"],
                   lambda r: f"{100 * r['errors'] / r['queries']:.0f}"),
            Column("LAT ms", lambda r: _avg(r, "lat_sum", "queries") or 0,
                   lambda r: ms(_avg(r, "lat_sum", "queries"))),
            Column("LAST", lambda r: r["last"], lambda r: r["last"], False),
        ])
        self.drops = Table("drops", "Drops by reason (since start)", [
            Column("PACKETS", lambda r: r["packets"], lambda r: count(r["packets"])),
            Column("REASON", lambda r: r["reason"], lambda r: r["reason"], False),
            Column("PKT/S", lambda r: r["rate"], lambda r: f"{r['rate']:.1f}"),
            Column("LAST FLOW", lambda r: r["flow"], lambda r: r["flow"], False, width=21),
        ])
        self.tables = [self.flows, self.tcp, self.dns, self.drops]
        self._flows_next: dict[tuple, dict] = {}
        self._flow_window: deque[tuple[dict[tuple, dict], float]] = deque(maxlen=FLOW_WINDOW)
        self._interval_counts: dict[tuple[str, tuple], float] = {}
        self.interval_s = 1.0
        self.intervals = 0

    def add(self, ev: Event) -> None:
        fn = getattr(self, "_" + str(ev["signal"]), None)
        if fn is not None:  # signals without a table (HTTP yet) are not shown
            fn(ev)

    def _flows(self, ev: Event) -> None:
        src, dst = _ep(ev, "source"), _ep(ev, "destination")
        key = (src, dst, ev.get("network.transport", ev.get("network.type")),
               ev.get("network.io.direction"), ev.get("network.interface.name"))
        r = self._flows_next.setdefault(key, {
            "src": src, "dst": dst,
            "proto": str(ev.get("network.transport", ev.get("network.type", ""))),
            "dir": "tx" if ev.get("network.io.direction") == "transmit" else "rx",
            "iface": str(ev.get("network.interface.name", "")),
            "bytes": 0, "packets": 0, "rate": 0.0})
        r["bytes"] += ev["network.flow.bytes"]
        r["packets"] += ev["network.flow.packets"]

    def _tcp(self, ev: Event) -> None:
        role = str(ev.get("network.tcp.handshake.role", ""))
        # The remote end: a client's server (address and port), a server's client (address).
        peer = _ep(ev, "server") if role != "server" else _ep(ev, "client", port=False)
        key = (peer, role)
        r = self.tcp.rows.setdefault(key, {"peer": peer, "role": role, "opened": 0,
                                           "failed": 0, "retrans": 0, "rtt_sum": 0.0,
                                           "rtt_n": 0, "rate": 0.0})
        kind = ev["event"]
        if kind == "open":
            r["opened"] += 1
            self._count("tcp", key)
        elif kind == "fail":
            r["failed"] += 1
            r["retrans"] += int(ev.get("network.tcp.retransmits", 0))
            self._count("tcp", key)
        elif kind == "close":
            r["retrans"] += int(ev.get("network.tcp.retransmits", 0))
        if "network.tcp.rtt" in ev and kind in ("rtt", "close"):
            r["rtt_sum"] += float(ev["network.tcp.rtt"])
            r["rtt_n"] += 1
        self.tcp.trim()

    def _dns(self, ev: Event) -> None:
        name = str(ev.get("dns.question.name", "")).lower()
        key = (name, ev.get("dns.question.type"))
        r = self.dns.rows.setdefault(key, {"name": name, "type": str(key[1]), "queries": 0,
                                           "errors": 0, "lat_sum": 0.0, "last": ""})
        r["queries"] += 1
        r["errors"] += int("error.type" in ev)
        r["lat_sum"] += float(ev["dns.lookup.duration"])
        r["last"] = str(ev.get("dns.response_code", ev.get("error.type", "")))
        self.dns.trim()

    def _drops(self, ev: Event) -> None:
        reason = str(ev["network.drop.reason"])
        r = self.drops.rows.setdefault((reason,), {"reason": reason, "packets": 0,
                                                   "rate": 0.0, "flow": ""})
        n = int(ev["network.packet.drops"])
        r["packets"] += n
        if "source.address" in ev:
            r["flow"] = (f"{_ep(ev, 'source')} -> {_ep(ev, 'destination')} "
                         f"{ev.get('network.transport', '')}")
        self._count("drops", (reason,), n)
        self.drops.trim()

    def _count(self, table: str, key: tuple, n: float = 1) -> None:
        k = (table, key)
        self._interval_counts[k] = self._interval_counts.get(k, 0) + n

    def end_interval(self, interval_s: float) -> None:
        """One drain done: the flows table shows this interval; rates are per second."""
        self.intervals += 1
        self.interval_s = interval_s or 1.0
        # Flow rates over the last FLOW_WINDOW intervals: one interval alone jumps
        # with the sender's bursts and stalls (and with when the drain ran).
        self._flow_window.append((self._flows_next, self.interval_s))
        self._flows_next = {}
        seconds = sum(d for _, d in self._flow_window)
        rows: dict[tuple, dict] = {}
        for flows, _ in self._flow_window:
            for key, f in flows.items():
                r = rows.get(key)
                if r is None:
                    rows[key] = r = dict(f, bytes=0, packets=0)
                r["bytes"] += f["bytes"]
                r["packets"] += f["packets"]
        for r in rows.values():
            r["rate"] = r["bytes"] / seconds
        self.flows.rows = rows
        for t in (self.tcp, self.drops):
            for key, r in t.rows.items():
                r["rate"] = self._interval_counts.get((t.name, key), 0) / self.interval_s
        self._interval_counts = {}
