"""Soak: mixed traffic for 10 minutes through one agent per signal (flows, tcp,
dns, drops), each exporting to a null OTLP sink; RSS growth after warm-up,
CPU per signal, and everything each agent reports lost.

Traffic, all at once between two namespaces: UDP over 1,000 distinct flows,
TCP connections opened and closed, DNS queries answered by dnsmasq, and UDP
datagrams to a closed port (drops). The rates are modest and stated; the
point is what does not grow or leak over time, not throughput (the other
benchmarks measure that).

One agent per signal so each one's CPU and memory are its own (the ``ps``
figures of its process). What an agent lost comes from its ``/status``
(ring buffer losses, export failures and drops, spans and logs dropped).
RSS growth is measured from the end of the warm-up (the first 20 %) to the
end. Not run in CI (``make bench`` or ``python -m bench --only soak``);
``--quick`` runs 40 s for the bench smoke test.
"""

from __future__ import annotations

import json
import subprocess
import time

from .common import PY, Figure, Result, env
from .lab import Agent, NullReceiver, Topology

NAME = "soak"
TITLE = "Soak: 10 minutes of mixed traffic, one agent per signal (RSS growth, CPU, losses)"

SIGNALS = ("flows", "tcp", "dns", "drops")
RATES = {"udp_flows_pps": 2000, "tcp_conns_per_s": 50, "dns_queries_per_s": 200,
         "drops_per_s": 200}
H4 = "10.99.0.7"

TRAFFIC = r"""
import json, os, socket, struct, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
rates = json.loads(sys.argv[3])
udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.setblocking(False)
q = lambda i: struct.pack("!HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + \
    b"\x04soak\x04test\x00" + struct.pack("!HH", 1, 1)
sent = {"udp": 0, "tcp": 0, "dns": 0, "drop": 0, "tcp_fail": 0}
start = time.monotonic()
tick = 0.05
nxt = start
while time.monotonic() - start < secs:
    for _ in range(int(rates["udp_flows_pps"] * tick)):
        i = sent["udp"]
        udp[i % 10].sendto(b"u" * 64, (dst, 20000 + (i // 10) % 100))
        sent["udp"] += 1
    for _ in range(max(1, int(rates["drops_per_s"] * tick))):
        udp[0].sendto(b"d", (dst, 9))
        sent["drop"] += 1
    for _ in range(max(1, int(rates["dns_queries_per_s"] * tick))):
        dns.sendto(q(sent["dns"]), (dst, 53))
        sent["dns"] += 1
    try:
        while dns.recv(512):
            pass
    except BlockingIOError:
        pass
    for _ in range(max(1, int(rates["tcp_conns_per_s"] * tick))):
        try:
            c = socket.create_connection((dst, 7777), timeout=1)
            c.sendall(b"x" * 100)
            c.close()
            sent["tcp"] += 1
        except OSError:
            sent["tcp_fail"] += 1
    nxt += tick
    time.sleep(max(0.0, nxt - time.monotonic()))
print(json.dumps(sent))
"""

SINK_TCP = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(512)
print("ready", flush=True)
def serve(c):
    try:
        while c.recv(65536):
            pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _status(topo: Topology, port: int) -> dict:
    out = topo.run(topo.a, PY, "-c", "import urllib.request,sys;sys.stdout.write(urllib.request."
                   f"urlopen('http://127.0.0.1:{port}/status',timeout=10).read().decode())")
    return json.loads(out.stdout)


def _losses(st: dict) -> dict[str, float]:
    """Everything an agent's /status says was lost or failed."""
    out: dict[str, float] = {}
    for sig in st["signals"].values():
        for ring, r in sig.get("rings", {}).items():
            if r["lost"]:
                out[f"ring {ring} lost"] = r["lost"]
    for kind, x in st["export"].items():
        if x["failures"]:
            out[f"{kind} export failures"] = x["failures"]
        for reason, n in x["dropped"].items():
            out[f"{kind} export dropped ({reason})"] = n
    # st["dropped"] (spans, logs waiting to be sent) is counted in st["export"] too
    return out


