"""Alternatives on the same host and the same traffic: bpftrace.

A bpftrace script equivalent to our TCP lifecycle signal's kernel side
(``sock:inet_sock_set_state``: birth time at SYN_SENT/SYN_RECV, handshake
histogram at ESTABLISHED, one printed line with the duration at CLOSE, like
tcplife) runs against short-connection churn between two namespaces, beside
ebpf-otlp with ``--signals tcp`` and beside nothing, in rotating order.
Figures: connections/s ratio to no tool, the tool's user-space CPU, and the
kernel time of the tool's BPF programs per connection (kernel BPF run-time
statistics, per program owner pid from ``bpftool prog show``).

Peers that cannot run on this machine are listed in the notes with why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import psutil

from .common import PY, WORK, Figure, Result, command_for, env, median
from .lab import Agent, Receiver, Topology, new_programs, prog_ids, prog_stats

# The same churn client and server as the tcp_churn benchmark, so the figures compare.
from .tcp_churn import CLIENT, PORT, SERVER

NAME = "alternatives"
TITLE = "Alternatives: bpftrace vs ebpf-otlp on TCP connection churn"

BPFTRACE_SCRIPT = r"""
tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate == 2 || args->newstate == 3) { @birth[$sk] = nsecs; }
  if (args->newstate == 1 && @birth[$sk]) {
    @handshake_us = hist((nsecs - @birth[$sk]) / 1000);
  }
  if (args->newstate == 7 && @birth[$sk]) {
    printf("%s:%d -> %s:%d %d us\n", ntop(args->saddr), args->sport,
           ntop(args->daddr), args->dport, (nsecs - @birth[$sk]) / 1000);
    delete(@birth[$sk]);
  }
}
"""

PEERS = [
    "bcc (libbpf-tools / python tools such as tcplife): the Python tools compile C at run time "
    "and need kernel headers, which this kernel does not ship (no linux-headers-6.18 package, "
    "no CONFIG_IKHEADERS); most tools also prefer kprobes, and CONFIG_KPROBES is not set.",
    "Grafana Beyla: its network and HTTP probes use kprobes/fentry (CONFIG_KPROBES unset, "
    "fentry/tp_btf refused with EPERM here), and it is not packaged for Debian.",
    "Cilium Hubble, Pixie, Kepler-style agents: need Kubernetes (and kprobes for Pixie); "
    "no cluster here.",
    "Netobserv eBPF agent: TC-based like our flows, but built for Kubernetes and shipped as a "
    "container image only; not packaged for Debian.",
]



def _churn(topo: Topology, secs: float) -> tuple[int, float]:
    out = topo.run(topo.a, PY, "-c", CLIENT, topo.b_ip4, str(PORT), str(secs),
                   timeout=secs + 60)
    r = json.loads(out.stdout)
    return r["n"], r["secs"]


class Bpftrace:
    def __init__(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.script = WORK / "tcplife.bt"
        self.script.write_text(BPFTRACE_SCRIPT)
        self.out = WORK / "bpftrace.out"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Bpftrace:
        self._f = open(self.out, "w")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(["bpftrace", str(self.script)], stdout=self._f,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "Attaching" in self.out.read_text():
                time.sleep(0.5)  # attach completes after the banner
                self.ps = psutil.Process(self.proc.pid)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"bpftrace did not start: {self.out.read_text()[-1000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def lines(self) -> int:
        return sum(1 for ln in self.out.read_text().splitlines() if " -> " in ln)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: bpftrace prints its maps and exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._f.close()


def run(quick: bool = False) -> Result:
    from ebpf_otlp.platform.libbpf import lib

    res = Result(NAME, TITLE, command_for(NAME, quick))
    for p in PEERS:
        res.note("Not run: " + p)
    if not shutil.which("bpftrace"):
        res.status = "partial"
        res.note("bpftrace not installed (apt-get install bpftrace): comparison skipped")
        return res
    secs = 1.5 if quick else 5.0
    rounds = 1 if quick else 3
    trials: list[dict] = []
    stats_fd = lib.bpf_enable_stats(0)  # so bpftool reports run_time_ns for every program
    try:
        with Topology() as topo, Receiver(topo, topo.a) as rx:
            topo.run(topo.a, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                     "net.ipv4.ip_local_port_range=10000 65000")
            server = topo.popen(topo.b, PY, "-c", SERVER, str(PORT), stdout=subprocess.PIPE,
                                text=True, env=env())
            try:
                if server.stdout.readline().strip() != "ready":
                    raise RuntimeError("churn server did not start")
                _churn(topo, 1.0)  # warm-up
                modes = ["none", "bpftrace", "ebpf-otlp"]
                for rnd in range(rounds):
                    for mode in modes[rnd % 3:] + modes[:rnd % 3]:
                        trials.append(_trial(topo, rx, mode, secs))
            finally:
                server.kill()
                server.wait()
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
    res.raw["trials"] = trials
    rate = {m: median([t["rate"] for t in trials if t["mode"] == m])
            for m in ("none", "bpftrace", "ebpf-otlp")}
    for m, label in (("bpftrace", "bpftrace tcplife-like script"),
                     ("ebpf-otlp", "ebpf-otlp --signals tcp")):
        ts = [t for t in trials if t["mode"] == m]
        res.add(Figure.compare(f"connections/s with {label}", rate[m], "conn/s", rate["none"],
                               "no tool, same run", target=0.95,
                               note=f"{len(ts)} trials of {secs:g} s, medians"))
    for m, label in (("bpftrace", "bpftrace"), ("ebpf-otlp", "ebpf-otlp")):
        ts = [t for t in trials if t["mode"] == m]
        conns = sum(t["n"] for t in ts)
        cpu = sum(t["tool_cpu_s"] for t in ts)
        kns = sum(t["kernel_ns"] for t in ts)
        runs = sum(t["kernel_runs"] for t in ts)
        res.add(Figure(f"{label}: user-space CPU per connection", 1e6 * cpu / max(1, conns),
                       "us/conn", note=f"{cpu:.2f} CPU s over {conns} connections"))
        res.add(Figure(f"{label}: kernel BPF time per connection", kns / max(1, conns),
                       "ns/conn", note=f"{runs} program runs over {conns} connections, "
                                       f"{ts[0]['programs'] if ts else 0} programs "
                                       "(BPF run-time stats)"))
    res.note("Both tools see every TCP state change on the host (tracepoints are global), "
             "including other sessions' traffic; the churn dominates during the trials.")
    res.note("ebpf-otlp's TCP signal attaches more hooks than the bpftrace script (retransmit "
             "and reset tracepoints, accept, sock_ops for RTT), and exports OTLP each second.")
    return res


def _trial(topo: Topology, rx: Receiver, mode: str, secs: float) -> dict:
    tool = None
    before = prog_ids()
    if mode == "bpftrace":
        tool = Bpftrace().__enter__()
    elif mode == "ebpf-otlp":
        tool = Agent(topo, topo.a, "--signals", "tcp", "--endpoint", rx.endpoint,
                     "--interval", "1", log_name="agent-tcp.log").__enter__()
    try:
        if tool:
            time.sleep(1.0)  # start-up work settles
            cpu0 = tool.cpu_s()
            ids = new_programs(before, ("inet_sock_set",) if mode == "bpftrace" else ("tcp_",))
            k0 = prog_stats(ids)
        n, el = _churn(topo, secs)
        out = {"mode": mode, "n": n, "secs": el, "rate": n / el}
        if tool:
            k1 = prog_stats(ids)
            out.update(tool_cpu_s=tool.cpu_s() - cpu0, kernel_ns=k1[0] - k0[0],
                       kernel_runs=k1[1] - k0[1], programs=k1[2])
        return out
    finally:
        if tool:
            tool.__exit__()
