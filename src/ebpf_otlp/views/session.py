"""The signals running for a view: the agent's own start, drain and close, with
an exporter that keeps nothing and sends nothing, and a tap on every signal.

A view is its own process with its own BPF objects and hooks, so it runs
beside ``ebpf-otlp run`` without touching the agent's counts: TC programs
return ``TC_ACT_UNSPEC`` (both filters see every packet), and start-up only
removes TC filters no live process holds (``platform.tc.remove_stale``).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from ..config import AgentConfig
from ..otlp import Exporter, ExportSettings, SpanRecord
from ..otlp.spans import SpanGroup
from ..otlp.sums import SumMetric
from .events import Event, EventMaker

log = logging.getLogger(__name__)

# Events waiting for the output thread; beyond this they are counted and dropped
# (a terminal that cannot keep up must not grow memory without bound).
QUEUE_MAX = 100_000


class LocalExporter(Exporter):
    """The exporter seam, short-circuited: signals hand over as usual, nothing is
    encoded or sent (the views read the decoded rows through the taps)."""

    def __init__(self, config: AgentConfig,
                 on_spans: Callable[[list[SpanRecord]], None] | None = None):
        self.on_spans = on_spans
        settings = ExportSettings.resolve(endpoint="http://127.0.0.1:9", headers={},
                                          timeout_s=1.0, resource={"service.name": "view"},
                                          env={})
        super().__init__(settings, config.interval_s, config.cardinality_limit, span_queue=1)

    def submit_spans(self, spans: Iterable[SpanRecord | tuple]) -> int:
        """Spans (HTTP, ...) go to the view, which makes events of them."""
        if self.on_spans is not None:
            recs = [s if isinstance(s, SpanRecord) else SpanRecord(*s) for s in spans]
            if recs:
                self.on_spans(recs)
        return 0

    def submit_span_groups(self, start_ns: np.ndarray, end_ns: np.ndarray, group: np.ndarray,
                           groups: Sequence[SpanGroup],
                           columns: Sequence[tuple[str, Sequence[object]]] = (),
                           trace_ids: np.ndarray | None = None,
                           parent_ids: Sequence[bytes | None] | None = None) -> int:
        """Spans given as columns (DNS, HTTP) become records for the view: one per span."""
        if self.on_spans is None or not len(start_ns):
            return 0
        cols = [(k, list(v)) for k, v in columns]
        out = []
        for i, (s, e, g) in enumerate(zip(start_ns.tolist(), end_ns.tolist(), group.tolist())):
            sg = groups[g]
            attrs = tuple(sg.attributes) + tuple((k, v[i]) for k, v in cols)
            parent = parent_ids[i] if parent_ids is not None else None
            trace = trace_ids[i].tobytes() if parent and trace_ids is not None else None
            out.append(SpanRecord(s, e, sg.name, attrs, sg.error, sg.kind, trace, parent,
                                  sg.resource))
        self.on_spans(out)
        return 0

    def send_sums(self, metrics: Sequence[SumMetric], attrs: Sequence[bytes],
                  values: np.ndarray, start_ns: np.ndarray, time_ns: int,
                  chunk: int = 0) -> np.ndarray:
        return np.ones(len(attrs), bool)

    def export(self) -> bool:
        self.series.interval_done()  # the per-interval bookkeeping an export would do
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        for s in self.senders.values():
            s.close()


class AgentLike(Protocol):
    """What a view needs of :class:`ebpf_otlp.agent.Agent` (only the CLI imports it)."""

    signals: list

    def start(self) -> None: ...
    def collect_and_export(self) -> None: ...
    def close(self, flush_timeout_s: float = 5.0) -> None: ...


AgentFactory = Callable[..., AgentLike]


class Session:
    """Starts the signals, turns their rows into events on a bounded queue,
    drains the kernel maps every ``config.interval_s``; stops on SIGINT/SIGTERM."""

    def __init__(self, make_agent: AgentFactory, config: AgentConfig,
                 accept: Callable[[Event], bool] = lambda e: True,
                 flows_top: int = 5000):
        self.config = config
        self.accept = accept
        self.events: queue.Queue[Event] = queue.Queue(QUEUE_MAX)
        self.dropped = 0  # events not queued (output too slow), reported at the end
        self._dropped_lock = threading.Lock()  # the poller and the drain both queue
        self.maker = EventMaker(flows_top=flows_top)
        self.stop = threading.Event()
        self.intervals = 0
        self.last_collect = time.monotonic()
        exporter = LocalExporter(config, on_spans=self._on_spans)
        self.agent = make_agent(config, strict=True, exporter=exporter, tap=self._on_rows)

    def _on_rows(self, what: str, rows: object) -> None:
        for ev in self.maker.events(what, rows):
            if not self.accept(ev):
                continue
            try:
                self.events.put_nowait(ev)
            except queue.Full:
                with self._dropped_lock:
                    self.dropped += 1

    def _on_spans(self, spans: list[SpanRecord]) -> None:
        """DNS lookups and HTTP requests arrive as the spans their signal exports
        (they carry every attribute); others (TCP spans, off here) are not shown."""
        dns, http = [], []
        for s in spans:
            keys = {k for k, _ in s.attributes}
            if "dns.question.name" in keys:
                dns.append(s)
            elif "http.request.method" in keys:
                http.append(s)
        if dns:
            self._on_rows("dns", dns)
        if http:
            self._on_rows("http", http)

    @property
    def signals(self) -> list[str]:
        return [s.name for s in self.agent.signals]

    def start(self) -> None:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT,
                                                                      signal.SIGTERM)}
        self.agent.start()
        self.last_collect = time.monotonic()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop.set()

    def collect(self) -> float:
        """Drain the maps now (flows, drops, TCP counters); returns seconds since the last."""
        now = time.monotonic()
        self.maker.interval_s = now - self.last_collect
        self.agent.collect_and_export()
        self.last_collect = now
        self.intervals += 1
        return self.maker.interval_s

    def run(self, handle: Callable[[Event | None], None], seconds: float | None = None) -> None:
        """Call ``handle`` for each event, and with None after each interval's
        drain, until stopped (or ``seconds`` have passed)."""
        interval = self.config.interval_s
        next_at = time.monotonic() + interval
        end = None if seconds is None else time.monotonic() + seconds
        while not self.stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if now >= next_at:
                self.collect()
                for ev in self.pending():  # the drain's events, then the interval's end
                    handle(ev)
                handle(None)
                now = time.monotonic()
                next_at += interval
                if next_at < now:  # a slow drain or output: skip, don't burst
                    next_at = now + interval
            try:
                ev = self.events.get(timeout=max(0.0, min(next_at - now, 0.1)))
            except queue.Empty:
                continue
            handle(ev)

    def pending(self) -> list[Event]:
        """Events queued now and not yet handled (after :meth:`close`: the final drain's)."""
        out = []
        for _ in range(self.events.qsize()):  # not what keeps arriving meanwhile
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        """The agent's own teardown (final drain, every hook detached), then the
        events that drain produced."""
        try:
            self.agent.close(flush_timeout_s=1.0)
        finally:
            for s, h in getattr(self, "_old", {}).items():
                signal.signal(s, h)
