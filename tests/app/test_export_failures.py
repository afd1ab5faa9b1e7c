"""A collector that fails, throttles, hangs or is down: the agent keeps
collecting, retries what the OTLP specification says to retry, counts what
failed, and delivers the flows it counted once the collector answers again.

Truth: the datagrams the test sent (each crosses veth-a's egress hook once),
the scripted collector's own log of what it answered, and the clock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel
PY = sys.executable
FLAKY = str(Path(__file__).parent.parent / "flaky_collector.py")
DNSMASQ = "/usr/sbin/dnsmasq"

UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b'x' * 100, (sys.argv[1], int(sys.argv[2])))
    if i % 20 == 19:
        time.sleep(0.002)
"""


class FlakyCollector:
    """``flaky_collector.py`` in namespace ``ns`` in front of ``upstream``."""

    def __init__(self, topo, ns: str, upstream: ReceiverProc, *steps: str, port: int = 4400):
        self.topo, self.ns, self.port = topo, ns, port
        self.log = Path(upstream.dir) / "flaky.jsonl"
        self.cmd = [PY, FLAKY, "--listen", f"127.0.0.1:{port}", "--upstream",
                    upstream.endpoint, "--log", str(self.log), *steps]
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dir(self) -> str:  # where AgentProc keeps the agent's log
        return str(self.log.parent)

    def answers(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.endswith("}")]

    def __enter__(self) -> FlakyCollector:
        self.proc = self.topo.popen(self.ns, PY, *self.cmd[1:], stderr=subprocess.PIPE,
                                    text=True)
        line = self.proc.stderr.readline()
        assert "listening" in line, line + self.proc.stderr.read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def send_udp(topo, n: int, port: int) -> None:
    topo.run(topo.a, PY, "-c", UDP_SEND, topo.b_ip4, str(port), str(n))


def flow_packets(rx: ReceiverProc, port: int) -> float:
    return metric_total(rx.metrics("network.flow.packets", **{
        "destination.port": port, "network.io.direction": "transmit"}))


def status(topo, port: int) -> dict:
    out = topo.run(topo.a, PY, "-c", "import urllib.request,sys;"
                   f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/status',"
                   "timeout=5).read().decode())").stdout
    return json.loads(out)


def test_500_then_200_and_429_with_retry_after_deliver_every_flow(topo) -> None:
    """500 is final per request (OTLP: not retryable): the flows stay pending and
    go out with the next interval. 429 with Retry-After is retried after the
    time the collector asked for, within the same export."""
    n, port = 300, 40101
    with ReceiverProc(topo, topo.a) as rx, \
            FlakyCollector(topo, topo.a, rx, "500x3", "429x2:retry-after=0.4", "pass") as fc:
        agent = AgentProc(topo, topo.a, fc, "--iface", topo.a_if, "--signals", "flows",
                          interval=1.0)
        with agent:
            send_udp(topo, n, port)
            rx.wait_for(lambda: flow_packets(rx, port) >= n, timeout=30,
                        what=f"{n} packets delivered after the failures")
            assert agent.stop() == 0
        assert flow_packets(rx, port) == n, "packets lost or doubled across the failures"
        codes = [a["status"] for a in fc.answers()]
        assert codes[:5] == [500, 500, 500, 429, 429], codes
        t429 = [a["t"] for a in fc.answers() if a["status"] == 429]
        after = [a["t"] for a in fc.answers()][5]
        assert after - t429[-1] >= 0.3, "Retry-After not honoured"
        fails = rx.metrics("ebpf_otlp.export.failures", signal="metrics")
        assert metric_total(fails) >= 3, fails  # the three 500s (429s were retried)
        assert "Traceback" not in agent.log()


