"""TCP health against the real kernel: real connections between two
namespaces, the agent in namespace a, its export read back through a real
OTLP receiver, compared with what the test itself did (payload sizes, wall
times, refused connects) and with the kernel's own counters (/proc/net/snmp
RetransSegs, nft rule counters).

The tracepoints are global: other tests on this host make TCP connections
too, with the same addresses. Every assertion filters on a server port
chosen at random for the test.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc, by_attrs, metric_total

pytestmark = pytest.mark.kernel

PY = sys.executable
ROLE = "network.tcp.handshake.role"

# Accepts `count` connections; reads each to EOF, answers with the next
# response size, closes. Dual-stack: IPv4 peers arrive v4-mapped.
SERVER = r"""
import json, os, socket, sys
port, resp = int(sys.argv[1]), json.loads(sys.argv[2])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port)); s.listen(64)
print(json.dumps({"pid": os.getpid()}), flush=True)
for size in resp:
    c, _ = s.accept(); n = 0
    while True:
        d = c.recv(1 << 16)
        if not d: break
        n += len(d)
    c.sendall(b"r" * size); c.close()
"""

# One connection per (address, request size): wall time measured around
# connect .. close with the monotonic clock, local port reported.
CLIENT = r"""
import json, os, socket, sys, time
port, plan = int(sys.argv[1]), json.loads(sys.argv[2])
out = []
for host, size in plan:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(fam)
    t0 = time.monotonic_ns()
    c.connect((host, port))
    cport = c.getsockname()[1]
    c.sendall(b"q" * size); c.shutdown(socket.SHUT_WR)
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d: break
        n += len(d)
    c.close()
    out.append({"cport": cport, "wall_ns": time.monotonic_ns() - t0, "received": n})
