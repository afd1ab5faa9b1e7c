"""Kernel memory does not grow with the CPU count: every map of a running agent
(all signals, default sizes) costs exactly what ebpf_otlp.platform.kmem says, as the
kernel itself reports it (fdinfo ``memlock``), and that formula keeps the
default agent under 64 MiB at 256 possible CPUs."""

from __future__ import annotations

import platform

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.platform import kmem
from ebpf_otlp.platform.libbpf import num_possible_cpus

MIB = 1 << 20


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)


@pytest.mark.kernel
def test_running_agent_maps_match_formula_and_stay_bounded(topo) -> None:
    # 6.4 made fdinfo's memlock the map's real usage (map_mem_usage)
    require(_kernel_at_least(6, 4), "kernel before 6.4: fdinfo memlock is an estimate")
    with ReceiverProc(topo, topo.a) as rx, AgentProc(topo, topo.a, rx, "--iface", topo.a_if) as a:
        maps = kmem.fdinfo_maps(a.proc.pid)
        a.stop()
    assert maps, "no BPF maps found in the agent's fdinfo"
    cpus = num_possible_cpus()
    for spec, memlock in maps:
        assert kmem.map_bytes(spec, cpus) == memlock, f"{spec}: kernel says {memlock}"
    specs = [s for s, _ in maps]
    flow_tables = [s for s in specs if s.map_type == kmem.HASH and s.key_size == 48
                   and s.max_entries == AgentConfig().max_flows]
    assert len(flow_tables) == 2, "both default-size flow tables, shared (not per-CPU) hashes"
    at_256 = kmem.total_bytes(specs, 256)
    assert at_256 <= 64 * MIB, f"{at_256 / MIB:.1f} MiB at 256 possible CPUs"
    # what grows with CPUs is small: under 32 KiB per possible CPU
    per_cpu = (kmem.total_bytes(specs, 1024) - kmem.total_bytes(specs, 2)) / 1022
    assert per_cpu < 32 << 10, f"{per_cpu:.0f} bytes per possible CPU"


def test_formula_per_map_kind() -> None:
    """The per-CPU parts, by hand: a per-CPU hash grows by its values per CPU, a
    shared hash only by one spare element (+ pointer and locks) per CPU."""
    shared = kmem.MapSpec("s", kmem.HASH, 65536, 48, 40)
    percpu = kmem.MapSpec("p", kmem.PERCPU_HASH, 65536, 48, 40)
    assert kmem.map_bytes(shared, 3) - kmem.map_bytes(shared, 2) == 48 + 48 + 40 + 8 + 32
    assert kmem.map_bytes(percpu, 3) - kmem.map_bytes(percpu, 2) == 65536 * 40 + 32
    ring = kmem.MapSpec("r", kmem.RINGBUF, 4 << 20, 0, 0)
    assert kmem.map_bytes(ring, 2) == kmem.map_bytes(ring, 256)
