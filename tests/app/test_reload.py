"""SIGHUP reloads the configuration file: a changed interface list attaches and
detaches flows accordingly while the unchanged interface keeps its very TC
filter (same program id) and its cumulative totals (same series start);
a bad file changes nothing.

Truth: `tc filter show` and the datagrams the test sent on each interface."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

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


def filters(topo, dev: str) -> list[str]:
    out = []
    for direction in ("ingress", "egress"):
        shown = topo.run(topo.a, "tc", "filter", "show", "dev", dev, direction).stdout
        out += [f"{direction} {m}" for m in re.findall(r"handle 0xeb0f .*? id (\d+)", shown)]
    return out


def test_sighup_changes_interfaces_and_keeps_unchanged_ones(topo, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"iface: [{topo.a_if}]\nsignals: [flows]\ntc-mode: tc\n")
    port = 40301

    def send(dst: str, n: int) -> None:
        topo.run(topo.a, PY, "-c", UDP_SEND, dst, str(port), str(n))

    def points(rx: ReceiverProc, dev: str) -> list[dict]:
        return rx.metrics("network.flow.packets", **{
            "destination.port": port, "network.io.direction": "transmit",
            "network.interface.name": dev})

    with ReceiverProc(topo, topo.a) as rx:
        agent = AgentProc(topo, topo.a, rx, "--config", str(cfg), temporality="cumulative")
        with agent:
            veth_before = filters(topo, topo.a_if)
            assert len(veth_before) == 2 and filters(topo, "lo") == []
            send(topo.b_ip4, 100)
            rx.wait_for(lambda: metric_total(points(rx, topo.a_if)) >= 100, what="first 100")

            cfg.write_text(f"iface: [{topo.a_if}, lo]\nsignals: [flows]\ntc-mode: tc\n")
            agent.proc.send_signal(signal.SIGHUP)
            rx.wait_for(lambda: "configuration reloaded: flows reconfigured" in agent.log(),
                        what="reload")
            assert filters(topo, topo.a_if) == veth_before, "unchanged interface re-attached"
            assert len(filters(topo, "lo")) == 2
            send(topo.b_ip4, 50)
            send("127.0.0.1", 70)
            rx.wait_for(lambda: metric_total(points(rx, topo.a_if)) >= 150
                        and metric_total(points(rx, "lo")) >= 70, what="both interfaces")

            cfg.write_text("iface: [lo]\nsignals: [flows]\ntc-mode: tc\n")
            agent.proc.send_signal(signal.SIGHUP)
            rx.wait_for(lambda: agent.log().count("configuration reloaded") == 2, what="reload")
            assert filters(topo, topo.a_if) == []
            lo_filters = filters(topo, "lo")
            send(topo.b_ip4, 40)  # not watched any more
            send("127.0.0.1", 30)
            rx.wait_for(lambda: metric_total(points(rx, "lo")) >= 100, what="lo after removal")

            # a bad value: refused as a whole, nothing changes
            cfg.write_text("iface: [lo]\ntc-mode: tc\nmax-flows: 0\n")
            agent.proc.send_signal(signal.SIGHUP)
            rx.wait_for(lambda: "configuration not reloaded" in agent.log(), what="refusal")
            assert "key 'max-flows'" in agent.log()
            assert filters(topo, "lo") == lo_filters
            assert agent.stop() == 0
        assert metric_total(points(rx, topo.a_if)) == 150
        assert metric_total(points(rx, "lo")) == 100
        # each cumulative series of the unchanged interface kept its start across reloads
        starts: dict[int, set[int]] = {}
        for p in points(rx, topo.a_if):
            starts.setdefault(p["attributes"]["source.port"], set()).add(p["start_ns"])
        assert len(starts) == 2 and all(len(v) == 1 for v in starts.values()), starts
        assert "Traceback" not in agent.log()
    assert filters(topo, "lo") == []
