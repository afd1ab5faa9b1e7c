"""`network.tcp.connections.active` against `ss` when more connections are open
at once than the kernel's socket table holds.

With the old LRU socket table, new connections evicted the entries of live
ones; their closes then came back untracked and `active` never went down
again. Now a full table refuses the new socket (counted under
`ebpf_otlp.tcp.dropped{reason=socket_map_full}`) and the gauge is kept in
the kernel, +1 and -1 on the same tracked socket. The truth is `ss -tn state
established` in each namespace, filtered on the test's own port (the
tracepoints are host-wide; other tests make connections too).
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from otlp import AgentProc, ReceiverProc, by_attrs, metric_total

pytestmark = pytest.mark.kernel

PY = sys.executable
ROLE = "network.tcp.handshake.role"
TABLE = 512  # --tcp-max-sockets (room for other tests' sockets: the table is host-wide)

# Accepts and holds connections; closes each when its peer does.
SERVER = r"""
import selectors, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096); s.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(s, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is s:
            try:
                c, _ = s.accept()
            except BlockingIOError:
                continue
            sel.register(c, selectors.EVENT_READ)
        elif not key.fileobj.recv(4096):
            sel.unregister(key.fileobj); key.fileobj.close()
"""

# Commands on stdin: "open N" opens a group of N connections, "close G"
# closes group G; each answers one line.
CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
groups = []
for line in sys.stdin:
    cmd, n = line.split()
    if cmd == "open":
        groups.append([socket.create_connection((host, port)) for _ in range(int(n))])
    else:
        for c in groups[int(n)]:
            c.close()
    print("ok", flush=True)
"""


def established(topo, ns: str, match: str) -> int:
    out = topo.run(ns, "ss", "-Htn", "state", "established", match).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def test_active_equals_ss_beyond_the_socket_table(topo) -> None:
    port = random.randint(30000, 39999)
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp", "--tcp-max-sockets",
                      str(TABLE)) as agent:
        server = topo.popen(topo.b, PY, "-c", SERVER, str(port), stdout=subprocess.PIPE,
                            text=True)
        client = topo.popen(topo.a, PY, "-c", CLIENT, topo.b_ip4, str(port),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def do(cmd: str) -> None:
            client.stdin.write(cmd + "\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "ok", cmd

        def truth() -> dict[tuple, int]:
            return {("client",): established(topo, topo.a, f"( dport = :{port} )"),
                    ("server",): established(topo, topo.b, f"( sport = :{port} )")}

        def active() -> dict[tuple, float]:
            return by_attrs(rx.metrics("network.tcp.connections.active",
                                       **{"server.port": port}), ROLE)

        def settle(want: dict[tuple, int], what: str) -> None:
            rx.wait_for(lambda: truth() == want, what=f"ss to show {want} ({what})")
            try:
                rx.wait_for(lambda: active() == want, timeout=15, what=what)
            except AssertionError:
                raise AssertionError(f"{what}: active {active()} != ss {truth()}") from None

        def refused() -> float:
            return metric_total(rx.metrics("ebpf_otlp.tcp.dropped",
                                           reason="socket_map_full"))

        try:
            assert server.stdout.readline().strip() == "listening"
            # 1. A group that fits in the table: every connection tracked.
            do("open 40")
            settle({("client",): 40, ("server",): 40}, "40 connections open")
            # 2. Far more than the table holds (2 x 600 sockets > 512 entries).
            before = refused()
            do("open 600")
            rx.wait_for(lambda: truth() == {("client",): 640, ("server",): 640},
                        what="640 connections per side in ss")
            # Connections beyond the table are not tracked: never over ss.
            now = active()
            assert all(now.get(k, 0) <= 640 for k in truth()), now
            # 3. Closing the big group leaves exactly the first one, whatever
            # the table went through (the LRU table drifted up here).
            do("close 1")
            settle({("client",): 40, ("server",): 40}, "after closing 600")
            do("close 0")
            settle({("client",): 0, ("server",): 0}, "after closing all")
            # the table really was too small, and the refusals were counted
            rx.wait_for(lambda: refused() > before, what="refused socket-table inserts")
        finally:
            client.kill()
            server.kill()
            client.wait()
            server.wait()
        opened = by_attrs(rx.metrics("network.tcp.connections.opened",
                                     **{"server.port": port}), ROLE)
        agent.stop()
    # the first group was tracked on both sides, so opened counts at least it
    assert opened[("client",)] >= 40 and opened[("server",)] >= 40, opened
