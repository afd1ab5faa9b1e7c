"""``ebpf-otlp demo``: everything on this machine, nothing outside it.

Two network namespaces joined by a veth pair; in namespace ``a`` the agent
watches ``veth-a`` and exports to ``ebpf-otlp receive``, and ``ebpf-otlp
observe`` runs beside it; servers in ``b`` (TCP echo, dnsmasq when installed)
and clients in ``a`` make traffic; then a summary of what the receiver
decoded, and a few of the lines observe printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from .lab import Topology
from .views.observe import line

PY = sys.executable

TCP_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.create_server((sys.argv[1], 7000), family=socket.AF_INET6 if ':' in sys.argv[1]
                             else socket.AF_INET)
    while True:
        c, _ = s.accept()
        n = 0
        while (d := c.recv(65536)):
            n += len(d)
        c.sendall(b'x' * (n // 2))
        c.close()
""")
TCP_CLIENT = textwrap.dedent("""
    import socket, sys, time
    host, k = sys.argv[1], int(sys.argv[2])
    for i in range(k):
        c = socket.create_connection((host, 7000))
        c.sendall(b'y' * (1000 * (i + 1)))
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
        c.close()
    for port in (7001, 7002):
        try:
            socket.create_connection((host, port), timeout=2)
        except OSError:
            pass
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(20):
        u.sendto(b'z' * 100, (host, 9999))
""")


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited early:\n{path.read_text() if path.exists() else ''}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {text!r}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _traffic(topo: Topology, tmp: Path, seconds: float) -> None:
    server = topo.popen(topo.b, PY, "-c", TCP_SERVER, topo.b_ip4, stderr=subprocess.DEVNULL)
    dns = None
    dnsmasq = shutil.which("dnsmasq")
    if dnsmasq:
        dns = topo.popen(topo.b, dnsmasq, "--no-daemon", "--no-resolv", "--no-hosts",
                         f"--listen-address={topo.b_ip4}", "--bind-interfaces",
                         f"--pid-file={tmp}/dnsmasq.pid", "--local=/demo.test/",
                         "--host-record=www.demo.test,10.201.0.80,fd00:eb::80",
                         "--txt-record=txt.demo.test,hello", stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        end = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < end:
            topo.run(topo.a, PY, "-c", TCP_CLIENT, topo.b_ip4, "5", check=False)
            if shutil.which("ping"):
                topo.run(topo.a, "ping", "-c", "3", "-i", "0.2", topo.b_ip4, check=False)
            if dns is not None:
                _dns_queries(topo)
            rounds += 1
            time.sleep(1)
        print(f"demo: {rounds} rounds of traffic sent", file=sys.stderr)
    finally:
        _stop(server)
        _stop(dns)


def _dns_queries(topo: Topology) -> None:
    script = textwrap.dedent(f"""
        import dns.message, dns.query
        for name, t in (("www.demo.test", "A"), ("www.demo.test", "AAAA"),
                        ("txt.demo.test", "TXT"), ("nope.demo.test", "A")):
            try:
                dns.query.udp(dns.message.make_query(name, t), "{topo.b_ip4}", timeout=2)
            except Exception:
                pass
    """)
    topo.run(topo.a, PY, "-c", script, check=False)


def summarize(records: list[dict]) -> str:
    out = []
    metrics: dict[str, list[dict]] = defaultdict(list)
    spans = [r for r in records if r["type"] == "span"]
    for r in records:
        if r["type"] == "metric":
            metrics[r["name"]].append(r)

    def total(name: str, key: tuple[str, ...]) -> dict[tuple, float]:
        acc: dict[tuple, float] = defaultdict(float)
        for p in metrics.get(name, []):
            acc[tuple(p["attributes"].get(k) for k in key)] += p.get("value", p.get("count", 0))
        return acc

    flows = total("network.flow.bytes", ("source.address", "destination.address",
                                         "network.transport", "destination.port",
                                         "network.io.direction"))
    out.append("Flows on veth-a (top 8 by bytes):")
    for k, v in sorted(flows.items(), key=lambda kv: -kv[1])[:8]:
        port = f":{k[3]}" if k[3] else ""
        out.append(f"  {k[4] or '?':9s} {k[0]} -> {k[1]}{port} {k[2]}  {int(v)} B")
    out.append("TCP connections:")
    for name in ("network.tcp.connections.opened", "network.tcp.connections.failed",
                 "network.tcp.retransmits", "network.tcp.resets"):
        for k, v in sorted(total(name, ("network.tcp.handshake.role", "error.type")).items(),
                           key=str):
            extra = f" error.type={k[1]}" if k[1] else ""
            out.append(f"  {name} role={k[0]}{extra}: {int(v)}")
    dns = [s for s in spans if "dns.question.name" in s["attributes"]]
    out.append(f"DNS queries ({len(dns)} spans):")
    for s in dns[:8]:
        a = s["attributes"]
        ms = (s["end_ns"] - s["start_ns"]) / 1e6
        out.append(f"  {a.get('dns.question.name')} {a.get('dns.question.type')} -> "
                   f"{a.get('dns.response_code', a.get('error.type'))} in {ms:.2f} ms")
    out.append("Packet drops by kernel reason:")
    for k, v in sorted(total("network.packet.drops", ("network.drop.reason",)).items(),
                       key=lambda kv: -kv[1]):
        out.append(f"  {k[0]}: {int(v)}")
    out.append("Agent health:")
    for name in ("ebpf_otlp.events.received", "ebpf_otlp.events.lost",
                 "ebpf_otlp.export.failures"):
        pts = metrics.get(name, [])
        out.append(f"  {name}: {int(sum(p['value'] for p in pts))}")
    return "\n".join(out)


DEMO_PORTS = "7000,7001,7002,9999,53"


def observed(path: Path, per_kind: int = 2) -> list[str]:
    """A few of observe's events, at most ``per_kind`` of each signal and event."""
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    if not path.exists():
        return out
    for text in path.read_text().splitlines():
        if not text.endswith("}"):
            continue
        ev = json.loads(text)
        ev["time"] = ev.pop("time_unix_nano")
        kind = (ev["signal"], ev["event"])
        if seen[kind] < per_kind:
            seen[kind] += 1
            out.append(line(ev, colour=False))
    return out


def run_demo(seconds: float = 12.0) -> int:
    if os.geteuid() != 0:
        print("ebpf-otlp demo: run as root (it creates namespaces and loads BPF)",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ebpf-otlp-demo-"))
    otlp, agent_log = tmp / "otlp.jsonl", tmp / "agent.log"
    rx = agent = obs = None
    with Topology() as topo:
        try:
            rx_log = open(tmp / "receiver.log", "w")  # noqa: SIM115
            rx = topo.popen(topo.a, PY, "-m", "ebpf_otlp", "receive", "--listen",
                            "127.0.0.1:4318", "--output", str(otlp), stderr=rx_log)
            _wait_for(tmp / "receiver.log", "receiving", rx, 30)
            log = open(agent_log, "w")  # noqa: SIM115
            agent = topo.popen(topo.a, PY, "-m", "ebpf_otlp", "run", "--iface", topo.a_if,
                               "--endpoint", "http://127.0.0.1:4318", "--interval", "2",
                               "--tcp-spans", "--dns-names", stderr=log, stdout=log,
                               env=dict(os.environ,
                                        OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta"))
            _wait_for(agent_log, "ebpf-otlp running", agent, 60)
            obs_out = open(tmp / "observe.jsonl", "w")  # noqa: SIM115
            obs_err = open(tmp / "observe.log", "w")  # noqa: SIM115
            obs = topo.popen(topo.a, PY, "-m", "ebpf_otlp", "observe", "--iface", topo.a_if,
                             "-o", "json", "--port", DEMO_PORTS, stdout=obs_out, stderr=obs_err)
            _wait_for(tmp / "observe.log", "observing", obs, 60)
            print(f"demo: agent attached to {topo.a_if} in namespace {topo.a}; "
                  f"sending traffic for {seconds:.0f} s", file=sys.stderr)
            _traffic(topo, tmp, seconds)
            time.sleep(2.5)
        finally:
            if obs is not None and obs.poll() is None:
                obs.send_signal(signal.SIGINT)
                obs.wait(20)
            _stop(agent)
            time.sleep(0.5)
            _stop(rx)
    records = [json.loads(line) for line in otlp.read_text().splitlines()
               if line.endswith("}")] if otlp.exists() else []
    print(summarize(records))
    lines = observed(tmp / "observe.jsonl")
    print(f"\n`ebpf-otlp observe --iface {Topology.a_if} --port {DEMO_PORTS}` beside the "
          f"agent (a few of its lines):")
    print("\n".join("  " + ln for ln in lines) or "  (nothing)")
    print(f"\n{len(records)} data points/spans received; raw OTLP as JSON lines: {otlp}; "
          f"agent log: {agent_log}; observe's events: {tmp / 'observe.jsonl'}")
    return 0 if (records and lines and agent is not None and agent.returncode == 0
                 and obs is not None and obs.returncode == 0) else 1
