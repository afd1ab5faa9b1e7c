"""Decoded rows of each signal -> events: flat dicts whose keys are the OTLP
attribute (and metric) names the agent exports, plus ``time`` (unix ns),
``signal`` and ``event``.

The rows come from the signals' own decoders through ``Signal.tap``:

| signal | rows | events |
| --- | --- | --- |
| tcp | ring records (``tcp_event``) | ``open``, ``close``, ``fail``; ``rtt`` (for ``top``) |
| dns | its spans, as handed to the exporter | ``lookup`` (answered or timed out) |
| drops | ``DropRow`` per (reason, flow) and interval | ``drop`` with ``network.packet.drops`` |
| flows | one ``Drained`` table per interval | ``flow`` per flow and direction |
| http | its spans, as handed to the exporter | ``request`` (server or client side) |

DNS and HTTP need no tap: their spans carry every attribute, and the view's
exporter receives them (:class:`~.session.LocalExporter`).
"""

from __future__ import annotations

import time
from dataclasses import fields

import numpy as np

from .. import signals as _signals
from ..config import FLOW_ATTRIBUTES
from ..otlp.spans import SPAN_KIND_SERVER
from ..platform.host import epoch_offset_ns
from ..signals.flows import agg
from ..signals.flows import attrs as fattrs
from ..signals.tcp.records import (
    CONN_ATTRIBUTES,
    EV_CLOSE,
    EV_FAIL,
    EV_OPEN,
    EV_RTT,
    F_TRACKED,
    AttributeMapper,
    failure_cause,
)

Event = dict[str, object]
SIGNALS = tuple(s for s in ("tcp", "dns", "drops", "flows", "http")
                if s in _signals.available())
_TCP_KINDS = {EV_OPEN: "open", EV_CLOSE: "close", EV_FAIL: "fail", EV_RTT: "rtt"}


class EventMaker:
    """Turns one tap call into events. ``flows_top``: flows per interval turned into
    events, busiest (by bytes) first: a person reads tens, and a table of 100,000
    flows must not cost 100,000 dicts every second."""

    def __init__(self, flows_top: int = 5000):
        self.mapper = AttributeMapper(CONN_ATTRIBUTES)  # the TCP signal's own decoder
        self.flows_top = flows_top
        self.interval_s = 1.0  # set by the session before each drain
        self.flows_seen = 0  # flows drained, before the top-N cut

    def events(self, what: str, rows: object) -> list[Event]:
        fn = getattr(self, "_" + what, None)
        return fn(rows) if fn is not None else []

    def _tcp(self, recs: np.ndarray) -> list[Event]:
        offset = epoch_offset_ns()
        out = []
        for rec in recs:
            kind = _TCP_KINDS.get(int(rec["kind"]))
            if kind is None:
                continue  # counted by the signal (ebpf_otlp.tcp.dropped{bad_record})
            ev: Event = {"time": int(rec["ts_ns"]) + offset, "signal": "tcp", "event": kind}
            ev.update(self.mapper.span(rec))
            start, est = int(rec["start_ns"]), int(rec["est_ns"])
            if kind == "open":
                if start and est >= start:
                    ev["network.tcp.handshake.duration"] = (est - start) / 1e9
            elif kind == "close":
                begin = start or est
                if int(rec["flags"]) & F_TRACKED and begin:
                    ev["network.tcp.connection.duration"] = (int(rec["ts_ns"]) - begin) / 1e9
                ev["network.tcp.bytes.transmit"] = int(rec["bytes_tx"])
                ev["network.tcp.bytes.receive"] = int(rec["bytes_rx"])
                ev["network.tcp.retransmits"] = int(rec["retrans"])
                if int(rec["srtt_us"]):
                    ev["network.tcp.rtt"] = int(rec["srtt_us"]) / 1e6
            elif kind == "fail":
                ev["error.type"] = failure_cause(int(rec["cause"]), int(rec["flags"]))
                ev["network.tcp.retransmits"] = int(rec["retrans"])
            else:
                ev["network.tcp.rtt"] = int(rec["srtt_us"]) / 1e6
            out.append(ev)
        return out

    def _dns(self, spans: list) -> list[Event]:
        out = []
        for s in spans:
            ev: Event = {"time": s.start_ns, "signal": "dns", "event": "lookup"}
            ev.update(s.attributes)
            ev["dns.lookup.duration"] = max(0, s.end_ns - s.start_ns) / 1e9
            if s.error is not None:
                ev["error.type"] = s.error
            out.append(ev)
        return out

    def _http(self, spans: list) -> list[Event]:
        out = []
        for s in spans:
            server = s.kind == SPAN_KIND_SERVER
            ev: Event = {"time": s.start_ns, "signal": "http", "event": "request",
                         "http.side": "server" if server else "client"}
            ev.update(s.attributes)
            name = f"http.{'server' if server else 'client'}.request.duration"
            ev[name] = max(0, s.end_ns - s.start_ns) / 1e9
            if s.error is not None:
                ev["error.type"] = s.error
            out.append(ev)
        return out

    def _drops(self, rows: list) -> list[Event]:
        offset = epoch_offset_ns()
        out = []
        for r in sorted(rows, key=lambda r: r.first_ns):
            ev: Event = {"time": r.first_ns + offset, "signal": "drops", "event": "drop"}
            ev.update(r.attributes)
            ev["network.packet.drops"] = r.packets
            out.append(ev)
        return out

    def _flows(self, d: agg.Drained) -> list[Event]:
        n = len(d)
        self.flows_seen += n
        if not n:
            return []
        order = np.argsort(d.counts[:, 1], kind="stable")[::-1][:self.flows_top]
        sub = agg.Drained(**{f.name: getattr(d, f.name)[order] for f in fields(d)})
        attrs = fattrs.dicts(agg.project(sub, FLOW_ATTRIBUTES), FLOW_ATTRIBUTES, {})
        now = time.time_ns()  # the end of the interval these counts cover
        interval = self.interval_s or 1.0
        out = []
        for a, (packets, nbytes, segs) in zip(attrs, sub.counts.tolist()):
            ev: Event = {"time": now, "signal": "flows", "event": "flow"}
            ev.update(a)
            ev["network.flow.bytes"] = int(nbytes)
            ev["network.flow.packets"] = int(packets)
            ev["network.flow.segments"] = int(segs)
            ev["interval.seconds"] = round(interval, 3)
            ev["network.flow.bytes.rate"] = nbytes / interval
            out.append(ev)
        return out
