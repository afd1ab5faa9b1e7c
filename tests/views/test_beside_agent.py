"""``observe`` beside ``ebpf-otlp run`` on the same interface and tracepoints:
each has its own hooks, both count exactly what the script sent, and stopping
observe leaves the agent's filters and counts alone."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest
from otlp import AgentProc, ReceiverProc, metric_total
from viewproc import PY, ObserveProc, held_programs, loaded_programs, wait_until

pytestmark = pytest.mark.kernel

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
for _ in range(int(sys.argv[4])):
    s.sendto(b"d" * 200, (sys.argv[1], int(sys.argv[2])))
"""
SINK = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", int(sys.argv[1])))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", int(sys.argv[2]))); t.listen(64)
print("ready", flush=True)
while True:
    c, _ = t.accept(); c.recv(10); c.close()
"""
CONNECT = """
import socket, sys
for _ in range(int(sys.argv[3])):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); c.send(b"x"); c.recv(10)
    c.close()
"""


def ours_filters(topo) -> str:
    return "".join(topo.run(topo.a, "tc", "filter", "show", "dev", "veth-a", d).stdout
                   for d in ("ingress", "egress"))


def test_observe_beside_the_agent_both_counts_exact(topo) -> None:
    t = topo
    # below the ephemeral range: no other connection's client port is ours
    udp, tcp, sport = (random.randrange(10000, 20000), random.randrange(20000, 30000),
                       random.randrange(30000, 32000))
    n1, n2, k = 300, 200, 5
    sink = t.popen(t.b, PY, "-c", SINK, str(udp), str(tcp), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        with ReceiverProc(t, t.a) as rx, AgentProc(t, t.a, rx, "--iface", "veth-a",
                                                   "--signals", "flows,tcp") as agent:
            # (TCX links or clsact filters, as the kernel allows: the counts below show
            # that each keeps its own, whichever start order; tests/platform covers the
            # clsact start-up cleanup sparing a live process's filters)
            before = loaded_programs()
            obs = ObserveProc(t, t.a, "--iface", "veth-a", "--signal", "tcp,flows", "--flows",
                              "--flows-top", "1000", "--port", f"{udp},{tcp}").start()
            try:
                obs.wait_ready()
                held = held_programs(obs.proc.pid)
                t.run(t.a, PY, "-c", SEND, t.b_ip4, str(udp), str(sport), str(n1))
                t.run(t.a, PY, "-c", CONNECT, t.b_ip4, str(tcp), str(k))

                def observed() -> tuple[int, int]:
                    ev = obs.events()
                    pk = sum(e["network.flow.packets"] for e in ev if e["signal"] == "flows"
                             and e.get("destination.port") == udp
                             and e.get("network.io.direction") == "transmit")
                    op = sum(1 for e in ev if e["signal"] == "tcp" and e["event"] == "open"
                             and e.get("server.port") == tcp)
                    return pk, op

                wait_until(lambda: observed() == (n1, 2 * k), 30, "observe's counts")
                assert obs.stop(signal.SIGINT) == 0, obs.err.read_text()
                assert observed() == (n1, 2 * k)
            finally:
                obs.close()
            assert not (loaded_programs() - before) & held, "observe's programs still loaded"
            # The agent goes on counting after observe has gone.
            t.run(t.a, PY, "-c", SEND, t.b_ip4, str(udp), str(sport), str(n2))
            attrs = {"destination.port": udp, "source.port": sport,
                     "network.io.direction": "transmit"}
            rx.wait_for(lambda: metric_total(rx.metrics("network.flow.packets", **attrs))
                        >= n1 + n2, 30, "the agent's flow packets")
            opened = {"server.port": tcp}
            rx.wait_for(lambda: metric_total(rx.metrics("network.tcp.connections.opened",
                                                        **opened)) >= 2 * k, 30,
                        "the agent's opened connections")
            assert agent.stop(signal.SIGTERM) == 0, agent.log()
        assert metric_total(rx.metrics("network.flow.packets", **attrs)) == n1 + n2
        assert metric_total(rx.metrics("network.flow.bytes", **attrs)) == \
            (n1 + n2) * (14 + 20 + 8 + 200)
        assert metric_total(rx.metrics("network.tcp.connections.opened", **opened)) == 2 * k
        assert "0xeb0f" not in ours_filters(t)
    finally:
        sink.kill()
        sink.wait()
