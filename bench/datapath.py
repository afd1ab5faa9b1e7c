"""Datapath throughput with and without the agent, iperf3 over veth.

Each round runs three states back to back, in an order that rotates every
round (so drifting background load hits all alike):

- ``off``: no agent;
- ``on``: the agent with every signal on veth-a (TC flows + DNS on both
  directions, TCP tracepoints + sock_ops, drops on skb:kfree_skb), exporting
  each second to a local receiver;
- ``kernel``: the same agent, started and settled, then stopped with SIGSTOP
  for the measurement: its BPF programs stay attached and run on every
  packet, its Python process does not run. on/off is the figure (target
  >= 0.95); kernel/off splits that cost into the kernel programs' part and
  the user-space part, measured in the same run.

Figures: the median of the per-round ratios, the agent's own CPU seconds per
GB moved (its process only; the kernel programs' time is charged to the
senders and softirqs), and, from one more TCP and UDP run with the kernel's
BPF run-time statistics on (only for that run), each program's runs and
time per GB moved.
"""

from __future__ import annotations

import os
import signal
import time

from .common import Figure, Result, command_for, median
from .lab import (
    Receiver,
    Topology,
    iperf,
    iperf_server,
    new_programs,
    per_program,
    prog_ids,
    start_agent_best_effort,
)

AGENT_PROGRAMS = ("packet_", "flows_", "dns_", "tcp_", "on_kfree")
STATES = ("off", "on", "kernel")
# After "running", the agent's first exports (imports on first use, the first
# HTTP connection) settle before a measurement starts.
SETTLE_S = 2.0

NAME = "datapath"
TITLE = "Datapath throughput, agent attached vs not (iperf3 over veth)"


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    seconds = 1 if quick else 4
    rounds = 1 if quick else 7
    runs: list[dict] = []
    load0 = os.getloadavg()[0]
    with Topology() as topo:
        srv = iperf_server(topo, topo.b)
        try:
            with Receiver(topo, topo.a) as rx:
                for rnd in range(rounds):
                    order = STATES[rnd % 3:] + STATES[:rnd % 3]
                    for state in order:
                        runs.append(_one(topo, rx, state, seconds, res))
                stats = _bpf_time(topo, rx, seconds, res)
        finally:
            srv.terminate()
            srv.wait()
    _figures(res, runs, seconds)
    _stats_figures(res, stats)
    res.note(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
             f"{os.cpu_count()} CPUs shared with other sessions: per-round ratios spread with "
             "it")
    rss = [r["agent_rss_mb"] for r in runs if r["state"] == "on"]
    if rss:
        res.add(Figure("agent RSS after the runs", max(rss), "MB"))
    res.note("iperf3 -c 10.201.0.2 -t N -J (TCP) and -u -b 0 -l 1400 (UDP, received rate) from "
             "namespace a to b; agent: python -m ebpf_otlp run --iface veth-a --signals "
             "flows,tcp,dns,drops --interval 1 --endpoint (local ebpf-otlp receive).")
    res.note("The tcp and drops signals are host-wide (tracepoints, root cgroup): on this "
             "shared machine other sessions' traffic adds to the agent's CPU and RSS here.")
    res.note(f"{rounds} rounds, each an agent-off, an agent-on and an agent-stopped (kernel "
             "programs only) run in rotating order; BPF run-time statistics off (the agent's "
             "default) except in the one run that measures them.")
    return res


def _pair(runs: list[dict], state: str, proto: str) -> list[float]:
    """Per round: the state's rate over the off rate of the same round."""
    out = []
    for i in range(0, len(runs) - len(STATES) + 1, len(STATES)):
        rnd = {r["state"]: r[proto]["bps"] for r in runs[i:i + len(STATES)]}
        if rnd.get("off") and state in rnd:
            out.append(rnd[state] / rnd["off"])
    return out


def _figures(res: Result, runs: list[dict], seconds: float) -> None:
    res.raw["runs"] = runs
    for proto in ("tcp", "udp"):
        off = [r[proto]["bps"] for r in runs if r["state"] == "off"]
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
                     f"({', '.join(f'{x:.2f}' for x in paired)}); {seconds} s per run"))
            fig.ratio = median(paired)
            if target is not None:
                fig.met = fig.ratio >= target
        cpu = [r[proto]["agent_cpu_s"] for r in runs if r["state"] == "on"]
        gb = [r[proto]["bytes"] / 1e9 for r in runs if r["state"] == "on"]
        if sum(gb):
            res.add(Figure(f"agent CPU per GB moved ({proto.upper()})", sum(cpu) / sum(gb),
                           "CPU s/GB", note=f"{sum(cpu):.2f} CPU s over {sum(gb):.1f} GB"))


def _start(topo: Topology, rx: Receiver, res: Result):
    before = prog_ids()
    agent, why = start_agent_best_effort(topo, topo.a, rx, topo.a_if)
    ids = new_programs(before, AGENT_PROGRAMS)
    time.sleep(SETTLE_S)
    if why and why not in res.notes:
        res.note(why)
    return agent, ids


def _one(topo: Topology, rx: Receiver, state: str, seconds: float, res: Result) -> dict:
    out: dict = {"state": state, "agent": state != "off"}
    agent = None
    if state != "off":
        agent, ids = _start(topo, rx, res)
        out["signals"] = agent.signals
        out["programs"] = sorted(ids)
        if state == "kernel":
            os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        for proto in ("tcp", "udp"):
            cpu0 = agent.cpu_s() if agent else 0.0
            r = iperf(topo, topo.a, topo.b_ip4, seconds, udp=proto == "udp")
            if agent:
                r["agent_cpu_s"] = agent.cpu_s() - cpu0
            out[proto] = r
        if agent:
            out["agent_rss_mb"] = agent.rss_bytes() / 1e6
            if not agent.alive():
                raise RuntimeError(f"agent died during the run:\n{agent.log()[-2000:]}")
    finally:
        if agent:
            if state == "kernel":
                os.kill(agent.proc.pid, signal.SIGCONT)
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
                r = iperf(topo, topo.a, topo.b_ip4, seconds, udp=proto == "udp")
                p1 = per_program(ids)
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
