"""The packet hooks in a running agent: an interface deleted and recreated is
re-attached and its counts resume; a hook that another program keeps from
seeing packets is reported (ebpf_otlp.hook.silent) while the interface's own
counters move. Truths: datagrams sent, the interface counters, and the other
program's own verdict (it ends classification before ours)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import require
from otlp import PY, AgentProc, ReceiverProc, metric_total

from ebpf_otlp.platform import tcx

ROOT = Path(__file__).resolve().parents[3]
DRIVER = str(ROOT / "tests" / "platform" / "tc_driver.py")
pytestmark = pytest.mark.kernel

SEND = """
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ok = 0
for _ in range(n):
    try:
        s.sendto(b"r" * 100, (dst, port)); ok += 1
    except OSError:
        pass
print(ok)
"""
TRICKLE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while True:
    s.sendto(b"t" * 64, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.01)
"""


def _send(topo, port: int, n: int) -> int:
    return int(topo.run(topo.b, PY, "-c", SEND, topo.a_ip4, str(port), str(n)).stdout)


def _recreate_veth(topo) -> None:
    """Delete the pair (as a container restart does) and make it again, same names."""
    topo.run(topo.a, "ip", "link", "del", topo.a_if)
    tmp_a, tmp_b = f"{topo.a}y", f"{topo.b}y"
    subprocess.run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b],
                   check=True)
    subprocess.run(["ip", "link", "set", tmp_a, "netns", topo.a, "name", topo.a_if], check=True)
    subprocess.run(["ip", "link", "set", tmp_b, "netns", topo.b, "name", topo.b_if], check=True)
    for ns, ifn, v4 in ((topo.a, topo.a_if, topo.a_ip4), (topo.b, topo.b_if, topo.b_ip4)):
        topo.run(ns, "ip", "addr", "add", f"{v4}/24", "dev", ifn)
        topo.run(ns, "ip", "link", "set", ifn, "up")
    topo.run(topo.a, "ip", "neigh", "replace", topo.b_ip4, "lladdr", topo.mac(topo.b), "dev",
             topo.a_if, "nud", "permanent")
    topo.run(topo.b, "ip", "neigh", "replace", topo.a_ip4, "lladdr", topo.mac(topo.a), "dev",
             topo.b_if, "nud", "permanent")


def _rx_packets(rx: ReceiverProc, port: int) -> float:
    return metric_total(rx.metrics("network.flow.packets", **{
        "destination.port": port, "network.io.direction": "receive",
        "network.interface.name": "veth-a"}))


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_interface_recreated_counts_resume(topo, mode: str) -> None:
    if mode == "tcx":
        require(tcx.kernel_has_tcx(), "kernel without TCX (before 6.6)")
    with ReceiverProc(topo, topo.a) as rx:
        agent = AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                          "--tc-mode", mode, interval=0.5)
        with agent:
            sent1 = _send(topo, 7301, 50)
            rx.wait_for(lambda: _rx_packets(rx, 7301) == sent1, what="first interface's flows")
            _recreate_veth(topo)
            rx.wait_for(lambda: "re-attached" in agent.log(), what="the re-attach log line")
            rx.wait_for(lambda: metric_total(rx.metrics("ebpf_otlp.hook.reattached")) >= 1,
                        what="ebpf_otlp.hook.reattached")
            sent2 = _send(topo, 7302, 30)
            rx.wait_for(lambda: _rx_packets(rx, 7302) == sent2,
                        what="flows on the recreated interface")
            assert agent.stop(signal.SIGTERM) == 0, agent.log()
        assert _rx_packets(rx, 7301) == sent1, "the first interface's flows counted twice"
        assert _rx_packets(rx, 7302) == sent2
        assert "Traceback" not in agent.log()
    for d in ("ingress", "egress"):
        assert topo.run(topo.a, "tc", "filter", "show", "dev", topo.a_if, d).stdout == ""


@pytest.fixture(scope="module")
def other_obj():
    clang = shutil.which("clang-19") or shutil.which("clang")
    require(clang is not None, "clang is needed to compile the other tool's program")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "other_tc.bpf.o")
        subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86",
                        "-I", str(ROOT / "bpf"), "-I", str(ROOT / "vmlinux/x86"), "-c",
                        str(ROOT / "tests/bpf/other_tc.bpf.c"), "-o", str(out)], check=True)
        yield str(out)


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_hook_kept_silent_by_another_program_is_reported(topo, other_obj, mode: str) -> None:
    if mode == "tcx":
        require(tcx.kernel_has_tcx(), "kernel without TCX (before 6.6)")
    ingress = {"network.interface.name": topo.a_if, "network.io.direction": "receive"}
    egress = {"network.interface.name": topo.a_if, "network.io.direction": "transmit"}
    with ReceiverProc(topo, topo.a) as rx:
        agent = AgentProc(topo, topo.a, rx, "--iface", topo.a_if, "--signals", "flows",
                          "--tc-mode", mode, interval=0.5)
        with agent:
            # another tool's program, before ours, ends classification (TC_ACT_OK)
            other = topo.popen(topo.a, PY, DRIVER, "--iface", topo.a_if, "--ours", "none",
                               "--other", mode, "--other-first", "--other-obj", other_obj,
                               "--other-verdict", "0", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            trickle = None
            try:
                assert other.stdout.readline().strip() == "ready", other.stderr.read()
                trickle = topo.popen(topo.b, PY, "-c", TRICKLE, topo.a_ip4, "7303")
                ping = topo.popen(topo.a, PY, "-c", TRICKLE, topo.b_ip4, "7304")
                try:
                    rx.wait_for(lambda: any(p["value"] == 1 for p in
                                            rx.metrics("ebpf_otlp.hook.silent", **ingress)),
                                what="ebpf_otlp.hook.silent=1 on ingress")
                finally:
                    ping.kill()
                    ping.wait()
                # egress still sees its packets: never reported
                assert all(p["value"] == 0 for p in rx.metrics("ebpf_otlp.hook.silent", **egress))
            finally:
                if trickle is not None:
                    trickle.kill()
                    trickle.wait()
                other.kill()
                other.wait()
            assert agent.stop() == 0, agent.log()
        log = agent.log()
        assert log.count("our hook saw none") == 1, log  # logged once, not every interval
        assert "veth-a ingress" in log
