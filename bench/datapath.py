"""Datapath throughput with and without the agent, iperf3 over veth.

Runs alternate agent off / agent on (the order flips every round, so drifting
background load hits both alike). The agent runs with every signal on veth-a
(TC flows + DNS on both directions, TCP tracepoints + sock_ops, drops on
skb:kfree_skb) and exports each second to a local receiver. Figures: the
throughput ratio on/off (target >= 0.95) and the agent's own CPU seconds per
GB moved (its process only; the kernel programs' time is charged to the
senders and softirqs, see the pktcost benchmark for that).
"""

from __future__ import annotations

import os
import time

from .common import Figure, Result, command_for, median
from .lab import (
    Receiver,
    Topology,
    iperf,
    iperf_server,
    new_programs,
    prog_ids,
    start_agent_best_effort,
)

AGENT_PROGRAMS = ("packet_", "flows_", "dns_", "tcp_", "on_kfree")

NAME = "datapath"
TITLE = "Datapath throughput, agent attached vs not (iperf3 over veth)"


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    seconds = 1 if quick else 4
    rounds = 1 if quick else 6
    runs: list[dict] = []
    # No BPF run-time statistics here: they add ~85 ns to every program run on
    # the host (pktcost) and the agent enables them only with --bpf-stats. The
    # kernel cost per packet of each program is the pktcost benchmark's.
    load0 = os.getloadavg()[0]
    _rounds(res, runs, rounds, seconds)
    _figures(res, runs, seconds)
    res.note(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
             f"{os.cpu_count()} CPUs shared with other sessions: per-round ratios spread with "
             "it")
    rss = [r["agent_rss_mb"] for r in runs if r["agent"]]
    if rss:
        res.add(Figure("agent RSS after the runs", max(rss), "MB"))
    res.note("iperf3 -c 10.201.0.2 -t N -J (TCP) and -u -b 0 -l 1400 (UDP, received rate) from "
             "namespace a to b; agent: python -m ebpf_otlp run --iface veth-a --signals "
             "flows,tcp,dns,drops --interval 1 --endpoint (local ebpf-otlp receive).")
    res.note("The tcp and drops signals are host-wide (tracepoints, root cgroup): on this "
             "shared machine other sessions' traffic adds to the agent's CPU and RSS here.")
    res.note(f"{rounds} rounds, each an agent-off and an agent-on run in alternating order; "
             "BPF run-time statistics off (the agent's default).")
    return res


def _rounds(res: Result, runs: list[dict], rounds: int, seconds: float) -> None:
    with Topology() as topo:
        srv = iperf_server(topo, topo.b)
        try:
            with Receiver(topo, topo.a) as rx:
                for rnd in range(rounds):
                    order = (False, True) if rnd % 2 == 0 else (True, False)
                    for on in order:
                        runs.append(_one(topo, rx, on, seconds, res))
        finally:
            srv.terminate()
            srv.wait()


def _figures(res: Result, runs: list[dict], seconds: float) -> None:
    res.raw["runs"] = runs
    for proto in ("tcp", "udp"):
        off = [r[proto]["bps"] for r in runs if not r["agent"]]
        on = [r[proto]["bps"] for r in runs if r["agent"]]
        # Each round ran both states back to back: the ratio within a round is
        # the least exposed to the machine's drifting load, so its median is
        # the figure; the medians of the absolute rates are shown beside it.
        paired = [b[proto]["bps"] / a[proto]["bps"] if a["agent"] is False else
                  a[proto]["bps"] / b[proto]["bps"] for a, b in zip(runs[::2], runs[1::2])]
        fig = res.add(Figure.compare(
            f"{proto.upper()} throughput with the agent (all signals)", median(on) / 1e9,
            "Gbit/s", median(off) / 1e9, "no agent", target=0.95,
            note=f"ratio = median of {len(paired)} per-round ratios "
                 f"({', '.join(f'{x:.2f}' for x in paired)}); {seconds} s per run"))
        fig.ratio = median(paired)
        fig.met = fig.ratio >= 0.95
        cpu = [r[proto]["agent_cpu_s"] for r in runs if r["agent"]]
        gb = [r[proto]["bytes"] / 1e9 for r in runs if r["agent"]]
        if sum(gb):
            res.add(Figure(f"agent CPU per GB moved ({proto.upper()})", sum(cpu) / sum(gb),
                           "CPU s/GB", note=f"{sum(cpu):.2f} CPU s over {sum(gb):.1f} GB"))


def _one(topo: Topology, rx: Receiver, on: bool, seconds: float, res: Result) -> dict:
    out: dict = {"agent": on}
    agent = None
    ids: set[int] = set()
    if on:
        before = prog_ids()
        agent, why = start_agent_best_effort(topo, topo.a, rx, topo.a_if)
        ids = new_programs(before, AGENT_PROGRAMS)
        out["signals"] = agent.signals
        out["programs"] = sorted(ids)
        time.sleep(1.0)  # start-up work (imports, first export) settles first
        if why and why not in res.notes:
            res.note(why)
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
            agent.__exit__()
    return out