def run(quick: bool = False) -> Result:
    seconds = 40.0 if quick else 600.0
    interval = 2.0 if quick else 10.0
    res = Result(NAME, TITLE, "sudo .venv/bin/python -m bench --only soak"
                 + (" --quick" if quick else ""))
    res.raw["rates"] = RATES
    res.raw["seconds"] = seconds
    res.note("traffic: " + ", ".join(f"{k}={v}" for k, v in RATES.items())
             + f"; {seconds:.0f} s, export interval {interval:g} s, delta temporality")
    res.note("tcp and drops see every namespace of the host (tracepoints are global): on a "
             "shared machine their CPU, memory and losses include other processes' traffic")
    with Topology() as t:
        dnsmasq = t.popen(t.b, "/usr/sbin/dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
                          "--port", "53", f"--listen-address={t.b_ip4}", "--bind-interfaces",
                          f"--address=/soak.test/{H4}", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        tcp_srv = t.popen(t.b, PY, "-c", SINK_TCP, stdout=subprocess.PIPE, text=True)
        assert tcp_srv.stdout.readline().strip() == "ready"
        sinks, agents = [], {}
        try:
            for i, sig in enumerate(SIGNALS):
                sink = NullReceiver(t, t.a).__enter__()
                sinks.append(sink)
                args = ["--signals", sig, "--interval", str(interval), "--endpoint",
                        sink.endpoint, "--health-listen", f"127.0.0.1:{8700 + i}"]
                if sig in ("flows", "dns"):
                    args += ["--iface", t.a_if]
                agents[sig] = Agent(t, t.a, *args, log_name=f"soak-{sig}.log",
                                    extra_env={"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_"
                                               "PREFERENCE": "delta"}).__enter__()
            gen = t.popen(t.a, PY, "-c", TRAFFIC, t.b_ip4, str(seconds), json.dumps(RATES),
                          stdout=subprocess.PIPE, text=True, env=env())
            t0 = time.monotonic()
            warm = seconds * 0.2
            rss_warm: dict[str, int] = {}
            cpu_warm: dict[str, float] = {}
            peak = {s: 0 for s in SIGNALS}
            samples: dict[str, list[tuple[float, int]]] = {s: [] for s in SIGNALS}
            while gen.poll() is None:
                el = time.monotonic() - t0
                for s, a in agents.items():
                    if not a.alive():
                        raise RuntimeError(f"{s} agent died: {a.log()[-2000:]}")
                    rss = a.rss_bytes()
                    peak[s] = max(peak[s], rss)
                    samples[s].append((round(el, 1), rss))
                    if el >= warm and s not in rss_warm:
                        rss_warm[s], cpu_warm[s] = rss, a.cpu_s()
                time.sleep(1.0)
            t1 = time.monotonic()
            sent = json.loads(gen.stdout.read() or "{}")
            time.sleep(interval * 1.5)  # the last interval exported
            for i, (s, a) in enumerate(agents.items()):
                rss_end = a.rss_bytes()
                cpu = a.cpu_s() - cpu_warm.get(s, 0.0)
                span = t1 - t0 - warm
                st = _status(t, 8700 + i)
                lost = _losses(st)
                growth = (rss_end - rss_warm[s]) / rss_warm[s] * 100 if s in rss_warm else None
                res.add(Figure(f"{s}: RSS growth after warm-up", growth, "%",
                               target="< 5 %", met=growth is not None and growth < 5,
                               note=f"{rss_warm.get(s, 0) / 2**20:.1f} -> "
                                    f"{rss_end / 2**20:.1f} MiB, peak {peak[s] / 2**20:.1f} MiB"))
                res.add(Figure(f"{s}: CPU", cpu / span * 100 if span > 0 else None, "% of a core",
                               note="after warm-up"))
                res.add(Figure(f"{s}: records lost or failed", float(sum(lost.values())), "",
                               target="0", met=not lost, note="; ".join(
                                   f"{k}={v}" for k, v in lost.items()) or "none"))
                res.raw[f"{s}_status"] = st
                res.raw[f"{s}_rss_samples"] = samples[s][:: max(1, len(samples[s]) // 60)]
            res.raw["sent"] = sent
        finally:
            for a in agents.values():
                a.__exit__()
            for sink in sinks:
                stats = sink.stop()
                stats.pop("log", None)  # per-request log: too long to keep
                res.raw.setdefault("sinks", []).append(stats)
            for p in (dnsmasq, tcp_srv):
                p.kill()
                p.wait()
    if any(f.met is False for f in res.figures):
        res.status = "partial"
    return res