print(json.dumps({"pid": os.getpid(), "conns": out}))
"""


def pick_port() -> int:
    return random.randint(20000, 29999)


def start_server(topo, port: int, resp: list[int]) -> tuple[subprocess.Popen, int]:
    proc = topo.popen(topo.b, PY, "-c", SERVER, str(port), json.dumps(resp),
                      stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())["pid"]


def points(rx: ReceiverProc, name: str, port: int, **attrs: object) -> list[dict]:
    return rx.metrics(name, **{"server.port": port}, **attrs)


def total(rx: ReceiverProc, name: str, port: int, **attrs: object) -> float:
    return metric_total(points(rx, name, port, **attrs))


def nft(topo, ns: str, *args: str) -> None:
    topo.run(ns, "nft", *args)


def nft_rule_packets(topo, ns: str, table: str) -> int:
    out = json.loads(topo.run(ns, "nft", "-j", "list", "table", "inet", table).stdout)
    n = 0
    for e in out["nftables"]:
        for x in e.get("rule", {}).get("expr", []):
            if "counter" in x:
                n += x["counter"]["packets"]
    return n


def test_lifecycle_bytes_durations_and_owners(topo) -> None:
    port = pick_port()
    plan = [(topo.b_ip4, 1000), (topo.b_ip6, 20000), (topo.b_ip4, 300000),
            (topo.b_ip6, 7), (topo.b_ip4, 65536), (topo.b_ip6, 123457)]
    resp = [5, 70000, 1234, 999999, 1, 4096]
    k = len(plan)
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp", "--tcp-spans") as agent:
        server, server_pid = start_server(topo, port, resp)
        res = topo.run(topo.a, PY, "-c", CLIENT, str(port), json.dumps(plan))
        server.wait(30)
        client = json.loads(res.stdout)
        assert [c["received"] for c in client["conns"]] == resp
        rx.wait_for(lambda: len(rx.spans(**{"server.port": port})) >= 2 * k,
                    what="one span per connection and side")
        rx.wait_for(lambda: sum(p["count"] for p in points(
            rx, "network.tcp.connection.duration", port)) >= 2 * k, what="all closes")
        agent.stop()

    opened = by_attrs(points(rx, "network.tcp.connections.opened", port), ROLE, "network.type")
    assert opened == {("client", "ipv4"): 3, ("client", "ipv6"): 3,
                      ("server", "ipv4"): 3, ("server", "ipv6"): 3}
    assert by_attrs(points(rx, "network.tcp.connections.active", port), ROLE) == {
        ("client",): 0, ("server",): 0}
    assert points(rx, "network.tcp.connections.failed", port) == []
    for name in ("network.tcp.connection.duration", "network.tcp.handshake.duration"):
        counts = by_attrs(points(rx, name, port), ROLE)
        assert counts == {("client",): k, ("server",): k}, name

    sent, got = sum(s for _, s in plan), sum(resp)
    assert by_attrs(points(rx, "network.tcp.bytes", port), ROLE, "network.io.direction") == {
        ("client", "transmit"): sent, ("client", "receive"): got,
        ("server", "transmit"): got, ("server", "receive"): sent}
    # server.address as the client dialled it; the client port is dropped by default
    addrs = by_attrs(points(rx, "network.tcp.connections.opened", port), "server.address",
                     "client.port")
    assert addrs == {(topo.b_ip4, None): 6, (topo.b_ip6, None): 6}

    # Spans: one per connection and side, each inside the client's wall time.
    spans = rx.spans(**{"server.port": port})
    assert len(spans) == 2 * k
    by_port = {c["cport"]: (c, plan[i], resp[i]) for i, c in enumerate(client["conns"])}
    for s in spans:
        a = s["attributes"]
        conn, (host, req), answer = by_port[a["client.port"]]
        assert a["server.address"] == host
        assert s["end_ns"] - s["start_ns"] <= conn["wall_ns"]
        if a[ROLE] == "client":
            assert s["kind"] == "CLIENT"
            assert a["process.pid"] == client["pid"]
            assert (a["network.tcp.bytes.transmit"], a["network.tcp.bytes.receive"]) == (
                req, answer)
        else:
            assert s["kind"] == "SERVER"
            assert a["process.pid"] == server_pid  # found at accept()
            assert (a["network.tcp.bytes.transmit"], a["network.tcp.bytes.receive"]) == (
                answer, req)
        assert a["process.executable.name"].startswith("python")


def test_refused_connect_counts_failure_and_reset(topo) -> None:
    port = pick_port()  # nothing listens there in namespace b
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
        res = topo.run(topo.a, PY, "-c", "import socket,sys\n"
                       "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                       "except ConnectionRefusedError:\n print('refused')\n",
                       topo.b_ip4, str(port))
        assert res.stdout.strip() == "refused"
        rx.wait_for(lambda: points(rx, "network.tcp.connections.failed", port),
                    what="the failed connect")
        time.sleep(1.5)  # reset counters are drained once per interval
        agent.stop()
    failed = by_attrs(points(rx, "network.tcp.connections.failed", port), ROLE, "error.type")
    assert failed == {("client", "refused"): 1}
    resets = by_attrs(points(rx, "network.tcp.resets", port), ROLE, "network.io.direction")
    assert resets == {("client", "receive"): 1, ("server", "transmit"): 1}
    assert points(rx, "network.tcp.connections.opened", port) == []


def test_syn_timeout_is_a_timeout_failure(topo) -> None:
    require(shutil.which("nft") is not None, "nft (Debian nftables) is not installed")
    port = pick_port()
    topo.run(topo.a, "sysctl", "-qw", "net.ipv4.tcp_syn_retries=1")  # give up after ~3 s
    nft(topo, topo.b, "add", "table", "inet", "eo_tcp")
    nft(topo, topo.b, "add", "chain", "inet", "eo_tcp", "input",
        "{ type filter hook input priority 0 ; }")
    nft(topo, topo.b, "add", "rule", "inet", "eo_tcp", "input", "tcp", "dport", str(port),
        "counter", "drop")
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
        res = topo.run(topo.a, PY, "-c", "import socket,sys\n"
                       "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                       "except (TimeoutError, OSError) as e:\n print(type(e).__name__)\n",
                       topo.b_ip4, str(port))
        assert res.stdout.strip() == "TimeoutError"
        rx.wait_for(lambda: points(rx, "network.tcp.connections.failed", port),
                    what="the failed connect")
        time.sleep(1.5)
        agent.stop()
    failed = by_attrs(points(rx, "network.tcp.connections.failed", port), ROLE, "error.type")
    assert failed == {("client", "timeout"): 1}
    syns = nft_rule_packets(topo, topo.b, "eo_tcp")
    assert total(rx, "network.tcp.retransmits", port) == syns - 1  # all SYNs but the first


def test_retransmits_equal_retranssegs_under_loss(topo) -> None:
    require(shutil.which("nft") is not None, "nft (Debian nftables) is not installed")
    port = pick_port()
    size = 8 << 20
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
        server, _ = start_server(topo, port, [0])
        nft(topo, topo.b, "add", "table", "inet", "eo_tcp")
        nft(topo, topo.b, "add", "chain", "inet", "eo_tcp", "input",
            "{ type filter hook input priority 0 ; }")
        nft(topo, topo.b, "add", "rule", "inet", "eo_tcp", "input", "tcp", "dport", str(port),
            "numgen", "random", "mod", "10", "0", "counter", "drop")
        before = sum(topo.snmp(ns)["RetransSegs"] for ns in (topo.a, topo.b))
        res = topo.run(topo.a, PY, "-c", CLIENT, str(port), json.dumps([[topo.b_ip4, size]]),
                       timeout=120)
        server.wait(30)
        assert json.loads(res.stdout)["conns"][0]["received"] == 0
        rx.wait_for(lambda: points(rx, "network.tcp.connection.duration", port),
                    what="the connection's close")
        after = sum(topo.snmp(ns)["RetransSegs"] for ns in (topo.a, topo.b))
        time.sleep(1.5)  # one more drain of the kernel counters
        agent.stop()
    dropped = nft_rule_packets(topo, topo.b, "eo_tcp")
    assert dropped > 0
    kernel = after - before
    assert kernel > 0
    assert total(rx, "network.tcp.retransmits", port) == kernel
    spans_free = by_attrs(points(rx, "network.tcp.bytes", port), ROLE, "network.io.direction")
    assert spans_free[("client", "transmit")] == size
    assert spans_free[("server", "receive")] == size


def test_first_syn_dropped_handshake_takes_the_syn_timeout(topo) -> None:
    require(shutil.which("nft") is not None, "nft (Debian nftables) is not installed")
    port = pick_port()
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
        server, _ = start_server(topo, port, [10])
        nft(topo, topo.b, "add", "table", "inet", "eo_tcp")
        nft(topo, topo.b, "add", "chain", "inet", "eo_tcp", "input",
            "{ type filter hook input priority 0 ; }")
        # numgen inc runs only for SYNs to our port: the first one (0) is dropped.
        nft(topo, topo.b, "add", "rule", "inet", "eo_tcp", "input", "tcp", "dport", str(port),
            "tcp", "flags", "&", "(syn|ack)", "==", "syn", "numgen", "inc", "mod", "1000", "0",
            "counter", "drop")
        before = sum(topo.snmp(ns)["RetransSegs"] for ns in (topo.a, topo.b))
        res = topo.run(topo.a, PY, "-c", CLIENT, str(port), json.dumps([[topo.b_ip4, 10]]))
        server.wait(30)
        wall = json.loads(res.stdout)["conns"][0]["wall_ns"] / 1e9
        rx.wait_for(lambda: points(rx, "network.tcp.connection.duration", port),
                    what="the connection's close")
        after = sum(topo.snmp(ns)["RetransSegs"] for ns in (topo.a, topo.b))
        time.sleep(1.5)
        agent.stop()
    assert nft_rule_packets(topo, topo.b, "eo_tcp") == 1
    hs = points(rx, "network.tcp.handshake.duration", port, **{ROLE: "client"})
    assert sum(p["count"] for p in hs) == 1
    seconds = sum(p["sum"] for p in hs)
    assert 0.8 <= seconds <= 1.2, seconds  # the initial RTO is 1 s
    assert seconds <= wall
    assert after - before == 1
    assert by_attrs(points(rx, "network.tcp.retransmits", port), ROLE) == {("client",): 1}


LONG_CLIENT = r"""
import socket, struct, sys, threading, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
stop = threading.Event()
rtts = []  # the socket's own smoothed RTT (TCP_INFO tcpi_rtt, us) while it runs
def feed():
    while not stop.is_set():
        c.sendall(b"x" * 100); time.sleep(0.05)
        info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        rtts.append(struct.unpack_from("<I", info, 68)[0])
