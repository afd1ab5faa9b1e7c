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
from typing import Callable

from . import capabilities
from . import signals as _signals
from .config import AgentConfig, ConfigError
from .health import HealthServer
from .otlp import Exporter
from .platform import tc
from .platform.libbpf import enable_run_time_stats
from .platform.links import InterfaceWatcher, interfaces, is_pattern, match
from .platform.memory import release_free_memory
from .platform.ringbuf import RingPoller
from .signals.base import Signal

log = logging.getLogger(__name__)

__all__ = ["Agent", "ConfigError", "NothingToRun"]


class NothingToRun(RuntimeError):
    """No requested signal could start: exit status 1 (never a process exporting nothing)."""


def _fix_hint(e: BaseException) -> str:
    """What would make a signal start, as far as its error tells."""
    hint = getattr(e, "hint", "")
    if hint:
        return hint
    if isinstance(e, PermissionError):
        return "run as root or grant the capabilities `ebpf-otlp doctor` lists"
    return "`ebpf-otlp doctor` shows what this kernel supports"


FLUSH_TIMEOUT_S = 5.0  # the stated bound of the flush after SIGTERM (README)


def _exit_for_supervisor(why: str) -> None:
    log.critical("watchdog: %s; exiting with status 70 so the supervisor restarts the agent "
                 "(the next start removes hooks left behind)", why)
    logging.shutdown()
    os._exit(70)

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
    def __init__(self, config: AgentConfig, strict: bool = True,
                 exporter: Exporter | None = None,
                 tap: Callable[[str, object], None] | None = None):
        """``strict``: a signal that fails to start stops the agent (else it is skipped).
        ``exporter`` replaces the OTLP one and ``tap`` listens to every signal's
        decoded rows (both for the live views, ``ebpf-otlp observe``/``top``)."""
        self.config = config
        self.strict = strict
        self._given_exporter = exporter
        self._tap = tap
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
        self.switched_off: dict[str, str] = {}  # signal -> why it did not start
        self._closed = False
        # watchdog and health
        self.started_at = time.time()
        self.poll_beat = time.monotonic()  # the poller's last pass
        self.export_started: float | None = None  # monotonic, while an export runs
        self.last_export: dict[str, object] = {}  # finished_at, ok, duration_s
        self.restarts: dict[str, int] = {"ring-poller": 0}
        self.stuck_after_s = max(30.0, 3 * config.interval_s)
        self.on_fatal: Callable[[str], None] = _exit_for_supervisor
        self.health: HealthServer | None = None
        self._watchdog: threading.Thread | None = None
        self._signals_seen = 0
        self._pausing = False
        self.reload_requested = threading.Event()
        self.reload_config: Callable[[], AgentConfig] | None = None  # SIGHUP re-reads this
        self.reloads = 0

    # --- start ---------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        if any(s in cfg.signals for s in ("flows", "dns")) and not self.iface_patterns:
            raise ConfigError("flows and dns need at least one --iface")
        capabilities.check(cfg)  # one message naming every missing capability
        capabilities.warn_degraded(cfg, log)  # runs, but sees less: one line each
        for name, idx in self.ifindex.items():
            n = tc.remove_stale(idx)
            if n:
                log.warning("removed %d tc filters an earlier ebpf-otlp run left on %s", n, name)
        if cfg.bpf_stats:
            self._stats_fd = enable_run_time_stats()
            if self._stats_fd < 0:  # never export run times that silently read 0
                log.warning("BPF run-time statistics off: the kernel refused them (they need "
                            "CAP_SYS_ADMIN%s); ebpf_otlp.program.run_time is not exported "
                            "(--no-bpf-stats silences this)",
                            "" if capabilities.stats_allowed() else ", which is missing")
        self.exporter = self._given_exporter or Exporter(
            self.settings, cfg.interval_s, cfg.cardinality_limit,
            span_queue=max(65536, cfg.dns_max_pending))
        self.exporter.set_queue_bytes(cfg.export_queue_bytes)
        self.poller = RingPoller()
        for name in cfg.signals:
            self.start_signal(name, cfg)
        if not self.signals:
            raise NothingToRun("no signal could start: " + "; ".join(
                f"{k}: {v}" for k, v in self.switched_off.items()))
        if self.watcher is not None:
            self.watcher.known = dict(self.ifindex)
        self._register_health()
        self._start_poller()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()
        if cfg.health_listen:
            try:
                self.health = HealthServer(cfg.health_listen, self.alive, self.ready,
                                           self.status).start()
            except OSError as e:
                raise ConfigError(f"--health-listen {cfg.health_listen}: {e.strerror}") from None
        log.warning("ebpf-otlp running: signals=%s ifaces=%s endpoint=%s interval=%ss",
                    ",".join(s.name for s in self.signals), ",".join(cfg.ifaces) or "-",
                    self.settings.metrics.url, cfg.interval_s)

    def start_signal(self, name: str, cfg: AgentConfig) -> Signal | None:
        """Start one signal and poll its rings; on failure switch it off with one
        line (or raise, with ``strict``)."""
        sig = None
        try:
            sig = _signals.load(name)(cfg, self.exporter)
            if self._tap is not None:
                sig.taps.append(self._tap)
            sig.start()
        except Exception as e:
            if sig is not None:
                try:
                    sig.close()
                except Exception:
                    log.exception("closing %s after its failed start failed", name)
            if self.strict or isinstance(e, ConfigError):  # a bad value: exit 2, not "off"
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.switched_off[name] = first
            log.error("signal %s switched off: %s; to fix: %s (--strict makes this fatal)",
                      name, first, _fix_hint(e))
            return None
        self.switched_off.pop(name, None)
        self.signals.append(sig)
        for ring in sig.rings():
            self.poller.add(ring)
        return sig

    def stop_signal(self, sig: Signal) -> None:
        """Final drain and collect, detach, export what it holds, stop polling its rings."""
        rings = sig.rings()
        for ring in rings:
            self.poller.remove(ring)

        def drain() -> None:
            for ring in rings:
                ring.drain()

        for step in (drain, sig.collect, sig.close, drain, sig.export):
            try:
                step()
            except Exception:
                self.collect_errors += 1
                log.exception("stopping %s: %s failed", sig.name, step.__name__)
        for ring in rings:
            try:
                ring.close()
            except Exception:
                log.exception("closing a ring of %s failed", sig.name)
        self.signals = [s for s in self.signals if s is not sig]

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

        if self._stats_fd >= 0:
            t.observe("ebpf_otlp.program.run_time", "s", "time the kernel spent in our "
                      "programs", lambda: [(ns / 1e9, a) for ns, _, a in run_times()])
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
        t.observe("ebpf_otlp.export.dropped", "{item}",
                  "items (metric data points, spans, log records) an OTLP signal's export "
                  "path gave up: queue_full (a byte bound: spans or log records waiting to "
                  "be sent, or the retry queue evicting its oldest request), rejected (the "
                  "collector called it bad), pending_full (delta series over a signal's "
                  "pending bound), shutdown (still waiting at exit)",
                  lambda: [(n, {"signal": k, "reason": r}) for k, x in t.senders.items()
                           for r, n in dict(x.dropped).items()])
        t.observe("ebpf_otlp.export.queue.size", "By",
                  "bytes of undelivered OTLP requests waiting for the collector",
                  lambda: [(x.queued_bytes, {"signal": k}) for k, x in t.senders.items()],
                  kind="gauge")
        t.observe("ebpf_otlp.agent.restarts", "{restart}",
                  "agent threads the watchdog found stopped and restarted",
                  lambda: [(n, {"thread": k}) for k, n in self.restarts.items()])

    # --- loops -----------------------------------------------------------------
    def _start_poller(self) -> None:
        self._pausing = False
        self._poll_thread = threading.Thread(target=self._poll_loop, name="ring-poller",
                                             daemon=True)
        self.poll_beat = time.monotonic()
        self._poll_thread.start()

    def _poll_loop(self) -> None:
        while not self.stop_event.is_set() and not self._pausing:
            self.poll_beat = time.monotonic()
            try:
                self.poller.poll(self.config.poll_interval_ms)
                for s in self.signals:
                    s.tick()
            except Exception:
                self.poll_errors += 1
                log.exception("ring buffer poll failed")
                time.sleep(0.1)

    def collect_and_export(self) -> None:
        t0 = time.monotonic()
        self.export_started = t0
        errors = self.collect_errors
        failures = sum(x.failures for x in self.exporter.senders.values())
        ok = False
        self.exporter.begin_interval()  # every request of this interval shares one budget
        try:
            for step in ("collect", "export"):
                for s in self.signals:
                    try:
                        getattr(s, step)()
                    except Exception:
                        self.collect_errors += 1
                        log.exception("%s of %s failed", step, s.name)
            try:
                ok = self.exporter.export()
            except Exception:  # the SDK raises when a callback overruns: next interval
                self.collect_errors += 1
                log.exception("export failed")
            ok = ok and failures == sum(x.failures for x in self.exporter.senders.values())
            release_free_memory()  # RSS follows live memory, not the largest burst
        finally:
            self.export_started = None
            self.last_export = {"finished_at": time.time(), "ok": ok,
                                "errors": self.collect_errors - errors,
                                "duration_s": round(time.monotonic() - t0, 3)}

    # --- watchdog ------------------------------------------------------------------
    def _watch(self, period_s: float = 1.0) -> None:
        """Restart a ring poller that died; a thread stuck past :attr:`stuck_after_s`
        (or an export past its bound) ends the process non-zero for the supervisor."""
        while not self.stop_event.wait(period_s):
            try:
                self.check_threads()
            except Exception:
                log.exception("watchdog check failed")

    def check_threads(self) -> None:
        if self.stop_event.is_set() or self._pausing:
            return
        now = time.monotonic()
        t = self._poll_thread
        if t is not None and not t.is_alive():
            self.restarts["ring-poller"] += 1
            log.error("watchdog: the ring-buffer poller stopped; restarting it (%d restarts)",
                      self.restarts["ring-poller"])
            self._start_poller()
        elif now - self.poll_beat > self.stuck_after_s:
            self.on_fatal(f"the ring-buffer poller is stuck ({now - self.poll_beat:.0f} s "
                          "without a pass)")
        bound = self.stuck_after_s + self.exporter.timeout_s * 4
        started = self.export_started
        if started is not None and now - started > bound:
            self.on_fatal(f"an export has run {now - started:.0f} s (bound {bound:.0f} s)")

    # --- health ----------------------------------------------------------------------
    def alive(self) -> tuple[bool, str]:
        now = time.monotonic()
        if self._poll_thread is None or not self._poll_thread.is_alive():
            return False, "ring-buffer poller not running"
        if now - self.poll_beat > self.stuck_after_s:
            return False, "ring-buffer poller stuck"
        started = self.export_started
        if started is not None and now - started > self.stuck_after_s:
            return False, "export stuck"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        ok, why = self.alive()
        if not ok:
            return ok, why
        if self.switched_off:
            return False, "signals off: " + ", ".join(sorted(self.switched_off))
        if not self.last_export:
            return False, "no export attempt finished yet"
        return True, "ok"

    def status(self) -> dict[str, object]:
        sigs: dict[str, object] = {}
        for s in list(self.signals):
            sigs[s.name] = {"state": "running",
                            "hooks": [h for o in s.bpf_objects() for h in o.hooks()],
                            "rings": {r.name: {"received": r.received, "lost": r.lost()}
                                      for r in s.rings()}}
        for name, why in self.switched_off.items():
            sigs[name] = {"state": "off", "reason": why}
        senders = {k: {"url": x.target.url, "requests": x.requests, "failures": x.failures,
                       "retries": x.retries, "bytes_sent": x.bytes_sent,
                       "errors": dict(x.errors), "queued_bytes": x.queued_bytes,
                       "dropped": dict(x.dropped)}
                   for k, x in (self.exporter.senders.items() if self.exporter else [])}
        alive, why = self.alive()
        return {"alive": alive, "why": why, "ready": self.ready()[0],
                "stopping": self.stop_event.is_set(), "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 1),
                "interval_s": self.config.interval_s, "signals": sigs,
                "last_export": self.last_export, "export": senders,
                "dropped": {"spans": dict(self.exporter.spans.dropped) if self.exporter else {},
                            "logs": dict(self.exporter.logs.dropped) if self.exporter else {}},
                "reloads": self.reloads,
                "counters": {"poll_errors": self.poll_errors,
                             "collect_errors": self.collect_errors,
                             "restarts": dict(self.restarts)}}

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
        """Export every interval until :attr:`stop_event` is set; reload on request;
        look for new interfaces every second in between."""
        next_at = time.monotonic() + self.config.interval_s
        next_watch = time.monotonic() + WATCH_EVERY_S
        while not self.stop_event.wait(max(0.0, min(0.2, next_at - time.monotonic()))):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
                next_at = min(next_at, time.monotonic() + self.config.interval_s)
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_EVERY_S
                try:
                    self.watch_interfaces()
                except Exception:
                    self.collect_errors += 1
                    log.exception("interface watch failed")
            if time.monotonic() < next_at:
                continue
            self.collect_and_export()
            interval = self.config.interval_s
            next_at += interval
            if next_at < time.monotonic():  # an export overran: skip, don't burst
                next_at = time.monotonic() + interval

    def reload(self) -> None:
        """Re-read the configuration (SIGHUP) and apply it; a bad one changes nothing."""
        from .reload import apply

        if self.reload_config is None:
            log.warning("SIGHUP: no --config file to reload")
            return
        try:
            new = self.reload_config()
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return
        self._pause_poller()
        try:
            done = apply(self, new)
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return
        except Exception:
            self.collect_errors += 1
            log.exception("SIGHUP: reload failed part way")
            return
        finally:
            self._start_poller()
        self.reloads += 1
        log.warning("SIGHUP: configuration reloaded: %s",
                    ", ".join(f"{k} {v}" for k, v in done.items()))

    def _pause_poller(self) -> None:
        """Stop the poller thread (rings are about to change); :meth:`_start_poller`
        starts it again."""
        self._pausing = True  # until _start_poller: the watchdog leaves it alone
        t = self._poll_thread
        if t is not None:
            t.join(timeout=10)

    # --- stop ------------------------------------------------------------------
    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Final drain of every signal, one last export, then the exporter stops
        (within about ``flush_timeout_s``). Idempotent; hooks are gone whatever fails."""
        if self._closed:
            return
        self._closed = True
        self.stop_event.set()
        deadline = time.monotonic() + flush_timeout_s
        if self.exporter is not None:
            for x in self.exporter.senders.values():
                x.deadline = deadline  # the final exports share the flush budget
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
            self.exporter.shutdown(max(0.1, deadline - time.monotonic()))

    def detach_now(self) -> int:
        """Remove the hooks that outlive the process (TC filters) at once, from any
        thread, without draining or flushing; returns how many. Links (tracepoints,
        XDP, sock_ops, uprobes) go with the process."""
        n = 0
        for s in list(self.signals):
            for obj in s.bpf_objects():
                for f in obj.tc_filters():
                    try:
                        f.detach()
                        n += 1
                    except Exception as e:
                        log.error("detaching %s: %s", f, e)
        return n

    def _on_signal(self, signum: int, flush_timeout_s: float) -> None:
        if signum == signal.SIGHUP:
            log.warning("SIGHUP: reloading the configuration")
            self.reload_requested.set()
            return
        self._signals_seen += 1
        if self._signals_seen == 1:
            log.warning("signal %d: flushing (at most %.0f s) and detaching; send it "
                        "again to detach at once", signum, flush_timeout_s)
            if self.exporter is not None:  # no retry starts past the flush budget
                for x in self.exporter.senders.values():
                    x.deadline = time.monotonic() + flush_timeout_s
            self.stop_event.set()
            return
        n = self.detach_now()
        log.warning("signal %d again: %d TC filters detached, exiting now; unsent "
                    "telemetry dropped", signum, n)
        logging.shutdown()
        os._exit(130)

    def run_until_signalled(self, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Run until SIGINT/SIGTERM, then flush within ``flush_timeout_s`` and detach.

        Signals are acted on by a thread of their own (the C-level handler writes
        them to a wakeup pipe), so a second SIGINT or SIGTERM acts at once whatever
        the main thread is blocked in: it removes the hooks and ends the process
        with status 130, dropping what was left to send. Returns the exit status (0)."""
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(rfd, True)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        old = {s: signal.signal(s, lambda *_: None) for s in sigs}

        def take_signals() -> None:
            while True:
                try:
                    data = os.read(rfd, 64)
                except OSError:
                    return
                if not data:
                    return
                for signum in data:
                    if signum in sigs:
                        self._on_signal(signum, flush_timeout_s)

        threading.Thread(target=take_signals, name="signals", daemon=True).start()
        try:
            try:
                self.start()
                self.run()
            finally:
                self.close(flush_timeout_s)
        finally:
            if self.health is not None:
                self.health.stop()
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wfd)
            os.close(rfd)
        return 0
