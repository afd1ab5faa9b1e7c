"""The per-hook packet counts behind ebpf_otlp.hook.silent are exact on both of
their kernel paths: the per-CPU array slot an interface owns (the fast path)
and the hash table that interfaces sharing a slot's residue fall back to.
Truth: the interface's own packet counters over the same time, and the
datagrams sent."""

from __future__ import annotations

import json
import subprocess

import pytest
from otlp import PY

pytestmark = pytest.mark.kernel

N = 300

# Runs in namespace a: the packet datapath on veth-a (flows only), then N
# datagrams out (egress) while the test sends N in (ingress); prints the
# hook's and the interface's counts over that time, per direction.
COUNT = r"""
import json, socket, sys, time
from ebpf_otlp.config import AgentConfig
from ebpf_otlp.signals.packet import DIRECTIONS, PacketDatapath, iface_packets
ifname, peer, n, fallback = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
dp = PacketDatapath(AgentConfig(ifaces=[ifname], signals=("flows",), tc_mode="tc"))
if fallback:  # every slot taken by another interface: the hash path counts
    dp._slot_owner.update({r: -1 for r in range(1 << 16)})
dp.acquire("flows")
try:
    idx = socket.if_nametoindex(ifname)
    snap = lambda: {d: (dp.hook_packets(idx, d), iface_packets(ifname, d)) for d in DIRECTIONS}
    before = snap()
    print("ready", flush=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(n):
        s.sendto(b"h" * 64, (peer, 7311))
    sys.stdin.readline()  # the test's datagrams are in
    deadline = time.monotonic() + 10
    while True:
        after = snap()
        out = {d: [after[d][0] - before[d][0], after[d][1] - before[d][1]] for d in DIRECTIONS}
        if all(h == i for h, i in out.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(json.dumps(out), flush=True)
finally:
    dp.release("flows")
"""

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(b"i" * 64, (sys.argv[1], 7312))
"""


@pytest.mark.parametrize("path", ["slot", "hash"])
def test_hook_counts_equal_the_interface_counters(topo, path: str) -> None:
    proc = topo.popen(topo.a, PY, "-c", COUNT, topo.a_if, topo.b_ip4, str(N),
                      "1" if path == "hash" else "0", stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read()
        topo.run(topo.b, PY, "-c", SEND, topo.a_ip4, str(N))
        proc.stdin.write("\n")
        proc.stdin.flush()
        out = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()
    for d, (hook, iface) in out.items():
        assert hook == iface, f"{path} path, {d}: hook saw {hook}, the interface {iface}"
        assert hook >= N, f"{path} path, {d}: {hook} packets, {N} datagrams sent"
    for d in ("ingress", "egress"):
        assert topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if, d).stdout == ""