t = threading.Thread(target=feed); t.start()
print("connected", flush=True)
sys.stdin.readline()          # the test says when to close
stop.set(); t.join(); c.shutdown(socket.SHUT_WR)
while c.recv(1 << 16): pass
c.close(); print("closed", min(rtts), max(rtts), flush=True)
"""


# Echoes one connection: both sides send data, so both sides measure RTT
# (a side that only receives and ACKs takes no RTT samples).
ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(1 << 16)
    if not d: break
    c.sendall(d)
c.close()
"""


def test_rtt_points_exist_before_a_long_connection_closes(topo) -> None:
    port = pick_port()
    with ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
        server = topo.popen(topo.b, PY, "-c", ECHO_SERVER, str(port), stdout=subprocess.PIPE,
                            text=True)
        assert server.stdout.readline().strip() == "listening"
        client = topo.popen(topo.a, PY, "-c", LONG_CLIENT, topo.b_ip6, str(port),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "connected"
            rtt = rx.wait_for(lambda: {p[ROLE] for p in (
                r["attributes"] for r in points(rx, "network.tcp.rtt", port))} >= {
                    "client", "server"} and points(rx, "network.tcp.rtt", port),
                timeout=15, what="RTT points from both sides")
            assert client.poll() is None  # still connected
            assert points(rx, "network.tcp.connection.duration", port) == []
            client.stdin.write("\n")
            client.stdin.flush()
            closed, lo, hi = client.stdout.readline().split()
            assert closed == "closed"
        finally:
            if client.poll() is None:
                client.kill()
            client.wait()
            server.wait(10)
        agent.stop()
    # The client's samples against the socket's own view: TCP_INFO's smoothed RTT over
    # the same time. A factor of 3 either way absorbs jitter and would still catch the
    # kernel's 8x-scaled srtt_us exported unscaled.
    ours = [p["sum"] / p["count"] * 1e6 for p in rtt if p["attributes"][ROLE] == "client"]
    assert ours and all(int(lo) / 3 <= v <= int(hi) * 3 for v in ours), (ours, lo, hi)
