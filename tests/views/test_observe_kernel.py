"""``ebpf-otlp observe -o json`` during scripted traffic between two namespaces:
TCP connections with known byte counts, a refused connect, DNS queries to a real
dnsmasq, UDP datagrams to a closed port. The truth is the script itself (what it
sent, from which ports, what the server answered) and, for the filters, an
unfiltered observe run at the same time with predicates written here.

Tracepoints are host-wide and other tests run at the same time with the same
addresses, so assertions look at our own ports and DNS names only.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import require
from viewproc import PY, ObserveProc, held_programs, loaded_programs, wait_until

pytestmark = pytest.mark.kernel

DNSMASQ = "/usr/sbin/dnsmasq"
K = 3  # TCP connections
N_UDP = 3  # datagrams to a closed port, each from its own socket
NAMES = {("h.test", "A"): "NOERROR", ("nx.nx.test", "A"): "NXDOMAIN",
         ("t.test", "TXT"): "NOERROR"}

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
for i in range({k}):
    c, _ = s.accept()
    got = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        got += b
    c.sendall(b"r" * (1000 + len(got)))
    c.close()
"""

CLIENT = """
import ctypes, json, socket, sys
ctypes.CDLL(None).prctl(15, sys.argv[4].encode(), 0, 0, 0)  # PR_SET_NAME: our own comm
srv, port, closed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {{"conns": [], "udp": []}}
for i in range({k}):
    c = socket.create_connection((srv, port))
    req = 100 * (i + 1)
    c.sendall(b"q" * req); c.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        got += len(b)
    out["conns"].append([c.getsockname()[1], req, got])
    c.close()
try:
    socket.create_connection((srv, port + 1), timeout=5)
except ConnectionRefusedError:
    out["refused"] = True
for i in range({n}):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 0))
    u.sendto(b"x" * 64, (srv, closed))
    out["udp"].append(u.getsockname()[1])
    u.close()
print(json.dumps(out))
"""


