"""`network.tcp.connections.active` against `ss` when more connections are open
at once than the kernel's socket table (`--tcp-max-sockets`) holds.

With sock_ops attached (the normal case), `opened` and `active` are counted
in sock_ops: +1 at ESTABLISHED under a key kept in the socket's own storage,
-1 to that key at CLOSE. Nothing has a capacity to run out of, so `active`
equals `ss -tn state established` per role and address family while ten
times the table's size is open (the code before counted only the sockets the
table held, and missed the others), after closing half, and after closing
all. Without sock_ops the tracepoints keep the old behaviour: only the
table's sockets count, never more than ss, back to exactly ss once the excess
closes.

The truth is `ss` in each namespace, filtered on the test's own port (the
tracepoints and the socket table are host-wide; other tests make connections
too), and the number of connections the client made.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable

import pytest
from otlp import AgentProc, ReceiverProc, by_attrs, metric_total

pytestmark = pytest.mark.kernel

PY = sys.executable
ROLE = "network.tcp.handshake.role"
TYPE = "network.type"

# Accepts and holds connections; closes each when its peer does.
SERVER = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
import selectors, socket, sys
sel = selectors.DefaultSelector()
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, int(sys.argv[1]))); s.listen(4096); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, "listener")
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.data == "listener":
            try:
                c, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            sel.register(c, selectors.EVENT_READ)
        elif not key.fileobj.recv(4096):
            sel.unregister(key.fileobj); key.fileobj.close()
"""

# Commands on stdin: "open HOST N" opens a group of N connections to HOST,
# "close G" closes group G; each answers one line.
CLIENT = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
import socket, sys
port = int(sys.argv[1])
groups = []
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "open":
        groups.append([socket.create_connection((args[0], port)) for _ in range(int(args[1]))])
    else:
        for c in groups[int(args[0])]:
            c.close()
    print("ok", flush=True)
