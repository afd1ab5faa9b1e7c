"""Datapath throughput with and without the agent, iperf3 over veth.

Each round measures three states, in an order that rotates every round (so
drifting background load hits all alike):

- ``off``: no agent;
- ``on``: the agent with every signal on veth-a (TC flows + DNS on both
  directions, TCP tracepoints + sock_ops, drops on skb:kfree_skb), exporting
  each second to a local receiver;
- ``kernel``: the same agent stopped with SIGSTOP for the measurement: its BPF
  programs stay attached and run on every packet, its process does not run.
  on/off is the figure (target >= 0.95); kernel/off splits that cost into the
  kernel programs' part and the process's part, measured in the same run.

CPU placement, the same in every state: the iperf3 client and server AND the
agent (every thread) run on CPU 0, so the agent's whole cost, its kernel
programs on every packet and its process, comes out of the CPU that moves the
data; the OTLP receiver and the rest of the machine run on CPU 1. On this
2-vCPU VM a client and server on different CPUs flip between two TCP rates
(~6 and ~13 Gbit/s, second to second), which no number of rounds averages
out; on one CPU consecutive runs agree within a few per cent.

Socket buffers are 4 MiB (``-w 4M``) on both sides. For UDP (``-b 0``,
1400-byte datagrams) that is what keeps the receiver ahead of the sender: with
the default buffers iperf3's server dropped 55-80 % of the datagrams in its
receive buffer, so the figure measured the receiver's drops rather than the
datapath. The rate used is the receiver's (sent x (1 - lost)) in every state,
and the loss is reported.

BPF run-time statistics are off in every measured run (checked: the sysctl is
read before and after each); one more TCP and UDP run with them on gives each
program's runs and time per GB moved.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time
from pathlib import Path

from .common import Figure, Result, command_for, median
from .lab import (
    Receiver,
    Topology,
    iperf_json,
    new_programs,
    per_program,
    prog_ids,
    start_agent_best_effort,
)

AGENT_PROGRAMS = ("packet_", "flows_", "dns_", "tcp_", "on_kfree")
# Rotating orders: the agent started for "on" also serves "kernel" (stopped),
# so each round starts it once; on and kernel swap places and the off run moves
# from before to after them.
ORDERS = (("off", "on", "kernel"), ("kernel", "on", "off"), ("off", "kernel", "on"),
          ("on", "kernel", "off"))
DATA_CPU = 0  # iperf3 client, server and the agent
OTHER_CPU = 1  # the OTLP receiver
SOCKET_BUFFER = "4M"
# After "running" (or SIGCONT) the agent's first exports settle before a run.
SETTLE_S = 2.0
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

NAME = "datapath"
TITLE = "Datapath throughput, agent attached vs not (iperf3 over veth)"


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    seconds = 1 if quick else 4
    rounds = 1 if quick else 8
    runs: list[dict] = []
    load0 = os.getloadavg()[0]
    two_cpus = (os.cpu_count() or 1) >= 2
    with Topology() as topo:
        srv = _server(topo)
        try:
            with Receiver(topo, topo.a) as rx:
                if two_cpus:
                    _pin(rx.proc.pid, OTHER_CPU)
                for rnd in range(rounds):
                    runs += _round(topo, rx, ORDERS[rnd % len(ORDERS)], seconds, res, rnd)
                stats = _bpf_time(topo, rx, seconds, res)
        finally:
            srv.terminate()
            srv.wait()
    _figures(res, runs, seconds)
    _stats_figures(res, stats)
    res.note(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
             f"{os.cpu_count()} CPUs")
    rss = [r["agent_rss_mb"] for r in runs if r["state"] == "on"]
    if rss:
        res.add(Figure("agent RSS after the runs", max(rss), "MB"))
    res.note(f"iperf3 -c 10.201.0.2 -t {seconds} -O 1 -w {SOCKET_BUFFER} -A {DATA_CPU} -J (TCP) "
             "and the same with -u -b 0 -l 1400 (UDP), from namespace a to b, the server "
             f"started with taskset -c {DATA_CPU}; the agent's threads pinned to CPU "
             f"{DATA_CPU} too, the OTLP receiver to CPU {OTHER_CPU}. Agent: python -m "
             "ebpf_otlp run --iface veth-a --signals flows,tcp,dns,drops --interval 1 "
             "--endpoint (local ebpf-otlp receive).")
    res.note("The tcp and drops signals are host-wide (tracepoints, root cgroup): other "
             "sessions' traffic adds to the agent's CPU and RSS here.")
    bad = [r for r in runs if r.get("bpf_stats_on")]
    res.note(f"{rounds} rounds, each an agent-off, an agent-on and an agent-stopped (kernel "
             "programs only) TCP+UDP pair in rotating order; BPF run-time statistics "
             + ("off in every measured run (sysctl read before and after each)" if not bad
                else f"ON during {len(bad)} measured runs (another process enabled them)")
             + ", on only in the separate statistics run.")
    if not two_cpus:
        res.note("one CPU only: nothing pinned")
    return res


def _pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu`` (threads started later inherit it)."""
    if (os.cpu_count() or 1) < 2:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except (ProcessLookupError, PermissionError):
            pass


