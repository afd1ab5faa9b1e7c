"""The agent's lifecycle rules, in process with the real drops signal loaded:
one rule for a signal that cannot start (switched off with one line, or
fatal with --strict), the watchdog (a dead ring poller restarted and
counted, a stuck export ending the process for the supervisor), and what
/healthz, /readyz and /status say about it (over real HTTP)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

import pytest

from ebpf_otlp import signals as known
from ebpf_otlp.agent import Agent, NothingToRun
from ebpf_otlp.config import AgentConfig
from ebpf_otlp.receiver import Receiver
from ebpf_otlp.signals.base import Signal

pytestmark = pytest.mark.kernel


class Broken(Signal):
    """A signal whose hook this kernel refuses."""

    name = "flows"

    def start(self) -> None:
        raise PermissionError(1, "attach flows_tc_ingress: Operation not permitted")


def _agent(rx: Receiver, signals: tuple[str, ...], strict: bool = False) -> Agent:
    cfg = AgentConfig(endpoint=f"http://127.0.0.1:{rx.port}", signals=signals,
                      ifaces=["lo"], health_listen="127.0.0.1:0", bpf_stats=False)
    cfg.interval_s = 0.5
    return Agent(cfg, strict=strict)


def _get(agent: Agent, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{agent.health.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def broken_flows(monkeypatch):
    real = known.load
    monkeypatch.setattr(known, "load", lambda n: Broken if n == "flows" else real(n))


def test_a_signal_that_cannot_start_is_switched_off_with_one_line(broken_flows, caplog) -> None:
    with Receiver(port=0) as rx:
        agent = _agent(rx, ("flows", "drops"))
        try:
            with caplog.at_level(logging.ERROR, logger="ebpf_otlp.agent"):
                agent.start()
            lines = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
            assert len(lines) == 1, lines
            assert lines[0].startswith("signal flows switched off: ")
            assert "Operation not permitted" in lines[0] and "to fix:" in lines[0]
            assert [s.name for s in agent.signals] == ["drops"]
            # alive, but not ready: a requested signal is off (and said why)
            assert _get(agent, "/healthz")[0] == 200
            code, why = _get(agent, "/readyz")
            assert code == 503 and "flows" in why
            st = json.loads(_get(agent, "/status")[1])
            assert st["signals"]["flows"]["state"] == "off"
            assert "Operation not permitted" in st["signals"]["flows"]["reason"]
            assert st["signals"]["drops"]["hooks"] == ["on_kfree_skb -> tracepoint skb:kfree_skb"]
        finally:
            agent.close(2)
            agent.health.stop()


def test_strict_makes_it_fatal_and_nothing_left_is_fatal_too(broken_flows) -> None:
    with Receiver(port=0) as rx:
        agent = _agent(rx, ("flows", "drops"), strict=True)
        with pytest.raises(PermissionError):
            agent.start()
        agent.close(1)
        assert not agent.signals
        agent = _agent(rx, ("flows",))
        with pytest.raises(NothingToRun, match="no signal could start: flows: "):
            agent.start()
        agent.close(1)


def test_watchdog_restarts_a_dead_poller_and_exits_on_a_stuck_export() -> None:
    with Receiver(port=0) as rx:
        agent = _agent(rx, ("drops",))
        fatal: list[str] = []
        agent.on_fatal = fatal.append
        try:
            agent.start()
            poll = agent.poller.poll
            calls = {"n": 0}

            def dies_once(ms: int) -> None:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise SystemExit("poller thread dies")  # not an Exception: ends the loop
                return poll(ms)

            agent.poller.poll = dies_once
            deadline = time.monotonic() + 15
            while agent.restarts["ring-poller"] == 0:
                assert time.monotonic() < deadline, "dead poller not restarted"
                time.sleep(0.1)
            beat = agent.poll_beat
            time.sleep(0.5)
            assert agent.poll_beat > beat and agent.alive()[0], "restarted poller not polling"
            assert _get(agent, "/healthz")[0] == 200
            # an export that runs past its bound: unhealthy, then the process ends
            agent.export_started = time.monotonic() - 10_000
            assert _get(agent, "/healthz") == (503, "export stuck\n")
            agent.check_threads()
            assert fatal and "an export has run" in fatal[0]
            agent.export_started = None
            agent.collect_and_export()
            st = json.loads(_get(agent, "/status")[1])
            assert st["counters"]["restarts"] == {"ring-poller": 1}
            assert st["last_export"]["ok"] is True
        finally:
            agent.close(2)
            agent.health.stop()
    restarts = [r for r in rx.records if r.get("name") == "ebpf_otlp.agent.restarts"]
    assert restarts and max(r["value"] for r in restarts) == 1


def test_an_export_that_raises_is_counted_and_the_loop_goes_on() -> None:
    """The SDK raises from force_flush when a callback overruns its time; that
    must cost one interval, not the export loop."""
    with Receiver(port=0) as rx:
        agent = _agent(rx, ("drops",))
        try:
            agent.start()
            real = agent.exporter.export

            def raises() -> bool:
                raise Exception("MeterProvider.force_flush failed")

            agent.exporter.export = raises
            errors = agent.collect_errors
            agent.collect_and_export()
            assert agent.collect_errors == errors + 1
            assert agent.last_export["ok"] is False
            agent.exporter.export = real
            agent.collect_and_export()
            assert agent.last_export["ok"] is True
        finally:
            agent.close(2)
            agent.health.stop()