def test_hung_collector_collection_goes_on_and_sigterm_is_bounded(topo) -> None:
    """A collector that accepts the connection and never answers: export
    attempts time out and are counted (seen on /status), collection goes on,
    and SIGTERM returns within the stated bound: the request in flight (at most
    the interval) plus the 5 s flush."""
    interval, hport = 2.0, 4411
    with ReceiverProc(topo, topo.a) as rx, FlakyCollector(topo, topo.a, rx, "hang:3600") as fc:
        agent = AgentProc(topo, topo.a, fc, "--iface", topo.a_if, "--signals", "flows,drops",
                          "--health-listen", f"127.0.0.1:{hport}", interval=interval)
        with agent:
            deadline = time.monotonic() + 40
            while True:
                st = status(topo, hport)
                timeouts = st["export"]["metrics"]["errors"].get("timeout", 0)
                if timeouts >= 2:
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.5)
            assert st["alive"] and st["last_export"] and not st["last_export"]["ok"]
            # still collecting: the poller passes and exports keep being attempted
            seen = st["last_export"]["finished_at"]
            deadline = time.monotonic() + 20
            while status(topo, hport)["last_export"]["finished_at"] == seen:
                assert time.monotonic() < deadline, "exports stopped against a hung collector"
                time.sleep(0.3)
            t0 = time.monotonic()
            rc = agent.stop(signal.SIGTERM, timeout=60)
            took = time.monotonic() - t0
        print(f"SIGTERM against a hung collector: exited in {took:.1f} s")
        assert rc == 0, agent.log()
        assert took <= interval + 5.0 + 3.0, f"SIGTERM took {took:.1f} s"
        shown = topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if, "egress").stdout
        assert "flows_tc" not in shown, shown
        assert "Traceback" not in agent.log()


