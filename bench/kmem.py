"""Kernel memory of the default agent per possible-CPU count.

The agent runs with every signal and default sizes on veth-a; every BPF map it
holds is read from its /proc/PID/fdinfo (the kernel's own ``memlock``), and
ebpf_otlp.platform.kmem (checked to the byte against those figures by
tests/app/test_kmem.py) gives the same maps at other CPU counts. Baseline: the
same agent with the flow tables as they were before, per-CPU hashes of
48-byte values (one slot per possible CPU).
"""

from __future__ import annotations

from dataclasses import replace

from .common import Figure, Result, command_for
from .lab import Receiver, Topology, start_agent_best_effort

NAME = "kmem"
TITLE = "Kernel memory of the default agent by possible CPUs (MiB)"
CPUS = (2, 8, 64, 256, 1024)
TARGET_MIB_AT_256 = 64.0
MIB = 1 << 20


def _per_cpu_flow_tables(specs: list) -> list:
    from ebpf_otlp.platform import kmem

    out = []
    for s in specs:
        if s.map_type == kmem.HASH and s.key_size == 48 and s.value_size == 40:
            s = replace(s, map_type=kmem.PERCPU_HASH, value_size=48)
        out.append(s)
    return out


def run(quick: bool = False) -> Result:
    from ebpf_otlp.platform import kmem
    from ebpf_otlp.platform.libbpf import num_possible_cpus

    res = Result(NAME, TITLE, command_for(NAME, quick))
    with Topology() as topo, Receiver(topo, topo.a) as rx:
        agent, why = start_agent_best_effort(topo, topo.a, rx, topo.a_if)
        try:
            maps = kmem.fdinfo_maps(agent.proc.pid)
        finally:
            agent.__exit__()
    if why:
        res.note(why)
    specs = [s for s, _ in maps]
    here = sum(m for _, m in maps)
    cpus = num_possible_cpus()
    exact = all(kmem.map_bytes(s, cpus) == m for s, m in maps)
    res.add(Figure("measured here (fdinfo memlock, all maps)", here / MIB, "MiB",
                   note=f"{len(maps)} maps, {cpus} possible CPUs; formula exact for every "
                        f"map: {'yes' if exact else 'NO'}"))
    before = _per_cpu_flow_tables(specs)
    for n in CPUS:
        now, old = kmem.total_bytes(specs, n) / MIB, kmem.total_bytes(before, n) / MIB
        fig = Figure.compare(f"{n} possible CPUs", now, "MiB", old,
                             "per-CPU flow tables (before)", higher_is_better=False)
        if n == 256:
            fig.target, fig.met = f"<= {TARGET_MIB_AT_256:g} MiB", now <= TARGET_MIB_AT_256
        res.add(fig)
    big = sorted(specs, key=lambda s: -kmem.map_bytes(s, 256))[:5]
    res.note("largest maps at 256 CPUs: " + "; ".join(
        f"type {s.map_type} x{s.max_entries} ({kmem.map_bytes(s, 256) / MIB:.1f} MiB)"
        for s in big))
    res.raw["maps"] = [{"type": s.map_type, "max_entries": s.max_entries, "key": s.key_size,
                        "value": s.value_size, "memlock": m} for s, m in maps]
    return res