def _server(topo: Topology) -> subprocess.Popen:
    pin = ["taskset", "-c", str(DATA_CPU)] if (os.cpu_count() or 1) >= 2 else []
    proc = topo.popen(topo.b, *pin, "iperf3", "-s", stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc


def _stats_on() -> bool:
    try:
        return STATS_SYSCTL.read_text().strip() != "0"
    except OSError:
        return False


def iperf(topo: Topology, seconds: float, udp: bool, omit: int = 1) -> dict:
    """One pinned iperf3 run from a to b; the rate is the receiver's. ``omit``: seconds
    at the start left out of the figures (slow start, first export after a restart)."""
    cmd = ["iperf3", "-c", topo.b_ip4, "-t", str(seconds), "-O", str(omit), "-w",
           SOCKET_BUFFER, "-J"]
    if (os.cpu_count() or 1) >= 2:
        cmd += ["-A", str(DATA_CPU)]
    if udp:
        cmd += ["-u", "-b", "0", "-l", "1400"]
    stats_before = _stats_on()
    end = iperf_json(topo, topo.a, cmd, seconds)["end"]
    out: dict = {"bpf_stats_on": stats_before or _stats_on()}
    if udp:
        s = end["sum"]  # the sender's figures, with the receiver's loss report
        lost = float(s.get("lost_percent", 0.0))
        rcv = end.get("sum_received")
        if rcv and rcv.get("bytes"):
            got_bytes, got_bps = float(rcv["bytes"]), float(rcv["bits_per_second"])
        else:
            got_bytes = float(s["bytes"]) * (1 - lost / 100)
            got_bps = float(s["bits_per_second"]) * (1 - lost / 100)
        out.update(bytes=got_bytes, bps=got_bps, sent_bps=float(s["bits_per_second"]),
                   lost_percent=lost, seconds=float(s["seconds"]))
    else:
        s = end["sum_received"]
        out.update(bytes=float(s["bytes"]), bps=float(s["bits_per_second"]),
                   seconds=float(s["seconds"]),
                   retransmits=end.get("sum_sent", {}).get("retransmits"))
    return out


def _pair(runs: list[dict], state: str, proto: str) -> list[float]:
    """Per round: the state's rate over the off rate of the same round."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        by = {r["state"]: r[proto]["bps"] for r in runs if r["round"] == rnd}
        if by.get("off") and state in by:
            out.append(by[state] / by["off"])
    return out


def _spread(xs: list[float]) -> str:
    """Range, quartiles and a 90 % bootstrap interval of the median of ``xs``."""
    if not xs:
        return "-"
    s = sorted(xs)
    q1, q3 = (statistics.quantiles(s, n=4)[0], statistics.quantiles(s, n=4)[2]) if len(
        s) > 1 else (s[0], s[0])
    rng = random.Random(13)  # fixed: the same runs give the same interval
    meds = sorted(median(rng.choices(s, k=len(s))) for _ in range(2000))
    return (f"min {s[0]:.3f}, quartiles {q1:.3f}-{q3:.3f}, max {s[-1]:.3f}; median's 90 % "
            f"bootstrap interval {meds[100]:.3f}-{meds[1899]:.3f}")


def _figures(res: Result, runs: list[dict], seconds: float) -> None:
    res.raw["runs"] = runs
    for proto in ("tcp", "udp"):
        off = [r[proto]["bps"] for r in runs if r["state"] == "off"]
        res.raw[f"{proto}_off_spread"] = _spread([x / median(off) for x in off])
        for state, what, target in (("on", "with the agent (all signals)", 0.95),
                                    ("kernel", "with the agent's kernel programs only "
                                     "(agent process stopped)", None)):
            on = [r[proto]["bps"] for r in runs if r["state"] == state]
            paired = _pair(runs, state, proto)
            # The ratio within a round is the least exposed to the machine's
            # drifting load, so its median is the figure; the medians of the
            # absolute rates are shown beside it.
            fig = res.add(Figure.compare(
                f"{proto.upper()} throughput {what}", median(on) / 1e9, "Gbit/s",
                median(off) / 1e9, "no agent", target=target,
                note=f"ratio = median of {len(paired)} per-round ratios "
                     f"({', '.join(f'{x:.3f}' for x in paired)}; {_spread(paired)}); "
                     f"{seconds} s per run after 1 s omitted"))
            fig.ratio = median(paired)
            if target is not None:
                fig.met = fig.ratio >= target
        if proto == "udp":
            lost = [r["udp"]["lost_percent"] for r in runs]
            res.add(Figure("UDP datagrams lost at the receiver (worst run)", max(lost), "%",
                           note="the rate above is the receiver's in every state"))
        cpu = [r[proto]["agent_cpu_s"] for r in runs if r["state"] == "on"]
        gb = [r[proto]["bytes"] / 1e9 for r in runs if r["state"] == "on"]
        if sum(gb):
            res.add(Figure(f"agent CPU per GB moved ({proto.upper()})", sum(cpu) / sum(gb),
                           "CPU s/GB", note=f"{sum(cpu):.2f} CPU s over {sum(gb):.1f} GB"))
        secs = sum(r[proto]["seconds"] for r in runs if r["state"] == "on")
        if secs:
            res.add(Figure(f"agent CPU while iperf3 runs ({proto.upper()})",
                           sum(cpu) / secs * 100, "% of one CPU"))


def _start(topo: Topology, rx: Receiver, res: Result):
    before = prog_ids()
    agent, why = start_agent_best_effort(topo, topo.a, rx, topo.a_if)
    _pin(agent.proc.pid, DATA_CPU)
    ids = new_programs(before, AGENT_PROGRAMS)
    time.sleep(SETTLE_S)
    if why and why not in res.notes:
        res.note(why)
    return agent, ids


def _measure(topo: Topology, state: str, seconds: float, rnd: int, agent=None) -> dict:
    out: dict = {"state": state, "round": rnd, "agent": agent is not None}
    for proto in ("tcp", "udp"):
        cpu0 = agent.cpu_s() if agent else 0.0
        r = iperf(topo, seconds, udp=proto == "udp")
        if agent:
            r["agent_cpu_s"] = agent.cpu_s() - cpu0
        out[proto] = r
    out["bpf_stats_on"] = out["tcp"]["bpf_stats_on"] or out["udp"]["bpf_stats_on"]
    return out


def _round(topo: Topology, rx: Receiver, order: tuple[str, ...], seconds: float,
           res: Result, rnd: int) -> list[dict]:
    out = []
    agent = None
    try:
        for state in order:
            if state == "off":
                if agent:
                    agent.__exit__()
                    agent = None
                out.append(_measure(topo, state, seconds, rnd))
                continue
            if agent is None:
                agent, ids = _start(topo, rx, res)
            if state == "kernel":
                os.kill(agent.proc.pid, signal.SIGSTOP)
                try:
                    out.append(_measure(topo, state, seconds, rnd))
                finally:
                    os.kill(agent.proc.pid, signal.SIGCONT)
                time.sleep(SETTLE_S)  # the missed interval's export is not charged to "on"
            else:
                r = _measure(topo, state, seconds, rnd, agent)
                r["signals"], r["programs"] = agent.signals, sorted(ids)
                r["agent_rss_mb"] = agent.rss_bytes() / 1e6
                out.append(r)
            if not agent.alive():
                raise RuntimeError(f"agent died during the run:\n{agent.log()[-2000:]}")
    finally:
        if agent:
            agent.__exit__()
    return out


def _bpf_time(topo: Topology, rx: Receiver, seconds: float, res: Result) -> dict:
    """Per program: (run_time_ns, runs) during one TCP and one UDP run, stats on."""
    from ebpf_otlp.platform.libbpf import enable_run_time_stats

    agent, ids = _start(topo, rx, res)
    out: dict = {}
    try:
        fd = enable_run_time_stats()  # host-wide while held: only for these two runs
        if fd < 0:
            res.note("kernel BPF run-time statistics unavailable: no per-program figures")
            return out
        try:
            for proto in ("tcp", "udp"):
                p0 = per_program(ids)
                # nothing omitted: the programs' runs and the bytes cover the same time
                r = iperf(topo, seconds, udp=proto == "udp", omit=0)
                p1 = per_program(ids)
                if r.get("lost_percent"):
                    res.note(f"statistics run, {proto.upper()}: {r['lost_percent']:.1f} % of "
                             "the datagrams lost at the receiver")
                out[proto] = {"bytes": r["bytes"], "bps": r["bps"], "programs": {
                    k: (p1[k][0] - p0.get(k, (0, 0))[0], p1[k][1] - p0.get(k, (0, 0))[1])
                    for k in p1}}
        finally:
            os.close(fd)
    finally:
        agent.__exit__()
    return out


def _stats_figures(res: Result, stats: dict) -> None:
    res.raw["bpf_stats"] = stats
    for proto, st in stats.items():
        gb = st["bytes"] / 1e9
        if not gb:
            continue
        total = 0
        for prog, (ns, cnt) in sorted(st["programs"].items(), key=lambda kv: -kv[1][0]):
            total += ns
            if not cnt:
                continue
            res.add(Figure(f"kernel time of {prog} per GB moved ({proto.upper()})",
                           ns / 1e9 / gb * 1e3, "ms/GB",
                           note=f"{cnt / gb:,.0f} runs/GB, {ns / cnt:.0f} ns/run with the "
                                "statistics' own cost (~85 ns/run, pktcost) included"))
        share = total / 1e9 / gb * st["bps"] / 8e9 * 100
        res.add(Figure(f"kernel time of all agent programs per GB moved ({proto.upper()})",
                       total / 1e9 / gb * 1e3, "ms/GB",
                       note=f"at {st['bps'] / 1e9:.1f} Gbit/s: {share:.1f} % of one CPU, "
                            "statistics on"))
