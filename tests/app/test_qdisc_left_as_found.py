"""An interface's qdiscs are as the agent found them once it stops (SIGTERM):
a clsact qdisc it created for its TC filters goes with them, one that was
there before stays, one another tool put filters on meanwhile stays with
those filters; TCX links create none. ``doctor`` without CAP_SYS_ADMIN (no
private namespace for its probes, so it tries them on the loopback of the
namespace it runs in) leaves that loopback's qdiscs as they were too.

Truth: ``tc -j qdisc show dev X`` and ``tc filter show`` read before, while
and after, and the kernel's TCX program list (BPF_PROG_QUERY)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc

pytestmark = pytest.mark.kernel
PY = sys.executable
# classic BPF "return -1" (TC_ACT_UNSPEC: the next filter runs) through cls_bpf
OTHER_FILTER = ("prio", "1", "handle", "1", "bpf", "da", "bytecode", "1,6 0 0 4294967295,")
TCX_QUERY = ("import socket, sys; from ebpf_otlp.platform import tcx; "
             "i = socket.if_nametoindex(sys.argv[1]); "
             "print(len(tcx.query(i, 'ingress')), len(tcx.query(i, 'egress')))")


def qdiscs(topo, dev: str) -> list[dict]:
    return json.loads(topo.run(topo.a, "tc", "-j", "qdisc", "show", "dev", dev).stdout)


def filters(topo, dev: str) -> dict[str, list[str]]:
    """Filter lines per clsact direction ('tc filter show' prints none without clsact)."""
    out = {}
    for d in ("ingress", "egress"):
        shown = topo.run(topo.a, "tc", "filter", "show", "dev", dev, d, check=False).stdout
        out[d] = [ln.strip() for ln in shown.splitlines() if "handle" in ln]
    return out


def has_clsact(q: list[dict]) -> bool:
    return any(x["kind"] == "clsact" for x in q)


@pytest.mark.parametrize("mode", ["tc", "tcx"])
@pytest.mark.parametrize("preexisting", [False, True], ids=["no-clsact", "clsact-before"])
def test_agent_leaves_qdiscs_as_found(topo, mode: str, preexisting: bool) -> None:
    dev = topo.a_if
    if preexisting:
        topo.run(topo.a, "tc", "qdisc", "add", "dev", dev, "clsact")
    before = qdiscs(topo, dev)
    assert has_clsact(before) == preexisting, before
    with ReceiverProc(topo, topo.a) as rx:
        agent = AgentProc(topo, topo.a, rx, "--iface", dev, "--signals", "flows",
                          "--tc-mode", mode)
        with agent:
            during = qdiscs(topo, dev)
            ours = [ln for lines in filters(topo, dev).values() for ln in lines
                    if "handle 0xeb0f" in ln]
            if mode == "tc":
                assert has_clsact(during), during
                assert len(ours) == 2, filters(topo, dev)
            else:
                assert during == before, "a TCX link changed the qdiscs"
                assert ours == []
                counts = topo.run(topo.a, PY, "-c", TCX_QUERY, dev).stdout.split()
                assert counts == ["1", "1"], counts
            assert agent.stop() == 0, agent.log()
        assert "Traceback" not in agent.log(), agent.log()
    after = qdiscs(topo, dev)
    assert after == before, f"qdiscs of {dev}: before {before}, after {after}"
    assert filters(topo, dev) == {"ingress": [], "egress": []}


def test_clsact_another_tool_uses_stays(topo) -> None:
    """The agent created the clsact qdisc, then another tool put a filter on it:
    the agent removes only its own filters and keeps the qdisc for the other."""
    dev = topo.a_if
    before = qdiscs(topo, dev)
    assert not has_clsact(before), before
    args = ("--iface", dev, "--signals", "flows", "--tc-mode", "tc")
    with ReceiverProc(topo, topo.a) as rx, AgentProc(topo, topo.a, rx, *args) as agent:
        assert has_clsact(qdiscs(topo, dev))
        topo.run(topo.a, "tc", "filter", "add", "dev", dev, "ingress", *OTHER_FILTER)
        assert agent.stop() == 0, agent.log()
    left = filters(topo, dev)
    assert has_clsact(qdiscs(topo, dev)), "the other tool's clsact qdisc was deleted"
    assert left["egress"] == [] and len(left["ingress"]) == 1, left
    assert "bytecode" in left["ingress"][0] and "0xeb0f" not in left["ingress"][0], left


def test_doctor_without_sys_admin_leaves_loopback_as_found(topo) -> None:
    """Without CAP_SYS_ADMIN doctor cannot unshare a network namespace, so its TC
    and XDP probes land on ifindex 1 of the namespace it runs in (the host's own
    lo when run on the host): here the loopback of test namespace a."""
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    before = qdiscs(topo, "lo")
    res = topo.run(topo.a, "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--",
                   PY, "-m", "ebpf_otlp", "doctor", "--json", check=False, timeout=120)
    hooks = json.loads(res.stdout)["hooks"]
    assert "unshare" in hooks.get("_netns", ""), hooks  # it did run outside a private netns
    assert hooks["tc"] == "ok" and hooks["xdp"] == "ok", hooks  # and it did attach to lo
    after = qdiscs(topo, "lo")
    assert after == before, f"qdiscs of lo: before {before}, after {after}"
    assert filters(topo, "lo") == {"ingress": [], "egress": []}
    assert "xdp" not in topo.run(topo.a, "ip", "link", "show", "lo").stdout