def test_second_sigint_detaches_at_once(topo) -> None:
    with ReceiverProc(topo, topo.a) as rx, FlakyCollector(topo, topo.a, rx, "hang:3600") as fc:
        agent = AgentProc(topo, topo.a, fc, "--iface", topo.a_if, "--signals", "flows",
                          "--tc-mode", "tc", interval=5.0)  # filters outlive the process
        with agent:
            rx.wait_for(lambda: fc.answers(), what="an export hanging on the collector")
            agent.proc.send_signal(signal.SIGINT)
            rx.wait_for(lambda: "send it again" in agent.log(), what="the first SIGINT taken")
            t0 = time.monotonic()
            rc = agent.stop(signal.SIGINT, timeout=30)
            took = time.monotonic() - t0
        assert rc == 130, agent.log()
        assert took < 3.0, f"second SIGINT took {took:.1f} s:\n{agent.log()}"
        assert "2 TC filters detached, exiting now" in agent.log()
        for direction in ("ingress", "egress"):
            shown = topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if,
                             direction).stdout
            assert "flows_tc" not in shown, shown


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
def test_collector_down_30s_then_up(topo, temporality: str) -> None:
    """Down for 30 s: no crash, RSS bounded, failures counted and exported after
    recovery, and the flows of the outage delivered in full afterwards: delta
    points merged into the next delivered interval, cumulative totals that
    carry on across the outage."""
    n, port = 500, 40102
    rx = ReceiverProc(topo, topo.a)
    # flows only: host-wide signals (drops, tcp) would measure other processes' traffic
    agent = AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                      interval=1.0, temporality=temporality)

    def rss_kb() -> int:
        for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    with agent:
        start = time.monotonic()
        time.sleep(3)  # warm-up: a few failed exports while nobody listens
        rss0 = rss_kb()
        for _ in range(5):
            send_udp(topo, n // 5, port)
            time.sleep(4)
        while time.monotonic() - start < 30:
            assert agent.proc.poll() is None, agent.log()
            time.sleep(1)
        grew = rss_kb() - rss0
        with rx:
            try:
                rx.wait_for(lambda: flow_packets(rx, port) >= n, timeout=60,
                            what="the outage's flows delivered")
            except AssertionError as e:
                raise AssertionError(f"{e}: {flow_packets(rx, port)} of {n}\n"
                                     f"{agent.log()[-3000:]}") from None
            rx.wait_for(lambda: metric_total(rx.metrics("ebpf_otlp.export.failures",
                                                        signal="metrics")) >= 20,
                        what="the outage's failed exports counted and exported")
            time.sleep(2.5)  # two more intervals: nothing delivered twice
            assert flow_packets(rx, port) == n
            assert agent.stop() == 0
    print(f"RSS growth over a 30 s outage: {grew} KiB")
    assert grew < 20 * 1024, f"RSS grew {grew} KiB during the outage"
    assert "Traceback" not in agent.log()


DNS_LOOP = r"""
import socket, struct, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
q = lambda i: struct.pack("!HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + \
    b"\x04hang\x04test\x00" + struct.pack("!HH", 1, 1)
end, i = time.monotonic() + secs, 0
while time.monotonic() < end:
    s.sendto(q(i), (dst, 53))
    i += 1
    try:
        s.recv(512)
    except OSError:
        pass
    time.sleep(0.05)
"""


def test_hung_collector_spans_use_the_interval_budget(topo) -> None:
    """Spans (DNS) and metrics against a collector that accepts connections and
    never answers: each span request gives up within the interval-capped budget
    (not the 10 s export timeout), intervals keep being collected on time
    (every export of an interval shares one budget under the interval),
    attempts are counted as failed, and SIGTERM returns within the README's
    bound (the request in flight, at most the interval, plus the 5 s flush).

    Truth: the scripted collector's log of when each request arrived, the
    agent's /status, and the clock."""
    require(Path(DNSMASQ).exists(), "dnsmasq not installed (Debian dnsmasq-base)")
    interval, hport = 2.0, 4412
    dnsmasq = topo.popen(topo.b, DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts",
                         "--port", "53", f"--listen-address={topo.b_ip4}", "--bind-interfaces",
                         "--address=/hang.test/10.99.0.7", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    load = None
    try:
        with ReceiverProc(topo, topo.a) as rx, \
                FlakyCollector(topo, topo.a, rx, "hang:3600") as fc:
            agent = AgentProc(topo, topo.a, fc, "--iface", topo.a_if, "--signals", "dns",
                              "--health-listen", f"127.0.0.1:{hport}", interval=interval)
            with agent:
                load = topo.popen(topo.a, PY, "-c", DNS_LOOP, topo.b_ip4, "60")
                rx.wait_for(lambda: len([a for a in fc.answers()
                                         if a["path"] == "/v1/traces"]) >= 5, timeout=40,
                            what="five span requests reaching the hung collector")
                # intervals keep being collected: exports finish at the interval's pace
                finished, t_end = set(), time.monotonic() + 6 * interval
                while time.monotonic() < t_end:
                    finished.add(status(topo, hport)["last_export"]["finished_at"])
                    time.sleep(0.3)
                st = status(topo, hport)
                t0 = time.monotonic()
                rc = agent.stop(signal.SIGTERM, timeout=60)
                took = time.monotonic() - t0
            traces = [a["t"] for a in fc.answers() if a["path"] == "/v1/traces"]
    finally:
        if load is not None:
            load.kill()
            load.wait()
        dnsmasq.kill()
        dnsmasq.wait()
    gaps = [b - a for a, b in zip(traces, traces[1:])]
    print(f"span requests {len(traces)}, gaps {[round(g, 1) for g in gaps]} s; "
          f"{len(finished)} exports finished in {6 * interval:g} s; SIGTERM took {took:.1f} s")
    assert max(gaps[:5]) <= interval + 2.0, f"span requests waited longer than the budget: {gaps}"
    assert len(finished) >= 4, f"only {len(finished)} interval exports in {6 * interval:g} s"
    assert st["export"]["traces"]["errors"].get("timeout", 0) >= 3, st["export"]["traces"]
    assert st["export"]["metrics"]["errors"].get("timeout", 0) >= 2, st["export"]["metrics"]
    assert rc == 0, agent.log()
    assert took <= interval + 5.0 + 3.0, f"SIGTERM took {took:.1f} s"
    assert "Traceback" not in agent.log()