"""


def established(topo, ns: str, family: str, match: str) -> int:
    out = topo.run(ns, "ss", "-Htn", family, "state", "established", match).stdout
    return sum(1 for line in out.splitlines() if line.strip())


class Scenario:
    """Server in b, client in a, the agent in a exporting to a receiver."""

    def __init__(self, topo, rx: ReceiverProc, port: int):
        self.topo, self.rx, self.port = topo, rx, port
        self.server = topo.popen(topo.b, PY, "-c", SERVER, str(port), stdout=subprocess.PIPE,
                                 text=True)
        self.client = topo.popen(topo.a, PY, "-c", CLIENT, str(port), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "listening"

    def do(self, cmd: str) -> None:
        self.client.stdin.write(cmd + "\n")
        self.client.stdin.flush()
        assert self.client.stdout.readline().strip() == "ok", cmd

    def truth(self) -> dict[tuple, int]:
        """ss per (role, network.type); the client side in a, the server side in b."""
        t, p = self.topo, self.port
        out = {}
        for fam, kind in (("-4", "ipv4"), ("-6", "ipv6")):
            out[("client", kind)] = established(t, t.a, fam, f"( dport = :{p} )")
            out[("server", kind)] = established(t, t.b, fam, f"( sport = :{p} )")
        return out

    def series(self, name: str) -> dict[tuple, float]:
        got = by_attrs(self.rx.metrics(name, **{"server.port": self.port}), ROLE, TYPE)
        return {k: v for k, v in got.items() if v}  # closed series read 0: same as absent

    def active(self) -> dict[tuple, float]:
        return self.series("network.tcp.connections.active")

    def refused(self) -> float:
        return metric_total(self.rx.metrics("ebpf_otlp.tcp.dropped", reason="socket_map_full"))

    def settle(self, want: dict[tuple, int], what: str,
               check: Callable[[dict, dict], bool] | None = None) -> None:
        """Wait for ss to show ``want``, then for ``active`` to match it
        (or to pass ``check(active, want)``)."""
        want = {k: v for k, v in want.items() if v}
        self.rx.wait_for(lambda: {k: v for k, v in self.truth().items() if v} == want,
                         what=f"ss to show {want} ({what})")
        ok = check or (lambda got, w: got == w)
        try:
            self.rx.wait_for(lambda: ok(self.active(), want), timeout=15, what=what)
        except AssertionError:
            raise AssertionError(f"{what}: active {self.active()} vs ss {self.truth()}") from None

    def close(self) -> None:
        for p in (self.client, self.server):
            p.kill()
            p.wait()


def test_active_equals_ss_while_ten_times_the_socket_table_is_open(topo) -> None:
    table = 64  # --tcp-max-sockets; 640 connections per side are open at once
    port = random.randint(30000, 39999)
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp", "--tcp-max-sockets",
                      str(table)) as agent:
        sc = Scenario(topo, rx, port)
        try:
            before = sc.refused()
            hosts = (topo.b_ip4, topo.b_ip6, topo.b_ip4, topo.b_ip6)
            for host in hosts:  # groups 0-3, 160 connections each
                sc.do(f"open {host} 160")
            full = {(r, t): 320 for r in ("client", "server") for t in ("ipv4", "ipv6")}
            sc.settle(full, "640 connections per side open, ten times the table")
            # the table really was too small (its refusals are counted) ...
            rx.wait_for(lambda: sc.refused() > before, what="refused socket-table inserts")
            # ... and every connection was counted opened, on active's keys
            rx.wait_for(lambda: sc.series("network.tcp.connections.opened") == full,
                        what=f"opened == {full} (client made 640)")
            sc.do("close 0")
            sc.do("close 3")
            half = {(r, t): 160 for r in ("client", "server") for t in ("ipv4", "ipv6")}
            sc.settle(half, "after closing half")
            sc.do("close 1")
            sc.do("close 2")
            sc.settle({}, "after closing all")
            assert metric_total(rx.metrics("ebpf_otlp.tcp.dropped",
                                           reason="socket_storage_failed")) == 0
        finally:
            sc.close()
        agent.stop()
    assert "sock_ops not attached" not in agent.log()


def test_fallback_without_sock_ops_never_over_ss_and_back_to_ss(topo, tmp_path) -> None:
    """A --cgroup that is no cgroup: sock_ops cannot attach, the tracepoints
    count the socket table's connections."""
    table = 512  # room for other tests' sockets: the table is host-wide
    fake = tmp_path / "not-a-cgroup"
    fake.mkdir()
    (fake / "cgroup.controllers").write_text("")
    port = random.randint(30000, 39999)
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp", "--tcp-max-sockets", str(table),
                      "--cgroup", str(fake)) as agent:
        sc = Scenario(topo, rx, port)
        try:
            # 1. A group that fits in the table: every connection tracked.
            sc.do(f"open {topo.b_ip4} 40")
            forty = {("client", "ipv4"): 40, ("server", "ipv4"): 40}
            sc.settle(forty, "40 connections open")
            # 2. Far more than the table holds (2 x 640 sockets > 512 entries):
            # the newest are not tracked, so active stays at or under ss.
            before = sc.refused()
            sc.do(f"open {topo.b_ip4} 600")
            sc.settle({("client", "ipv4"): 640, ("server", "ipv4"): 640}, "640 open",
                      check=lambda got, want: all(got.get(k, 0) <= v for k, v in want.items()))
            # 3. Closing the big group leaves exactly the first one.
            sc.do("close 1")
            sc.settle(forty, "after closing 600")
            sc.do("close 0")
            sc.settle({}, "after closing all")
            rx.wait_for(lambda: sc.refused() > before, what="refused socket-table inserts")
        finally:
            sc.close()
        opened = sc.series("network.tcp.connections.opened")
        agent.stop()
    assert "sock_ops not attached" in agent.log()
    # the first group was tracked on both sides, so opened counts at least it
    assert opened[("client", "ipv4")] >= 40 and opened[("server", "ipv4")] >= 40, opened
