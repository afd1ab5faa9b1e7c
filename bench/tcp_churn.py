"""TCP: connection churn with the agent's TCP signal attached versus not.

Short connections (connect, 100 bytes each way, close) between two
namespaces over veth, from a C generator (bench/churn.c, built here with
gcc: the Python client topped out near 4,500 connections/s). Trials
alternate without and with the agent (``--signals tcp``, exporting every
second to a local receiver) so load drift hits both sides alike. Reported:

- connections/s in each mode (median of trials) and their ratio;
- the agent's CPU per connection (every connection is seen twice, client
  and server side) and in percent of one core;
- a sustained run (60 s; 5 s with --quick) at a fixed rate (20,000/s, or
  90 % of the highest rate reached here when that is lower), checked for
  lost records: the receiver must count one connection-duration value per
  closed socket (2 per connection) and ``ebpf_otlp.events.lost`` must stay 0;
  the agent's CPU at 20,000 connections/s is extrapolated from its cost per
  connection when the generator cannot reach that rate on this machine;
- the agent's top functions during the sustained run (py-spy, when installed).

    sudo .venv/bin/python -m bench.tcp_churn [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .common import WORK, Figure, Result, command_for, env, median

NAME = "tcp_churn"
TITLE = "TCP: connection churn with the TCP signal attached vs not, and agent CPU"
TARGET_RATIO = 0.95
TARGET_US = 20.0  # agent CPU per connection (issue #19)
TARGET_RATE = 20000  # connections/s, sustained
PORT = 18080
CONCURRENCY = 64

# The Python client and server, one connection at a time (bench/alternatives.py
# compares tools with them; this benchmark uses the C generator).
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096); c.sendall(b"r" * 100); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0; end = time.monotonic() + secs; t0 = time.monotonic()
while time.monotonic() < end:
    c = socket.create_connection((host, port))
    c.sendall(b"q" * 100)
    while c.recv(4096): pass
    c.close(); n += 1
print(json.dumps({"n": n, "secs": time.monotonic() - t0}))
"""


def build_churn() -> Path:
    src = Path(__file__).with_name("churn.c")
    out = WORK / "churn"
    WORK.mkdir(parents=True, exist_ok=True)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    if not shutil.which("gcc"):
        raise RuntimeError("gcc not installed: apt-get install gcc")
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"building churn failed:\n{res.stderr}")
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _total(rx, name: str, **attrs: object) -> float:
    from otlp import metric_total

    return metric_total(rx.metrics(name, **attrs))


def _churn(topo, churn: Path, secs: float, rate: float = 0) -> tuple[float, int]:
    out = topo.run(topo.a, str(churn), "client", topo.b_ip4, str(PORT), str(secs),
                   str(CONCURRENCY), str(rate), timeout=secs + 60)
    r = json.loads(out.stdout)
    if r["errors"]:
        raise RuntimeError(f"churn client: {r['errors']} failed connections")
    return r["n"] / r["secs"], r["n"]


def _profile_top(path: Path, n: int = 8) -> list[str]:
    """Top entries of a py-spy raw profile: own time (leaf frames) and the inclusive
    time of our signal and OTLP functions, per function (lines merged)."""
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0

    def name(frame: str) -> str:
        fn, _, where = frame.partition(" (")
        return f"{fn} ({where.split(':')[0]})"

    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        c = int(count)
        total += c
        frames = [name(f) for f in stack.split(";") if " (" in f]
        if frames:
            own[frames[-1]] += c
        for f in set(frames):
            if "ebpf_otlp/signals/" in f or "ebpf_otlp/otlp/" in f:
                ours[f] += c
    if not total:
        return []
    return ([f"own {100 * c / total:.0f}% {f}" for f, c in own.most_common(n)]
            + [f"incl {100 * c / total:.0f}% {f}" for f, c in ours.most_common(n)])