class Dnsmasq:
    """dnsmasq on b's IPv4 address with two records; stopped on exit."""

    def __init__(self, topo):
        self.topo = topo
        self.dir = tempfile.mkdtemp(prefix="eo-dnsmasq-")
        self.proc = None

    def __enter__(self) -> Dnsmasq:
        t = self.topo
        self.proc = t.popen(t.b, DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts",
                            f"--listen-address={t.b_ip4}", "--bind-interfaces",
                            "--local=/nx.test/", "--host-record=h.test,10.1.1.1",
                            "--txt-record=t.test,hello", f"--pid-file={self.dir}/pid",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: "NOERROR" in t.run(t.a, "dig", f"@{t.b_ip4}", "h.test", "+tries=1",
                                              "+time=1", check=False).stdout,
                   20, "dnsmasq to answer")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def traffic(topo, port: int, closed: int, comm: str) -> tuple[dict, int]:
    """Run the scripted traffic; returns (what the client did, the server's pid)."""
    t = topo
    srv = t.popen(t.b, PY, "-c", SERVER.format(k=K), str(port), stdout=subprocess.PIPE,
                  text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        res = t.run(t.a, PY, "-c", CLIENT.format(k=K, n=N_UDP), t.b_ip4, str(port),
                    str(closed), comm)
        srv.wait(20)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    for (name, rtype) in NAMES:
        t.run(t.a, "dig", f"@{t.b_ip4}", name, rtype, "+tries=1", "+time=3")
    return json.loads(res.stdout), srv.pid


def strip(e: dict) -> str:
    """An event without its times: each observer's programs read the clock themselves
    (its TC program runs a little before or after the other's)."""
    return json.dumps({k: v for k, v in e.items() if k not in ("time", "time_unix_nano")
                       and not k.endswith(".duration")}, sort_keys=True)


PORT_KEYS = ("source.port", "destination.port", "client.port", "server.port")


def ports_of(e: dict) -> set:
    return {e.get(k) for k in PORT_KEYS} - {None}


@pytest.fixture
def env(topo):
    require(Path(DNSMASQ).exists(), "dnsmasq not installed (Debian dnsmasq-base)")
    require(shutil.which("dig") is not None, "dig not installed (Debian dnsutils)")
    require(shutil.which("bpftool") is not None, "bpftool not installed")
    with Dnsmasq(topo):
        yield topo


def test_observe_json_gives_each_expected_event_once_and_filters_narrow_exactly(env) -> None:
    t = env
    port = random.randrange(10000, 30000)  # below the ephemeral range
    closed = port + 2  # port + 1 is refused over TCP
    comm = f"eocli{random.randrange(10**6)}"
    # Each filter with the predicate it must equal, written independently of views.filters.
    # The server's pid is only known once it runs: that filter is checked on comm.
    filters = {
        ("--signal", "dns"): lambda e: e["signal"] == "dns",
        ("--port", str(port)): lambda e: port in ports_of(e),
        ("--protocol", "udp"): lambda e: e.get("network.transport") == "udp",
        ("--drop-reason", "no_socket"): lambda e: e.get("network.drop.reason") == "NO_SOCKET",
        ("--dns-name", "h.t*"): lambda e: str(e.get("dns.question.name", "")).startswith("h.t"),
        ("--from-ip", t.a_ip4, "--to-ip", "10.201.0.0/24"):
            lambda e: t.a_ip4 in (e.get("source.address"), e.get("client.address"))
            and any(str(e.get(k, "")).startswith("10.201.0.")
                    for k in ("destination.address", "server.address")),
        ("--ip", f"{t.b_ip4}/32", "--signal", "tcp"):
            lambda e: e["signal"] == "tcp" and t.b_ip4 in (e.get("client.address"),
                                                            e.get("server.address")),
        ("--comm", comm): lambda e: e.get("process.executable.name") == comm,
    }
    before = loaded_programs()
    every = ObserveProc(t, t.a, "--iface", "veth-a").start()
    procs = {f: ObserveProc(t, t.a, "--iface", "veth-a", *f).start() for f in filters}
    try:
        for p in (every, *procs.values()):
            p.wait_ready()
        held = {p.proc.pid: held_programs(p.proc.pid) for p in (every, *procs.values())}
        did, _ = traffic(t, port, closed, comm)
        assert did.get("refused") and len(did["conns"]) == K and len(did["udp"]) == N_UDP
        def mine(events: list[dict]) -> list[dict]:
            """Ours: by the server side's port (a client port of someone else's
            connection may equal ours), DNS by name (only ours cross veth-a)."""
            return [e for e in events
                    if (e["signal"] == "dns" and (e["dns.question.name"],
                                                  e["dns.question.type"]) in NAMES)
                    or (e["signal"] == "tcp" and e.get("server.port") in (port, port + 1))
                    or (e["signal"] == "drops" and e.get("destination.port")
                        in (port + 1, closed) and e.get("source.address") == t.a_ip4)]

        udp = set(did["udp"])

        def seen() -> tuple[int, int]:
            ev = mine(every.events())
            return (sum(1 for e in ev if e["signal"] == "drops" and e.get("source.port") in udp),
                    sum(1 for e in ev if e["signal"] == "dns"))

        try:
            wait_until(lambda: seen() == (N_UDP, 3), 40, "drops and DNS lookups")
        except AssertionError:
            ev = every.events()
            raise AssertionError(
                f"(udp drops, dns lookups) seen: {seen()}; {len(ev)} events, "
                f"{len(mine(ev))} ours, last: {ev[-1:]}; alive: {every.proc.poll() is None}; "
                f"filters: {t.run(t.a, 'tc', 'filter', 'show', 'dev', 'veth-a', 'egress').stdout}"
                f"; stderr: {every.err.read_text()[-2000:]}") from None
        for p in (every, *procs.values()):
            assert p.stop() == 0, p.err.read_text()
        events = mine(every.events())

        # --- exactly the expected events, once each ---------------------------------
        def pick(**kv) -> list[dict]:
            return [e for e in events if all(e.get(k) == v for k, v in kv.items())]

        for cport, req, got in did["conns"]:
            for role in ("client", "server"):
                opens = pick(signal="tcp", event="open", **{"client.port": cport,
                             "network.tcp.handshake.role": role})
                closes = pick(signal="tcp", event="close", **{"client.port": cport,
                              "network.tcp.handshake.role": role})
                assert len(opens) == 1 and len(closes) == 1, (cport, role, opens, closes)
                c = closes[0]
                tx, rx = (req, got) if role == "client" else (got, req)
                assert c["network.tcp.bytes.transmit"] == tx, c
                assert c["network.tcp.bytes.receive"] == rx, c
                assert c["server.port"] == port and c["server.address"] == t.b_ip4
                assert c["client.address"] == t.a_ip4
                assert c["network.tcp.retransmits"] == 0
                assert 0 < c["network.tcp.connection.duration"] < 10
                assert c["network.tcp.rtt"] > 0
            assert pick(signal="tcp", event="close", **{"client.port": cport,
                        "network.tcp.handshake.role": "client"})[0]["process.executable.name"] \
                == comm
        fails = pick(signal="tcp", event="fail")
        assert len(fails) == 1, fails
        assert fails[0]["error.type"] == "refused" and fails[0]["server.port"] == port + 1
        assert fails[0]["process.executable.name"] == comm
        assert len([e for e in events if e["signal"] == "tcp"]) == 4 * K + 1

        dns = pick(signal="dns")
        assert sorted((e["dns.question.name"], e["dns.question.type"],
                       e["dns.response_code"]) for e in dns) == \
            sorted((n, ty, rc) for (n, ty), rc in NAMES.items())
        for e in dns:
            assert e["server.address"] == t.b_ip4 and e["server.port"] == 53
            assert e["client.address"] == t.a_ip4 and e["network.transport"] == "udp"
            assert 0 < e["dns.lookup.duration"] < 3
        assert pick(signal="dns", **{"dns.question.name": "h.test"})[0]["dns.answer.count"] == 1

        drops = pick(signal="drops")
        got_drops = sorted((e["network.transport"], e.get("source.port"),
                            e["destination.port"], e["network.drop.reason"],
                            e["network.packet.drops"]) for e in drops)
        tcp_syn = [d for d in got_drops if d[0] == "tcp"]
        assert sorted(d for d in got_drops if d[0] == "udp") == sorted(
            ("udp", u, closed, "NO_SOCKET", 1) for u in did["udp"])
        assert [d[2:] for d in tcp_syn] == [(port + 1, "NO_SOCKET", 1)], got_drops
        assert len(drops) == N_UDP + 1

        # --- each filter: nothing that fails its predicate, everything that passes it ---
        everything = [strip(e) for e in events]
        for f, pred in filters.items():
            out = procs[f].events()
            bad = [e for e in out if not pred(e)]
            assert not bad, (f, bad[:3])
            want = sorted(s for s, e in zip(everything, events) if pred(e))
            assert sorted(strip(e) for e in mine(out)) == want, f
            assert want, f"filter {f} matched nothing: the test proves nothing"
    finally:
        for p in (every, *procs.values()):
            p.close()
    # Every program the observers held is gone: no TC filter keeps one alive.
    left = loaded_programs() - before
    assert not left & set().union(*held.values()), left
    tcs = t.run(t.a, "tc", "filter", "show", "dev", "veth-a", "ingress").stdout \
        + t.run(t.a, "tc", "filter", "show", "dev", "veth-a", "egress").stdout
    assert "0xeb0f" not in tcs, tcs
