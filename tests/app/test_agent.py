"""The agent as a user runs it: start, health metrics, collector outages,
stale filters of a crashed run, clean exit on SIGTERM and SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel

PLANT_FILTER = textwrap.dedent("""
    import socket
    from ebpf_otlp.platform import tc
    from ebpf_otlp.platform.bpfobj import BpfObject
    obj = BpfObject.open_packaged("selftest")
    obj.only_programs(["probe_tc"])
    obj.load()
    # attached behind the object's back and never detached: a crashed run
    tc.attach(obj.programs["probe_tc"].fd, socket.if_nametoindex("veth-a"), "ingress", "x")
""")


def _held_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds open (its fds' fdinfo), so other BPF
    users of the host do not count."""
    ids = set()
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fd.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def _prog_ids() -> dict[int, str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                         text=True).stdout
    return {p["id"]: p.get("name", "") for p in json.loads(out or "[]")}


def test_health_metrics_and_clean_sigterm(topo) -> None:
    with ReceiverProc(topo, topo.a) as rx:
        agent = AgentProc(topo, topo.a, rx, "--signals", "drops", "--bpf-stats")
        with agent:
            loaded = _prog_ids()
            ours = {i for i in _held_prog_ids(agent.proc.pid) if i in loaded}
            assert [loaded[i] for i in ours] == ["on_kfree_skb"], ours
            assert _stats_fds(agent.proc.pid) == 1, "--bpf-stats holds statistics on"
            # UDP to a closed port in b: drops to count, and runs of our program
            topo.run(topo.a, sys.executable, "-c",
                     "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                     f"[s.sendto(b'x', ('{topo.b_ip4}', 9)) for _ in range(50)]")
            rx.wait_for(lambda: metric_total(rx.metrics("ebpf_otlp.program.runs")) > 0,
                        what="program run counts")
            rx.wait_for(lambda: rx.metrics("ebpf_otlp.export.failures"), what="failure counter")
            assert agent.stop() == 0
        log = agent.log()
        assert log.count("ebpf-otlp running") == 1
        assert "Traceback" not in log
        runtime = rx.metrics("ebpf_otlp.program.run_time", program="on_kfree_skb")
        assert runtime and max(p["value"] for p in runtime) > 0
        # runs the kernel skipped (recursion): exported per program, whatever the value
        assert rx.metrics("ebpf_otlp.program.misses", program="on_kfree_skb", signal="drops")
        resource = rx.records()[0]["resource"]
        assert resource["service.name"] == "ebpf-otlp" and resource["host.name"]
    assert not ours & set(_prog_ids()), "the agent's program is still loaded after SIGTERM"


def _stats_fds(pid: int) -> int:
    """File descriptors of ``pid`` that hold kernel BPF run-time statistics on."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-stats"
        except OSError:
            pass
    return n


def test_bpf_stats_off_unless_asked(topo) -> None:
    """They cost every BPF program run on the host (bench/pktcost.py)."""
    with ReceiverProc(topo, topo.a) as rx, AgentProc(topo, topo.a, rx, "--signals", "drops") as a:
        assert _stats_fds(a.proc.pid) == 0
        assert a.stop() == 0


def test_sigint_also_exits_zero(topo) -> None:
    with ReceiverProc(topo, topo.a) as rx, AgentProc(topo, topo.a, rx, "--signals", "drops") as a:
        assert a.stop(signal.SIGINT) == 0


def test_collector_down_is_counted_and_agent_keeps_running(topo) -> None:
    rx = ReceiverProc(topo, topo.a, port=4319)
    agent = AgentProc(topo, topo.a, rx, "--signals", "drops", interval=0.5)
    with agent:
        time.sleep(3)  # several failed exports: nobody listens yet
        assert agent.proc.poll() is None
        with rx:
            pts = rx.wait_for(lambda: [p for p in rx.metrics("ebpf_otlp.export.failures",
                                                              signal="metrics")
                                       if p["value"] > 0], what="counted export failures")
            assert pts
            assert agent.stop() == 0


def test_stale_filters_of_a_crashed_run_are_removed_at_start(topo) -> None:
    topo.run(topo.a, sys.executable, "-c", PLANT_FILTER)
    shown = topo.run(topo.a, "tc", "filter", "show", "dev", "veth-a", "ingress").stdout
    assert "handle 0xeb0f" in shown
    with ReceiverProc(topo, topo.a) as rx:
        with AgentProc(topo, topo.a, rx, "--iface", "veth-a", "--signals", "drops") as agent:
            shown = topo.run(topo.a, "tc", "filter", "show", "dev", "veth-a", "ingress").stdout
            assert "probe_tc" not in shown
        assert "removed 1 tc filters an earlier ebpf-otlp run left on veth-a" in agent.log()
