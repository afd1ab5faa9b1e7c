"""Flows end to end: real traffic between two namespaces, the agent on veth-a
exporting to a real OTLP/HTTP receiver. The truth is what the test sent (and
what a socket on the other side received) and the interface's own counters."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from otlp import AgentProc, ReceiverProc, by_attrs, metric_total

from ebpf_otlp.platform import tcx
from ebpf_otlp.platform.libbpf import num_possible_cpus
from ebpf_otlp.signals.flows.agg import FRONT_SLOTS

pytestmark = pytest.mark.kernel
PY = sys.executable

# In-namespace helpers, run with `python -c`.
UDP_SEND = """
import socket, sys, time
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
src, dst, sport, dport, n, size, step = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
socks = {}
for i in range(n):
    sp = sport + (i if step else 0)
    s = socks.get(sp)
    if s is None:
        s = socks[sp] = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((src, sp))
    s.sendto(b'x' * size, (dst, dport))
    if i % 20 == 19:
        time.sleep(0.002)  # stay far below the receiver's backlog (no drops before the hook)
"""
UDP_RECV = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
s.settimeout(float(sys.argv[4]))
n = nbytes = 0
try:
    while n < int(sys.argv[3]):
        nbytes += len(s.recv(65536))
        n += 1
except socket.timeout:
    pass
print(n, nbytes, flush=True)
"""
TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print('ready', flush=True)
c, _ = s.accept()
got = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += len(b)
c.sendall(b'r' * int(sys.argv[3]))
c.close()
print(got, flush=True)
"""
TCP_CLIENT = """
import socket, struct, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(b's' * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
got = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += len(b)
time.sleep(0.3)  # our ACK of the server's FIN is out
info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
segs_out, segs_in = struct.unpack_from('<II', info, 136)  # tcpi_segs_out, tcpi_segs_in
c.close()
print(got, segs_out, segs_in, flush=True)
"""


def quiet(topo) -> None:
    """No IPv6 router solicitations in a measured window, and wait until the link is idle."""
    for ns, ifn in ((topo.a, topo.a_if), (topo.b, topo.b_if)):
        for key in (f"net.ipv6.conf.{ifn}.router_solicitations",
                    "net.ipv6.conf.all.router_solicitations"):
            topo.run(ns, "sysctl", "-qw", f"{key}=0", check=False)
    last = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = topo.link_stats(topo.a)
        if now == last:
            return
        last = now
        time.sleep(1.0)
    raise AssertionError(f"veth-a never went idle for 1 s within 15 s: {last}")


def assert_nothing_left(topo) -> None:
    for d in ("ingress", "egress"):
        out = topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if, d).stdout
        assert out.strip() == "", f"tc {d} filters left behind:\n{out}"
    link = topo.run(topo.a, "ip", "link", "show", "dev", topo.a_if).stdout
    assert "xdp" not in link, f"XDP program left behind:\n{link}"
    if tcx.kernel_has_tcx():  # the kernel's own list of TCX programs on the hooks
        for d in ("ingress", "egress"):
            progs = topo.run(topo.a, PY, "-c", "import socket; from ebpf_otlp.platform import "
                             f"tcx; print(tcx.query(socket.if_nametoindex('{topo.a_if}'), "
                             f"'{d}'))").stdout.strip()
            assert progs == "[]", f"TCX programs left on {d}: {progs}"


def stop_agent(agent: AgentProc) -> None:
    assert agent.proc.poll() is None, f"agent died:\n{agent.log()}"
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    assert "Traceback" not in agent.log(), agent.log()


# TC through TCX links and through clsact filters (--tc-mode), and XDP ingress
HOOKS = ["tcx", "tc", "xdp"]


def hook_args(hook: str) -> list[str]:
    return ["--flow-hook", "xdp"] if hook == "xdp" else ["--flow-hook", "tc", "--tc-mode", hook]


def flow_points(rx: ReceiverProc, name: str, **attrs) -> list[dict]:
    return rx.metrics(name, **attrs)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_datagrams_exact(topo, family, hook):
    n, size = 200, 333
    a, b = (topo.a_ip4, topo.b_ip4) if family == "ipv4" else (topo.a_ip6, topo.b_ip6)
    frame = 14 + (20 if family == "ipv4" else 40) + 8 + size
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                       *hook_args(hook)) as agent:
            listener = topo.popen(topo.a, PY, "-c", UDP_RECV, a, "7001", str(n), "5",
                                  stdout=subprocess.PIPE, text=True)
            assert listener.stdout.readline().strip() == "ready"
            topo.run(topo.b, PY, "-c", UDP_SEND, b, a, "6001", "7001", str(n), str(size), "0")
            got_n, got_bytes = map(int, listener.communicate(timeout=30)[0].split())
            assert (got_n, got_bytes) == (n, n * size)  # nothing lost on the way
            # and the other direction: a transmits to b
            topo.run(topo.a, PY, "-c", UDP_SEND, a, b, "6002", "7002", str(n), str(size), "0")
            time.sleep(1.5)
            stop_agent(agent)
        assert_nothing_left(topo)
        common = {"network.type": family, "network.transport": "udp",
                  "network.interface.name": topo.a_if}
        rx_attrs = dict(common, **{"source.address": b, "source.port": 6001,
                                   "destination.address": a, "destination.port": 7001,
                                   "network.io.direction": "receive"})
        tx_attrs = dict(common, **{"source.address": a, "source.port": 6002,
                                   "destination.address": b, "destination.port": 7002,
                                   "network.io.direction": "transmit"})
        for attrs in (rx_attrs, tx_attrs):
            assert metric_total(flow_points(rx, "network.flow.packets", **attrs)) == n, attrs
            assert metric_total(flow_points(rx, "network.flow.bytes", **attrs)) == n * frame
            assert metric_total(flow_points(rx, "network.flow.segments", **attrs)) == n
            pts = flow_points(rx, "network.flow.bytes", **attrs)
            assert all(p["unit"] == "By" and p["temporality"] == "delta" for p in pts)


@pytest.mark.parametrize("hook", HOOKS)
def test_tcp_totals_equal_interface_counters(topo, hook):
    up, down = 3_000_000, 500_000
    quiet(topo)
    before = topo.link_stats(topo.a)
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                       *hook_args(hook)) as agent:
            server = topo.popen(topo.b, PY, "-c", TCP_SERVER, topo.b_ip4, "5201", str(down),
                                stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "ready"
            got, segs_out, segs_in = map(int, topo.run(
                topo.a, PY, "-c", TCP_CLIENT, topo.b_ip4, "5201", str(up)).stdout.split())
            assert got == down
            assert int(server.communicate(timeout=30)[0]) == up
            time.sleep(1.5)  # last ACKs and FINs
            stop_agent(agent)
        after = topo.link_stats(topo.a)
        assert_nothing_left(topo)
        points = {m: by_attrs(flow_points(rx, m, **{"network.interface.name": topo.a_if}),
                              "network.io.direction")
                  for m in ("network.flow.bytes", "network.flow.packets")}
        assert points["network.flow.bytes"][("transmit",)] == after["tx_bytes"] - before["tx_bytes"]
        rx_bytes = after["rx_bytes"] - before["rx_bytes"]
        if hook == "xdp":
            # veth quirk: with XDP attached, veth counts received bytes after
            # eth_type_trans pulled the Ethernet header (skb->len without L2); the
            # frame the XDP program sees (and real NICs count) has it.
            rx_bytes += 14 * (after["rx_packets"] - before["rx_packets"])
        assert points["network.flow.bytes"][("receive",)] == rx_bytes
        assert (points["network.flow.packets"][("transmit",)]
                == after["tx_packets"] - before["tx_packets"])
        assert (points["network.flow.packets"][("receive",)]
                == after["rx_packets"] - before["rx_packets"])
        # the payload really went through the flow we expect, in both directions
        up_bytes = by_attrs(flow_points(rx, "network.flow.bytes", **{"destination.port": 5201}),
                            "network.io.direction")
        assert up_bytes[("transmit",)] > up
        # segments: what the client's own TCP counted (tcpi_segs_out/in count GSO/GRO
        # skbs by their segments, as network.flow.segments does)
        conn = {"network.transport": "tcp", "network.interface.name": topo.a_if}
        segs = by_attrs(flow_points(rx, "network.flow.segments", **conn), "network.io.direction")
        assert segs[("transmit",)] == segs_out
        pkts = by_attrs(flow_points(rx, "network.flow.packets", **conn), "network.io.direction")
        assert pkts[("transmit",)] < segs_out  # GSO was in play: skbs are not segments
        # A segment can still arrive after the client read tcp_info (a FIN
        # retransmitted to its TIME_WAIT socket under load): the socket's count
        # is a floor. At XDP, before GRO, every frame is one segment and the
        # interface's own counter is exact.
        assert segs[("receive",)] >= segs_in
        if hook == "xdp":
            assert segs[("receive",)] == after["rx_packets"] - before["rx_packets"]


def test_table_full_overflow_is_counted(topo):
    flows, size = 1000, 100
    frame = 14 + 20 + 8 + size
    quiet(topo)
    before = topo.link_stats(topo.a)
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                       "--max-flows", "16") as agent:
            listener = topo.popen(topo.a, PY, "-c", UDP_RECV, topo.a_ip4, "7003", str(flows),
                                  "5", stdout=subprocess.PIPE, text=True)
            assert listener.stdout.readline().strip() == "ready"
            topo.run(topo.b, PY, "-c", UDP_SEND, topo.b_ip4, topo.a_ip4, "20000", "7003",
                     str(flows), str(size), "1")
            got_n, _ = map(int, listener.communicate(timeout=30)[0].split())
            assert got_n == flows
            time.sleep(2.5)  # a few intervals: the agent keeps running with a full table
            assert agent.proc.poll() is None
            stop_agent(agent)
        after = topo.link_stats(topo.a)
        assert_nothing_left(topo)
        ours = {"destination.port": 7003, "network.io.direction": "receive"}
        flow_bytes = metric_total(flow_points(rx, "network.flow.bytes", **ours))
        flow_pkts = metric_total(flow_points(rx, "network.flow.packets", **ours))
        sel = {"network.io.direction": "receive", "network.interface.name": topo.a_if}
        ovf_bytes = metric_total(rx.metrics("ebpf_otlp.flows.overflow.bytes", **sel))
        ovf_pkts = metric_total(rx.metrics("ebpf_otlp.flows.overflow.packets", **sel))
        full = metric_total(rx.metrics("ebpf_otlp.flows.table_full", **sel))
        # 16 flows in the kernel table, plus at most the per-CPU front slots
        # (bpf/flows.h) that had not spilled into it when the table was drained
        assert 0 < flow_pkts <= 16 + FRONT_SLOTS * num_possible_cpus()
        assert ovf_pkts == flows - flow_pkts and full == ovf_pkts
        assert flow_bytes + ovf_bytes == flows * frame
        # and nothing else was lost: every received byte is in a flow or in the overflow
        all_rx = metric_total(flow_points(rx, "network.flow.bytes", **sel))
        assert all_rx + ovf_bytes == after["rx_bytes"] - before["rx_bytes"]


def test_cumulative_never_goes_down(topo):
    n, size = 50, 200
    frame = 14 + 20 + 8 + size
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                       temporality="cumulative") as agent:
            attrs = {"source.port": 6100, "destination.port": 7100,
                     "network.io.direction": "transmit"}
            for batch in range(3):
                topo.run(topo.a, PY, "-c", UDP_SEND, topo.a_ip4, topo.b_ip4, "6100", "7100",
                         str(n), str(size), "0")
                rx.wait_for(lambda b=batch: any(
                    p["value"] == (b + 1) * n * frame
                    for p in rx.metrics("network.flow.bytes", **attrs)),
                    what=f"cumulative total after batch {batch}")
            stop_agent(agent)
        pts = sorted(rx.metrics("network.flow.bytes", **attrs), key=lambda p: p["time_ns"])
        assert all(p["temporality"] == "cumulative" for p in pts)
        values = [p["value"] for p in pts]
        assert values == sorted(values) and values[-1] == 3 * n * frame
        assert len({p["start_ns"] for p in pts}) == 1
        assert metric_total(pts) == 3 * n * frame


def test_flow_attributes_aggregate_before_export(topo):
    n, size = 30, 100
    frame = 14 + 20 + 8 + size
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                       "--flow-attributes",
                       "destination.address,destination.port,network.io.direction") as agent:
            for sport in (6200, 6201, 6202):
                topo.run(topo.a, PY, "-c", UDP_SEND, topo.a_ip4, topo.b_ip4, str(sport), "7200",
                         str(n), str(size), "0")
            time.sleep(1.5)
            stop_agent(agent)
        pts = rx.metrics("network.flow.bytes", **{"destination.port": 7200})
        assert pts and all(set(p["attributes"]) == {"destination.address", "destination.port",
                                                    "network.io.direction"} for p in pts)
        assert metric_total(pts) == 3 * n * frame
        # one series per export, not one per source port
        assert len({p["time_ns"] for p in pts}) == len(pts)


def test_collector_down_then_up_loses_nothing(topo):
    """The agent starts before the collector: the first flow export retries
    (backoff) or fails and keeps its delta data pending, and the totals still
    come out exact. (The SDK path, EBPF_OTLP_FLOWS_EXPORT=sdk, drops a delta
    whose export fails for good: only the direct path is held to this.)"""
    n, size = 40, 150
    frame = 14 + 20 + 8 + size
    rx = ReceiverProc(topo, topo.a, port=4319)
    with AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows") as agent:
        topo.run(topo.a, PY, "-c", UDP_SEND, topo.a_ip4, topo.b_ip4, "6300", "7300", str(n),
                 str(size), "0")
        time.sleep(3)
        with rx:
            attrs = {"source.port": 6300, "destination.port": 7300}
            rx.wait_for(lambda: metric_total(rx.metrics("network.flow.packets", **attrs)) >= n,
                        timeout=40, what="flows exported once the collector is up")
            stop_agent(agent)
            assert metric_total(rx.metrics("network.flow.packets", **attrs)) == n
            assert metric_total(rx.metrics("network.flow.bytes", **attrs)) == n * frame
            # the outage really happened, and was counted
            assert metric_total(rx.metrics("ebpf_otlp.export.failures", signal="metrics")) > 0
