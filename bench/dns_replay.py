"""DNS agent capacity: query/answer frames replayed through the real TC
programs (BPF_PROG_TEST_RUN) at increasing rates, consumed by the real DNS
signal (ring buffer, decoder, pairing, batch span path, histogram) exporting
to a counting OTLP receiver.

Unlike the live flood (bench/dns_flood.py), nothing else needs CPU here: no
DNS server, no Python query generator, no veth softirqs. The producer is a
forked child holding the programs' fds (its CPU is not the agent's); the
agent side runs in this process and its CPU is this process's CPU time. A
rate passes when the ring lost nothing and every query has exactly one span
at the receiver, none dropped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import PY, Figure, Result, command_for, env, wait_until
from .dns_flood import RECEIVER, TARGET

NAME = "dns_replay"
TITLE = "DNS agent capacity, frames replayed through the TC programs (queries/s)"
PAIRS = 4096  # distinct (txid, client port) exchanges, cycled


def _frames() -> list[tuple[bytes, bytes]]:
    """(query frame, answer frame) pairs: Ethernet/IPv4/UDP, distinct ids and ports."""
    mac = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
    cli, srv = socket.inet_aton("10.201.0.1"), socket.inet_aton("10.201.0.2")
    out = []
    for i in range(PAIRS):
        qname = b"".join(bytes([len(p)]) + p for p in (b"h%d" % (i % 256), b"flood", b"test"))
        q = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + qname + b"\0\0\1\0\1"
        a = (struct.pack("!HHHHHH", i, 0x8180, 1, 1, 0, 0) + qname + b"\0\0\1\0\1"
             + b"\xc0\x0c\0\1\0\1\0\0\0\x3c\0\4\x0a\x01\x01\x01")
        port = 20000 + i

        def frame(src, dst, sport, dport, msg):
            udp = struct.pack("!HHHH", sport, dport, 8 + len(msg), 0) + msg
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
            return mac + b"\x08\x00" + ip + udp

        out.append((frame(cli, srv, port, 53, q), frame(srv, cli, 53, port, a)))
    return out


def _produce(qfd: int, afd: int, rate: float, seconds: float, wfd: int) -> None:
    """Child: replay pairs at ``rate`` pairs/s in 1 ms ticks; reports the count sent.

    One prepared ``bpf_test_run_opts`` per frame, so a run is one cffi call
    (the producer's own cost must not cap the rate it offers).
    """
    from ebpf_otlp.platform.libbpf import ffi, lib

    keep = []

    def opts_for(frame: bytes) -> object:
        o = ffi.new("struct bpf_test_run_opts *")
        o.sz = ffi.sizeof("struct bpf_test_run_opts")
        buf = ffi.from_buffer(frame)
        o.data_in, o.data_size_in, o.repeat = buf, len(frame), 1
        keep.append(buf)
        return o

    run = lib.bpf_prog_test_run_opts
    pairs = [(opts_for(q), opts_for(a)) for q, a in _frames()]
    sent = 0
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate) - sent
        for _ in range(max(0, due)):
            q, a = pairs[sent % PAIRS]
            if run(qfd, q) or run(afd, a):
                os._exit(3)
            sent += 1
        time.sleep(max(0.0, 0.001 - (time.monotonic() - now)))
    os.write(wfd, json.dumps({"sent": sent, "elapsed": time.monotonic() - t0}).encode())
    os._exit(0)


def run(quick: bool) -> Result:
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.otlp import Exporter
    from ebpf_otlp.platform.ringbuf import RingPoller
    from ebpf_otlp.signals.dns import DnsSignal

    res = Result(NAME, TITLE, command_for(NAME, quick))
    rates = [10000, 20000] if quick else [10000, 20000, 30000, 40000, 50000, 60000]
    if os.environ.get("EBPF_OTLP_DNS_RATES"):
        rates = [int(r) for r in os.environ["EBPF_OTLP_DNS_RATES"].split(",")]
    seconds = 3.0 if quick else 6.0
    work = Path(tempfile.mkdtemp(prefix="eo-dnsreplay-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = subprocess.Popen([PY, "-c", RECEIVER, str(port), str(work / "totals.json")],
                          stdout=subprocess.PIPE, text=True, env=env())
    os.environ["OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"] = "delta"
    cfg = AgentConfig(ifaces=[], signals=("dns",), endpoint=f"http://127.0.0.1:{port}",
                      interval_s=1.0, dns_timeout_s=1.0)
    tel = Exporter(cfg.export_settings(), cfg.interval_s, cfg.cardinality_limit)
    sig = DnsSignal(cfg, tel)
    stop = threading.Event()
    steps, best, totals = [], None, {}
    try:
        assert "receiving" in rx.stdout.readline()
        sig.start()
        poller = RingPoller(sig.rings())
        obj = sig.dp.obj  # the packet object, shared with flows (here DNS only)
        qfd, afd = obj.programs["packet_tc_egress"].fd, obj.programs["packet_tc_ingress"].fd

        def poll_loop():  # what the agent's ring-poller thread does
            while not stop.is_set():
                poller.poll(cfg.poll_interval_ms)
                sig.tick()

        def export_loop():  # what the agent's export loop does
            while not stop.wait(cfg.interval_s):
                sig.collect()
                sig.export()
                tel.export()

        threads = [threading.Thread(target=f, daemon=True) for f in (poll_loop, export_loop)]
        for t in threads:
            t.start()
        for rate in rates:
            lost0, exp0, drop0 = (sig.rings()[0].lost(), tel.spans.exported,
                                  sum(tel.spans.dropped.values()))
            r, w = os.pipe()
            cpu0 = time.process_time()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    _produce(qfd, afd, rate, seconds, w)
                finally:
                    os._exit(1)
            os.close(w)
            _, status = os.waitpid(pid, 0)
            g = json.loads(os.read(r, 4096) or b"{}")
            os.close(r)
            busy = time.process_time() - cpu0
            wait_until(lambda e=exp0, g=g: tel.spans.exported - e >= g.get("sent", 0), 20, 0.2)
            cpu = time.process_time() - cpu0
            step = {"rate": rate, "sent": g.get("sent", 0),
                    "achieved_rate": round(g.get("sent", 0) / max(g.get("elapsed", 1), 1e-9)),
                    "ring_lost": sig.rings()[0].lost() - lost0,
                    "spans_exported": tel.spans.exported - exp0,
                    "spans_dropped": sum(tel.spans.dropped.values()) - drop0,
                    "agent_cpu_pct": round(100 * cpu / g.get("elapsed", seconds), 1),
                    "agent_cpu_pct_during_flood": round(100 * busy / g.get("elapsed", seconds),
                                                        1),
                    "us_per_query": round(1e6 * cpu / max(g.get("sent", 1), 1), 1),
                    "loadavg": os.getloadavg()[0]}
            step["complete"] = (step["ring_lost"] == 0 and step["spans_dropped"] == 0
                                and step["spans_exported"] == step["sent"]
                                and step["achieved_rate"] >= 0.95 * rate)
            steps.append(step)
            print(f"  {rate:>6}/s: {json.dumps(step)}", flush=True)
            if step["complete"]:
                best = step
            elif step["ring_lost"] or step["spans_dropped"] or \
                    step["achieved_rate"] < 0.95 * rate:
                break
        time.sleep(2 * cfg.interval_s)  # the last metrics reach the receiver
        totals = json.loads((work / "totals.json").read_text())
        res.raw["receiver_totals"] = totals
    finally:
        stop.set()
        sig.close()
        tel.shutdown(2)
        rx.send_signal(signal.SIGTERM)
        rx.wait(5)
        res.raw["steps"] = steps
    total_sent = sum(s["sent"] for s in steps)
    res.note(f"receiver: {totals.get('spans')} spans for {total_sent} queries replayed; "
             f"histogram count {totals.get('dns.lookup.duration')}")
    if steps:
        res.add(Figure("agent CPU per query", steps[0]["us_per_query"], "us",
                       note=f"at {steps[0]['rate']} queries/s (all agent threads)"))
    if best is None:
        res.status = "partial"
        res.note("no rate passed (see raw.steps)")
        return res
    res.add(Figure.compare("highest replayed rate with every query reported", best["rate"],
                           "queries/s", TARGET, "target", target=1.0,
                           note="2 messages per query; no ring loss, one span each"))
    res.add(Figure("agent CPU at that rate", best["agent_cpu_pct"], "% of one core",
                   note=f"{best['us_per_query']} us of agent CPU per query"))
    if steps[-1] is not best:
        res.note(f"first failing step: {json.dumps(steps[-1])}")
    return res
