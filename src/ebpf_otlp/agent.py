"""The agent: starts the signals, drains their ring buffers on one thread,
drains their maps and exports once per interval on another, and tears
everything down on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from . import signals as _signals
from .config import AgentConfig, ConfigError
from .otlp import Exporter
from .platform import tc
from .platform.libbpf import BpfError, enable_run_time_stats
from .platform.links import InterfaceWatcher, interfaces, is_pattern, match
from .platform.ringbuf import RingPoller
from .signals.base import Signal

log = logging.getLogger(__name__)

__all__ = ["Agent", "ConfigError"]

WATCH_EVERY_S = 1.0  # new --iface matches and re-created interfaces are found this fast


def resolve_ifaces(names: list[str]) -> dict[str, int]:
    """Plain names must exist; globs (``veth*``) select what exists now, maybe nothing."""
    out = {}
    for name in names:
        if is_pattern(name):
            continue
        try:
            out[name] = socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"no such interface: {name}") from None
    if any(is_pattern(n) for n in names):
        out.update(match(names, interfaces()))
    return out


class Agent:
    def __init__(self, config: AgentConfig, strict: bool = True):
        """``strict``: a signal that fails to start stops the agent (else it is skipped)."""
        self.config = config
        self.strict = strict
        self.ifindex = resolve_ifaces(config.ifaces)
        # Globs are matched again while running (containers come and go); the
        # signals start on the interfaces that match now.
        self.iface_patterns = list(config.ifaces)
        self.watcher = InterfaceWatcher(self.iface_patterns) if self.iface_patterns else None
        config.ifaces = list(self.ifindex)
        self.ifaces_added = 0
        self.iface_errors = 0
        self.settings = config.export_settings()  # a bad OTEL_* value fails here, exit 2
        self.exporter: Exporter | None = None
        self.signals: list[Signal] = []
        self.poller: RingPoller | None = None
        self.stop_event = threading.Event()
        self._poll_thread: threading.Thread | None = None
        self._stats_fd = -1
        self.poll_errors = 0
        self.collect_errors = 0
        self._closed = False

    # --- start ---------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        if any(s in cfg.signals for s in ("flows", "dns")) and not self.iface_patterns:
            raise ConfigError("flows and dns need at least one --iface")
        for name, idx in self.ifindex.items():
            n = tc.remove_stale(idx)
            if n:
                log.warning("removed %d tc filters an earlier ebpf-otlp run left on %s", n, name)
        if cfg.bpf_stats:  # refused on old kernels: run time then reads as 0
            self._stats_fd = enable_run_time_stats()
        self.exporter = Exporter(self.settings, cfg.interval_s, cfg.cardinality_limit,
                                 span_queue=max(65536, cfg.dns_max_pending))
        self.poller = RingPoller()
        for name in cfg.signals:
            sig = None
            try:
                sig = _signals.load(name)(cfg, self.exporter)
                sig.start()
            except (BpfError, OSError, RuntimeError) as e:
                if sig is not None:
                    sig.close()
                if self.strict:
                    raise
                log.error("signal %s not started: %s", name, e)
                continue
            self.signals.append(sig)
            for ring in sig.rings():
                self.poller.add(ring)
        if self.watcher is not None:
            self.watcher.known = dict(self.ifindex)
        self._register_health()
        self._poll_thread = threading.Thread(target=self._poll_loop, name="ring-poller",
                                             daemon=True)
        self._poll_thread.start()
        log.warning("ebpf-otlp running: signals=%s ifaces=%s endpoint=%s interval=%ss",
                    ",".join(s.name for s in self.signals), ",".join(cfg.ifaces) or "-",
                    self.settings.metrics.url, cfg.interval_s)

    def _register_health(self) -> None:
        t = self.exporter

        def rings():
            for s in self.signals:
                for r in s.rings():
                    yield s, r

        t.observe("ebpf_otlp.events.received", "{event}", "records read from ring buffers",
                  lambda: [(r.received, {"signal": s.name, "ring": r.name}) for s, r in rings()])
        def lost():
            for s, r in rings():
                yield r.lost(), {"signal": s.name, "ring": r.name, "reason": "ringbuf_full"}
                for reason, n in dict(r.dropped).items():
                    yield n, {"signal": s.name, "ring": r.name, "reason": reason}

        t.observe("ebpf_otlp.events.lost", "{event}",
                  "records lost: the kernel could not queue them (ringbuf_full), their "
                  "consumer failed (callback_failed), or they had the wrong size (bad_size)",
                  lambda: list(lost()))

        def run_times():
            for s in self.signals:
                for p in s.programs():
                    ns, cnt = p.run_stats()
                    yield ns, cnt, {"signal": s.name, "program": p.name}

        t.observe("ebpf_otlp.program.run_time", "s", "time the kernel spent in our programs",
                  lambda: [(ns / 1e9, a) for ns, _, a in run_times()])
        t.observe("ebpf_otlp.program.runs", "{run}", "runs of our programs",
                  lambda: [(cnt, a) for _, cnt, a in run_times()])
        t.observe("ebpf_otlp.interfaces.attached", "{interface}",
                  "interfaces attached while running: new --iface glob matches and "
                  "interfaces deleted and created again",
                  lambda: [(self.ifaces_added, {})])
        t.observe("ebpf_otlp.interfaces.attach_errors", "{error}",
                  "interfaces that appeared but a signal could not attach to",
                  lambda: [(self.iface_errors, {})])
        t.observe("ebpf_otlp.program.misses", "{run}",
                  "runs of our programs the kernel skipped because another BPF program was "
                  "running on that CPU (their events are lost)",
                  lambda: [(p.recursion_misses(), {"signal": s.name, "program": p.name})
                           for s in self.signals for p in s.programs()])
        t.observe("ebpf_otlp.agent.errors", "{error}", "errors caught in the agent's loops",
                  lambda: [(self.poll_errors, {"loop": "poll"}),
                           (self.collect_errors, {"loop": "collect"})])

    # --- loops -----------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.poller.poll(self.config.poll_interval_ms)
                for s in self.signals:
                    s.tick()
            except Exception:
                self.poll_errors += 1
                log.exception("ring buffer poll failed")
                time.sleep(0.1)

    def collect_and_export(self) -> None:
        for step in ("collect", "export"):
            for s in self.signals:
                try:
                    getattr(s, step)()
                except Exception:
                    self.collect_errors += 1
                    log.exception("%s of %s failed", step, s.name)
        self.exporter.export()

    def watch_interfaces(self) -> None:
        """Attach the signals to interfaces that began to match ``--iface`` (a glob) or
        came back under a watched name with a new index (a container restart)."""
        if self.watcher is None:
            return
        added, gone = self.watcher.poll()
        for name, idx in gone.items():
            log.info("interface %s (ifindex %d) is gone", name, idx)
            self.ifindex.pop(name, None)
        for name, idx in added.items():
            log.warning("interface %s (ifindex %d) appeared: attaching", name, idx)
            self.ifindex[name] = idx
            self.ifaces_added += 1
            for s in self.signals:
                try:
                    s.add_interface(name, idx)
                except Exception as e:  # it may be gone again already
                    self.iface_errors += 1
                    log.warning("%s: attaching to %s failed: %s", s.name, name, e)

    def run(self) -> None:
        """Export every interval until :attr:`stop_event` is set; look for new
        interfaces every second in between."""
        interval = self.config.interval_s
        next_at = time.monotonic() + interval
        while not self.stop_event.wait(max(0.0, min(next_at - time.monotonic(),
                                                    WATCH_EVERY_S))):
            try:
                self.watch_interfaces()
            except Exception:
                self.collect_errors += 1
                log.exception("interface watch failed")
            if time.monotonic() < next_at:
                continue
            self.collect_and_export()
            next_at += interval
            if next_at < time.monotonic():  # an export overran: skip, don't burst
                next_at = time.monotonic() + interval

    # --- stop ------------------------------------------------------------------
    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Final drain of every signal, one last export, then the exporter stops
        (within about ``flush_timeout_s``). Idempotent; hooks are gone whatever fails."""
        if self._closed:
            return
        self._closed = True
        self.stop_event.set()
        if self._poll_thread is not None:
            self._poll_thread.join(timeout=2)
        try:
            if self.poller is not None:
                try:
                    self.poller.drain()
                except Exception:
                    log.exception("final ring drain failed")
            for s in self.signals:
                try:
                    s.collect()
                except Exception:
                    log.exception("final collect of %s failed", s.name)
        finally:
            # Signals detach and drain what arrived since (losses counted at shutdown
            # included) before the last export, so nothing is left unsent.
            for s in self.signals:
                try:
                    s.close()
                except Exception:
                    log.exception("closing %s failed", s.name)
            if self.poller is not None:
                self.poller.close()
            if self._stats_fd >= 0:
                os.close(self._stats_fd)
                self._stats_fd = -1
        if self.exporter is not None:
            for s in self.signals:
                try:
                    s.export()
                except Exception:
                    log.exception("final export of %s failed", s.name)
            self.exporter.shutdown(flush_timeout_s)

    def run_until_signalled(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.warning("signal %d: flushing and detaching", signum)
            self.stop_event.set()

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            self.run()
        finally:
            self.close()
            for s, h in old.items():
                signal.signal(s, h)
