"""Two agents on one interface (a DaemonSet and a debugging run): each owns and
removes only its own TC filters; a SIGKILLed agent's filters are recognised
as stale (no live process holds their program) and removed at the next
start, with no duplicate hooks and counting resumed.

Truth: `tc filter show` on the interface and the datagrams the test sent."""

from __future__ import annotations

import signal
import sys

import pytest
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel
PY = sys.executable

UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b'x' * 64, (sys.argv[1], int(sys.argv[2])))
"""


def our_filters(topo) -> list[str]:
    out = []
    for direction in ("ingress", "egress"):
        shown = topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if, direction).stdout
        out += [f"{direction} {line.strip()}" for line in shown.splitlines()
                if "handle 0xeb0f" in line]
    return out


def packets(rx: ReceiverProc, port: int) -> float:
    return metric_total(rx.metrics("network.flow.packets", **{
        "destination.port": port, "network.io.direction": "transmit"}))


def send(topo, port: int, n: int) -> None:
    topo.run(topo.a, PY, "-c", UDP_SEND, topo.b_ip4, str(port), str(n))


def test_two_agents_keep_their_own_filters_and_kill_restart(topo) -> None:
    n = 200
    # clsact filters: they outlive their process (TCX links do not), so ownership matters
    args = ("--iface", topo.a_if, "--signals", "flows", "--tc-mode", "tc")
    with ReceiverProc(topo, topo.a) as rx1, ReceiverProc(topo, topo.a, port=4320) as rx2:
        first = AgentProc(topo, topo.a, rx1, *args)
        with first:
            assert len(our_filters(topo)) == 2
            with AgentProc(topo, topo.a, rx2, *args) as second:
                assert "removed" not in second.log(), second.log()
                assert len(our_filters(topo)) == 4, our_filters(topo)
                send(topo, 40201, n)
                for rx in (rx1, rx2):
                    rx.wait_for(lambda rx=rx: packets(rx, 40201) >= n,
                                what="both agents count the datagrams")
                assert second.stop() == 0
            # the second agent removed its own filters only; the first still counts
            assert len(our_filters(topo)) == 2, our_filters(topo)
            send(topo, 40202, n)
            rx1.wait_for(lambda: packets(rx1, 40202) >= n, what="first agent still counting")
            assert packets(rx1, 40201) == n and packets(rx2, 40201) == n
            # SIGKILL: nothing runs its cleanup, the filters stay behind
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            first.stop()
        assert len(our_filters(topo)) == 2, "a killed agent's filters should still be there"
        with AgentProc(topo, topo.a, rx1, *args) as third:
            assert "removed 2 tc filters an earlier ebpf-otlp run left on" in third.log()
            assert len(our_filters(topo)) == 2, "duplicate hooks after restart"
            send(topo, 40203, n)
            rx1.wait_for(lambda: packets(rx1, 40203) >= n, what="counting resumed")
            assert third.stop() == 0
        assert packets(rx1, 40203) == n
    assert our_filters(topo) == []
