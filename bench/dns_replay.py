"""DNS agent capacity: query/answer frames replayed through the real TC
programs (BPF_PROG_TEST_RUN) at increasing rates, consumed by the real DNS
signal (ring buffer, decoder, pairing, batch span path, histogram) exporting
to a counting OTLP receiver.

Unlike the live flood (bench/dns_flood.py), nothing else needs CPU here: no
DNS server, no Python query generator, no veth softirqs. The producer is a
forked child holding the programs' fds (its CPU is not the agent's); the
agent side runs in this process and its CPU is this process's CPU time. A
rate passes when the ring lost nothing and every query has exactly one span
at the receiver, none dropped. After the measured steps, one more step at
the first rate runs with cProfile on the ring-poller thread (the DNS hot
path); its top entries go into the notes (the profiled step's CPU is not a
figure: the profiler inflates it).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import PY, Figure, Result, command_for, env, wait_until
from .dns_flood import RECEIVER

NAME = "dns_replay"
TITLE = "DNS agent capacity, frames replayed through the TC programs (queries/s)"
PAIRS = 4096  # distinct (txid, client port) exchanges, cycled
TARGET_US = 8.0  # agent CPU per query (issue #19)
TARGET = 100_000  # queries/s replayed with every query reported (issue #19)


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
    rates = [10000, 20000] if quick else [10000, 20000, 40000, 60000, 80000, 100000]
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

        profile = {"want": False, "done": None}

        def poll_loop():  # what the agent's ring-poller thread does
            prof = None
            while not stop.is_set():
                if profile["want"] and prof is None:
                    prof = cProfile.Profile()
                    prof.enable()
                elif not profile["want"] and prof is not None:
                    prof.disable()
                    profile["done"], prof = prof, None
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
            # Complete: every query replayed was reported. The rate judged is the one
            # the producer achieved (on a loaded machine it falls short of the ask).
            step["complete"] = (step["ring_lost"] == 0 and step["spans_dropped"] == 0
                                and step["spans_exported"] == step["sent"])
            steps.append(step)
            print(f"  {rate:>6}/s: {json.dumps(step)}", flush=True)
            if step["complete"] and (best is None
                                     or step["achieved_rate"] > best["achieved_rate"]):
                best = step
            if not step["complete"]:
                break
            short = [x for x in steps if x["achieved_rate"] < 0.95 * x["rate"]]
            if len(short) >= 2:  # the producer is saturated: higher asks change nothing
                break
        if steps:
            profile["want"] = True
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    _produce(qfd, afd, rates[0], seconds, w)
                finally:
                    os._exit(1)
            os.close(w)
            os.waitpid(pid, 0)
            res.raw["profiled_step"] = json.loads(os.read(r, 4096) or b"{}")
            os.close(r)
            time.sleep(2 * cfg.poll_interval_ms / 1000)
            profile["want"] = False
            wait_until(lambda: profile["done"] is not None, 10, 0.05)
            if profile["done"] is not None:
                out = io.StringIO()
                pstats.Stats(profile["done"], stream=out).sort_stats("tottime").print_stats(10)
                top = [ln.strip() for ln in out.getvalue().splitlines()
                       if ln.strip()[:1].isdigit() and "/" in ln]
                res.raw["profile"] = top
                res.note("poll-thread profile at the first rate (cProfile, by own time; "
                         "ncalls tottime percall cumtime percall function): "
                         + " | ".join(" ".join(t.split()[:2] + t.split()[5:])
                                      .replace(str(Path(__file__).parent.parent), "")
                                      for t in top[:8]))
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
    total_sent = sum(s["sent"] for s in steps) + res.raw.get("profiled_step", {}).get("sent", 0)
    res.note(f"receiver: {totals.get('spans')} spans for {total_sent} queries replayed "
             "(the profiled step included); "
             f"histogram count {totals.get('dns.lookup.duration')}")
    if best is None:
        res.status = "partial"
        res.note("no rate passed (see raw.steps)")
        return res
    res.add(Figure.compare("agent CPU per query", best["us_per_query"], "us", TARGET_US,
                           "target", target=1.0, higher_is_better=False,
                           note="at the rate below (all agent threads; every step in "
                                "raw.steps)"))
    res.add(Figure.compare("highest replayed rate with every query reported",
                           best["achieved_rate"], "queries/s", TARGET, "target", target=1.0,
                           note=f"asked {best['rate']}/s; 2 messages per query; no ring loss, "
                                "one span each"))
    res.add(Figure("agent CPU at that rate", best["agent_cpu_pct"], "% of one core"))
    res.add(Figure("agent CPU at 100,000 queries/s (extrapolated)",
                   best["us_per_query"] * 10, "% of one core",
                   note="per-query cost x 100,000/s, when the producer cannot reach that rate "
                        "on this machine"))
    if not steps[-1]["complete"]:
        res.note(f"first failing step: {json.dumps(steps[-1])}")
    return res