def run(quick: bool = False) -> Result:
    from netns import Topology
    from otlp import AgentProc, ReceiverProc

    res = Result(NAME, TITLE, command_for(NAME, quick))
    trials, secs, long_secs = (2, 2.0, 5.0) if quick else (4, 5.0, 60.0)
    churn = build_churn()
    base, attached, cpu_pct, cpu_us, bpf_ns = [], [], [], [], []
    os.environ.update(env())
    spy = shutil.which("py-spy") or str(Path(os.environ.get("VIRTUAL_ENV", ".venv"),
                                             "bin", "py-spy"))
    with Topology() as topo, ReceiverProc(topo, topo.a) as rx:
        # The server closes first: its side keeps the TIME_WAITs, client ports recycle.
        topo.run(topo.a, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")
        server = topo.popen(topo.b, str(churn), "server", str(PORT), stdout=subprocess.PIPE,
                            text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            _churn(topo, churn, 1.0)  # warm up
            for _ in range(trials):
                base.append(_churn(topo, churn, secs)[0])
                with AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
                    time.sleep(1.0)  # let start-up work settle
                    c0, t0 = _cpu_seconds(agent.proc.pid), time.monotonic()
                    rate, n = _churn(topo, churn, secs)
                    c1, t1 = _cpu_seconds(agent.proc.pid), time.monotonic()
                attached.append(rate)
                cpu_pct.append(100 * (c1 - c0) / (t1 - t0))
                cpu_us.append(1e6 * (c1 - c0) / max(1, n))
            # The programs' run time needs the kernel's statistics (--bpf-stats, ~85 ns
            # per run): one more run of its own, so the trials above stay without them.
            with AgentProc(topo, topo.a, rx, "--signals", "tcp", "--bpf-stats"):
                time.sleep(1.0)
                k0 = _total(rx, "ebpf_otlp.program.run_time", signal="tcp")
                _, n = _churn(topo, churn, secs)
            # run time of the TCP programs from just before the churn to the agent's
            # exit (includes other traffic on the host, so an upper bound)
            k1 = _total(rx, "ebpf_otlp.program.run_time", signal="tcp")
            bpf_ns.append(1e9 * (k1 - k0) / max(1, n))
            best = max(base + attached)
            target = TARGET_RATE if best >= TARGET_RATE else int(0.9 * best)
            sustained = _sustained(topo, churn, rx, AgentProc, target, long_secs, spy)
        finally:
            server.kill()
            server.wait()
    b, a = median(base), median(attached)
    res.add(Figure.compare("connections/s with agent", a, "conn/s", b, "without agent",
                           target=TARGET_RATIO,
                           note="short connections over veth between two namespaces, "
                                f"C generator, {CONCURRENCY} in flight"))
    res.add(Figure("agent CPU while attached", median(cpu_pct), "% of one CPU"))
    us = median(cpu_us)
    res.add(Figure.compare("agent CPU per connection", us, "us/conn", TARGET_US, "target",
                           target=1.0, higher_is_better=False,
                           note="both ends of each connection are observed; all agent threads"))
    res.add(Figure("kernel time in the TCP programs per connection", median(bpf_ns), "ns/conn",
                   note="BPF run time (both ends, all tracepoints and sock_ops), upper bound; "
                        "from one more run with --bpf-stats (the statistics' own ~85 ns per "
                        "program run included), not the trials above"))
    s = sustained
    res.add(Figure.compare(f"sustained {s['seconds']:g} s: connections/s", s["rate"], "conn/s",
                           s["target"], "rate asked", target=0.95,
                           note=f"{s['connections']} connections"))
    res.add(Figure("sustained: records lost", s["lost"], "records",
                   note=f"ring losses {s['ring_lost']:g}; connection.duration values "
                        f"{s['durations']} for {2 * s['connections']} closed sockets; kernel "
                        f"skipped {s['program_misses']:g} runs of the TCP programs (recursion "
                        "misses: another BPF program was running on that CPU)"))
    res.add(Figure("sustained: agent CPU", s["cpu_pct"], "% of one core",
                   note=f"{s['us_per_conn']:.1f} us/conn"))
    res.add(Figure("sustained: agent CPU per connection above idle", s["marginal_us"],
                   "us/conn", note=f"idle agent {s['idle_pct']:.1f} % of one core (exports "
                                   "every second, timers, other sessions' TCP)"))
    at_target = s["idle_pct"] + s["marginal_us"] * TARGET_RATE / 1e4
    res.add(Figure.compare(f"agent CPU at {TARGET_RATE:,} conn/s"
                           + (" (extrapolated)" if s["target"] < TARGET_RATE else ""),
                           at_target if s["target"] < TARGET_RATE else s["cpu_pct"],
                           "% of one core", 50.0, "half a core", target=1.0,
                           higher_is_better=False,
                           note="idle + per-connection cost above idle x 20,000/s"
                           if s["target"] < TARGET_RATE else "measured"))
    res.raw.update(base=base, attached=attached, cpu_pct=cpu_pct, cpu_us=cpu_us, bpf_ns=bpf_ns,
                   sustained=s)
    res.note(f"{trials} alternating trials of {secs:g} s; medians. The generator, its server, "
             "the kernel's TCP work and the agent share the machine's 2 vCPUs (and other "
             "sessions' load): the highest rate is the generator's, not the agent's")
    if s.get("profile"):
        res.note("agent profile during the sustained run (py-spy, share of samples): "
                 + "; ".join(s["profile"]))
    return res


def _sustained(topo, churn: Path, rx, agent_cls, target: int, seconds: float,
               spy: str) -> dict:
    """One long run at ``target`` conn/s; every close must reach the receiver."""
    port_attrs = {"server.port": PORT}
    with agent_cls(topo, topo.a, rx, "--signals", "tcp") as agent:
        time.sleep(1.0)
        d0 = sum(p["count"] for p in rx.metrics("network.tcp.connection.duration",
                                                 **port_attrs))
        lost0 = _total(rx, "ebpf_otlp.events.lost", signal="tcp")
        miss0 = _total(rx, "ebpf_otlp.program.misses", signal="tcp")
        prof = WORK / "tcp_churn.pyspy"
        profiler = None
        i0, it0 = _cpu_seconds(agent.proc.pid), time.monotonic()
        time.sleep(min(10.0, seconds / 4))  # idle: exports, timers, the host's other TCP
        c0, t0 = _cpu_seconds(agent.proc.pid), time.monotonic()
        idle_pct = 100 * (c0 - i0) / (t0 - it0)
        if os.access(spy, os.X_OK):
            profiler = subprocess.Popen(
                [spy, "record", "--nonblocking", "-r", "20", "-f", "raw", "-o", str(prof),
                 "-p", str(agent.proc.pid), "-d", str(int(seconds))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rate, n = _churn(topo, churn, seconds, target)
        c1, t1 = _cpu_seconds(agent.proc.pid), time.monotonic()
        if profiler is not None:
            profiler.wait(60)

        def durations() -> int:
            return sum(p["count"] for p in rx.metrics("network.tcp.connection.duration",
                                                       **port_attrs)) - d0
        deadline = time.monotonic() + 30
        while durations() < 2 * n and time.monotonic() < deadline:
            time.sleep(0.5)
        ring_lost = _total(rx, "ebpf_otlp.events.lost", signal="tcp") - lost0
        # tracepoint runs the kernel skipped while another BPF program ran on the CPU
        # (other tools' programs on syscalls, say): those events never exist
        misses = _total(rx, "ebpf_otlp.program.misses", signal="tcp") - miss0
        got = durations()
    return {"target": target, "seconds": seconds, "rate": rate, "connections": n,
            "durations": got, "ring_lost": ring_lost, "program_misses": misses,
            "lost": max(0, 2 * n - got) + ring_lost,
            "cpu_pct": 100 * (c1 - c0) / (t1 - t0), "us_per_conn": 1e6 * (c1 - c0) / max(1, n),
            "idle_pct": idle_pct,
            "marginal_us": max(0.0, 1e6 * ((c1 - c0) - idle_pct / 100 * (t1 - t0))) / max(1, n),
            "profile": _profile_top(prof) if profiler is not None and prof.exists() else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    r = run(args.quick)
    for f in r.figures:
        print(f"{f.name}: {f.value:.1f} {f.unit}"
              + (f" (baseline {f.baseline:.1f}, ratio {f.ratio:.3f})" if f.ratio else ""))
    for n in r.notes:
        print(n)


if __name__ == "__main__":
    main()
