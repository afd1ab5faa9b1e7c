"""Every OTLP signal's export path is bounded in bytes while the collector is
down, and what it gives up is counted, in items, under
``ebpf_otlp.export.dropped{signal,reason}``: after recovery that counter
equals what the receiver did not get.

Truth: the DNS queries and UDP flows the test made (each query one span, each
destination port one flow series), the spans and series the real receiver
decoded, and the agent's RSS from /proc."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel
PY = sys.executable
DNSMASQ = "/usr/sbin/dnsmasq"

# N queries for NAME, paced, each waiting briefly for its answer (one span each:
# answered, or a timeout span when dnsmasq was too slow).
DNS_QUERIES = r"""
import socket, struct, sys, time
dst, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
q = lambda i: struct.pack("!HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + \
    b"\x05bound\x04test\x00" + struct.pack("!HH", 1, 1)
answered = 0
for i in range(n):
    s.sendto(q(i), (dst, 53))
    try:
        s.recv(512)
        answered += 1
    except OSError:
        pass
print(answered)
"""

UDP_PORTS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for p in range(lo, hi):
    s.sendto(b"x", (dst, p))
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def rss_floor(pid: int, window_s: float = 2.0) -> int:
    """The least RSS seen over ``window_s``: what stays, not a batch in flight
    (the agent hands freed pages back once per interval)."""
    deadline, low = time.monotonic() + window_s, rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        low = min(low, rss_kb(pid))
    return low


def dropped(rx: ReceiverProc, signal: str) -> float:
    return metric_total(rx.metrics("ebpf_otlp.export.dropped", signal=signal))


def settle(fn, what: str, timeout: float = 60.0, quiet_s: float = 4.0) -> float:
    """Wait until ``fn()`` stops changing for ``quiet_s``; its last value."""
    deadline = time.monotonic() + timeout
    last, since = fn(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"{what} still changing after {timeout} s"
        time.sleep(0.5)
        v = fn()
        if v != last:
            last, since = v, time.monotonic()
    return last


def test_spans_over_the_byte_bound_while_down_are_counted_as_dropped(topo) -> None:
    """Collector down while 62,000 DNS queries make 62,000 spans (~22 MB
    encoded) with a 64 KiB bound: after a warm-up of 22,000 (the bounds are full
    after the first 2,000; by 22,000 the 4 MiB ring has wrapped and the
    allocator's arenas have reached their high-water mark under this load), RSS
    levels off: the last 20,000 spans, ~7 MB encoded, add under 4 MiB. After
    recovery the spans received plus ``export.dropped{signal=traces}`` equal the
    queries made, and the spans kept within the bound arrive."""
    require(Path(DNSMASQ).exists(), "dnsmasq not installed (Debian dnsmasq-base)")
    n, warm, step, bound = 62000, 2000, 20000, 64 << 10
    dnsmasq = topo.popen(topo.b, DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts",
                         "--port", "53", f"--listen-address={topo.b_ip4}", "--bind-interfaces",
                         "--address=/bound.test/10.99.0.7", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    rx = ReceiverProc(topo, topo.a)  # not started yet: the collector is down
    agent = AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "dns",
                      "--export-queue-bytes", str(bound), "--dns-timeout", "1",
                      interval=1.0, temporality="cumulative")  # drop totals not evicted
    try:
        with agent:
            # warm-up: the first 2,000 already fill both bounds, so the RSS baseline
            # holds full queues and the encoders' caches
            out = topo.run(topo.a, PY, "-c", DNS_QUERIES, topo.b_ip4, str(warm), timeout=300)
            answered = int(out.stdout)
            rss = [rss_floor(agent.proc.pid)]
            for _ in range((n - warm) // step):
                out = topo.run(topo.a, PY, "-c", DNS_QUERIES, topo.b_ip4, str(step),
                               timeout=300)
                answered += int(out.stdout)
                rss.append(rss_floor(agent.proc.pid))
            time.sleep(2)  # unanswered queries time out (1 s) and become spans too
            grew = rss[-1] - rss[-2]
            with rx:
                got = settle(lambda: len(rx.spans(**{"dns.question.name": "bound.test"})),
                             "spans received")
                lost = settle(lambda: dropped(rx, "traces"), "export.dropped{traces}")
                # lost before the export path, counted by the signal (not this test's
                # subject, but part of the sum): ring buffer, pending table, duplicates
                before = {m: metric_total(rx.metrics(m)) for m in (
                    "ebpf_otlp.events.lost", "ebpf_otlp.dns.pending.evicted",
                    "ebpf_otlp.dns.duplicates", "ebpf_otlp.dns.unmatched")}
                assert agent.stop() == 0, agent.log()
    finally:
        dnsmasq.kill()
        dnsmasq.wait()
    print(f"{n} queries ({answered} answered): {got} spans received, {lost:.0f} counted "
          f"dropped; RSS while down after 2,000, 22,000, 42,000, 62,000 spans: {rss} KiB; "
          f"before the export path: {before}")
    assert lost > 0, f"{n} spans fit in a 64 KiB bound?"
    assert got > 0, "the spans kept within the bound were not delivered after recovery"
    assert got + lost == n, f"{got} received + {lost} dropped != {n} spans made"
    # 20,000 more encoded spans are ~7 MB: with the queues full, RSS levels off
    assert grew < 4 * 1024, f"RSS grew {grew} KiB over the last 20,000 spans while down"
    assert "Traceback" not in agent.log()


def test_delta_flow_series_over_the_pending_bound_are_counted_as_dropped(topo) -> None:
    """Collector down while 20,000 one-datagram flows (distinct destination ports)
    cross the hook, 2,000 per interval, with delta temporality: the flows signal
    keeps at most 16,384 undelivered series (its pending bound at --max-flows
    4096), so RSS stays bounded; after recovery the series received plus
    ``export.dropped{signal=metrics,reason=pending_full}`` / 3 (bytes, packets,
    segments points per series) equal the flows sent."""
    per, rounds, lo = 2000, 10, 20000
    # a prefix routed to b, which does not forward: datagrams vanish without ICMP
    topo.run(topo.a, "ip", "route", "add", "10.202.0.0/16", "via", topo.b_ip4)
    dst = "10.202.0.9"
    rx = ReceiverProc(topo, topo.a)
    agent = AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                      "--max-flows", "4096",
                      "--flow-attributes", "destination.port,network.io.direction",
                      interval=2.0, temporality="delta")
    with agent:
        time.sleep(3)
        rss0 = rss_kb(agent.proc.pid)
        for r in range(rounds):
            topo.run(topo.a, PY, "-c", UDP_PORTS, dst, str(lo + r * per), str(lo + (r + 1) * per))
            time.sleep(2.5)  # each round in its own interval: under the table size
        grew = rss_kb(agent.proc.pid) - rss0

        def mine() -> int:
            return len({p["attributes"]["destination.port"] for p in
                        rx.metrics("network.flow.packets", **{"network.io.direction": "transmit"})
                        if lo <= p["attributes"].get("destination.port", 0) < lo + per * rounds})

        with rx:
            got = settle(mine, "flow series received", timeout=90)
            lost = settle(lambda: metric_total(rx.metrics(
                "ebpf_otlp.export.dropped", signal="metrics", reason="pending_full")),
                "export.dropped{metrics,pending_full}")
            overflow = metric_total(rx.metrics("ebpf_otlp.flows.overflow.packets"))
            others = {tuple(sorted(p["attributes"].items())) for p in
                      rx.metrics("network.flow.packets")} - {
                (("destination.port", p), ("network.io.direction", "transmit"))
                for p in range(lo, lo + per * rounds)}
            assert agent.stop() == 0, agent.log()
    sent = per * rounds
    print(f"{sent} flows: {got} series received, {lost:.0f} points counted dropped "
          f"(pending_full); RSS grew {grew} KiB while down; other series {sorted(others)}, "
          f"{overflow:.0f} packets in the overflow series")
    assert overflow == 0, f"{overflow} packets overflowed the flow table"
    assert lost > 0 and lost % 3 == 0, lost
    assert got + lost / 3 == sent, (f"{got} series received + {lost / 3:.0f} dropped != "
                                    f"{sent} flows sent (other series seen: {others})")
    assert grew < 40 * 1024, f"RSS grew {grew} KiB while the collector was down"
    assert "Traceback" not in agent.log()


def test_log_records_over_the_byte_bound_are_counted_as_dropped() -> None:
    """The log path (drop and policy events of the Hubble bridge) through the
    exporter: records emitted while the collector is down wait within the byte
    bound; after recovery the records received plus
    ``ebpf_otlp.export.dropped{signal=logs}`` equal the records emitted."""
    from ebpf_otlp.otlp import Exporter, ExportSettings
    from ebpf_otlp.receiver import Receiver

    with socket.socket() as s:  # a port nobody listens on, yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ExportSettings.resolve(endpoint=f"http://127.0.0.1:{port}", timeout_s=0.5,
                                      env={})
    ex = Exporter(settings, 1.0, 2000, queue_bytes=64 << 10)
    n, per = 3000, 300
    for i in range(n // per):  # ten intervals of 300 records while nobody listens
        for j in range(per):
            ex.logs.emit(timestamp=time.time_ns(), body=f"record {i * per + j}",
                         attributes={"network.peer.port": i * per + j})
        assert not ex.export()  # one interval's export
    assert 0 < ex.senders["logs"].queued_bytes <= 64 << 10
    with Receiver(port=port) as rx:
        ex.logs.emit(timestamp=time.time_ns(), body="after", attributes={})
        assert ex.export()
        got = len([r for r in rx.records if r.get("type") == "log"])
    lost = sum(ex.senders["logs"].dropped.values())
    ex.shutdown(1)
    assert lost > 0 and got > 1, (got, lost)
    assert got + lost == n + 1, f"{got} received + {lost} dropped != {n + 1} emitted"
