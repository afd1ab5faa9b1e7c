"""What happens last is exported too: with an interval longer than the run, every
figure below can only come from the final drain and export at SIGTERM."""

from __future__ import annotations

import random
import shutil
import sys

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel
PY = sys.executable

SENDER = r"""
import socket, sys
dst, port, sport, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
print(sum(1 for _ in range(count) if s.sendto(b"x" * 16, (dst, port))))
"""


def test_drops_and_pending_dns_reach_the_collector_at_shutdown(topo) -> None:
    require(shutil.which("nft") is not None, "nft (Debian nftables) is not installed")
    require(shutil.which("dig") is not None, "dig not installed (Debian dnsutils)")
    port, sport = random.sample(range(20000, 60000), 2)
    topo.run(topo.b, "nft", "add", "table", "inet", "eoshut")
    topo.run(topo.b, "nft", "add", "chain", "inet", "eoshut", "input",
             "{ type filter hook input priority 0 ; }")
    topo.run(topo.b, "nft", "add", "rule", "inet", "eoshut", "input", "udp", "dport", str(port),
             "counter", "drop")
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "drops,dns",
                      "--interval", "600", "--dns-timeout", "600") as agent:
        sent = int(topo.run(topo.a, PY, "-c", SENDER, topo.b_ip4, str(port), str(sport),
                            "50").stdout)
        # A query nobody answers (b runs no DNS server; its port 53 is closed):
        # still pending when the agent stops, so it must leave as a timeout span.
        topo.run(topo.a, "dig", f"@{topo.b_ip4}", "never.test", "+tries=1", "+time=1",
                 check=False)
        assert not rx.metrics("network.packet.drops")  # nothing exported yet: interval 600 s
        assert agent.stop() == 0
        drops = rx.metrics("network.packet.drops", **{"network.drop.reason": "NETFILTER_DROP",
                                                      "destination.port": port})
        spans = rx.spans(**{"dns.question.name": "never.test"})
    out = topo.run(topo.b, "nft", "-j", "list", "table", "inet", "eoshut").stdout
    nft = int(out.split('"packets": ')[1].split(",")[0])
    assert sent == 50 and nft == 50
    assert metric_total(drops) == nft
    assert len(spans) == 1 and spans[0]["attributes"]["error.type"] == "timeout"
