"""Runs inside a test namespace for tests/test_tcx.py: loads the packet object
(flows on) and, optionally, another tool's program (tests/bpf/other_tc.bpf.c),
attaches both to one interface's ingress in the order and modes asked, prints
``ready <our prog id>``, then on a ``dump`` line on stdin prints what each saw
as JSON and exits (closing everything). With ``--hold`` it never exits by
itself (the SIGKILL test)."""

from __future__ import annotations

import argparse
import json
import socket
import sys

import numpy as np

from ebpf_otlp.platform import tc
from ebpf_otlp.platform.bpfobj import BpfObject
from ebpf_otlp.platform.libbpf import BpfError, capture_log, lib
from ebpf_otlp.signals.flows import agg


def attach_other_clsact(prog_fd: int, ifindex: int, prio: int) -> None:
    hook = tc._hook(ifindex, "ingress")
    tc._ensure_clsact(hook, ifindex)
    opts = tc._opts(prio, prog_fd)
    opts.handle = 1
    with capture_log() as lines:
        ret = lib.bpf_tc_attach(hook, opts)
    if ret < 0:
        raise BpfError(-ret, "attach the other program (clsact)", lines)


def our_counts(obj: BpfObject, ifindex: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, name in enumerate(("flows_a", "flows_b")):
        m = obj.maps[name]
        keys, vals = m.drain()
        fk, fv = agg.drain_front(obj.maps["flows_front"], i)
        d = agg.fold(np.concatenate([keys, fk]), np.concatenate([vals, fv]), m.ncpus)
        for k, c in zip(d.keys, d.counts):
            if k["ifindex"] == ifindex and k["direction"] == 0 and k["proto"] == 17:
                out[int(k["dport"])] = out.get(int(k["dport"]), 0) + int(c[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--ours", choices=("tcx", "tc", "none"), required=True)
    ap.add_argument("--other-verdict", type=int, default=-1)
    ap.add_argument("--other", choices=("tcx", "tc", "none"), default="none")
    ap.add_argument("--other-first", action="store_true")
    ap.add_argument("--other-obj")
    ap.add_argument("--shot", type=int, default=0)
    ap.add_argument("--pass-port", type=int, default=0)
    ap.add_argument("--hold", action="store_true")
    a = ap.parse_args()
    idx = socket.if_nametoindex(a.iface)

    ours = BpfObject.open_packaged("packet")
    ours.only_programs(["packet_tc_ingress"])
    ours.rodata["dns_on"] = 0
    for t in ("flows_a", "flows_b"):
        ours.set_max_entries(t, 1024)
    ours.load()
    prog = ours.programs["packet_tc_ingress"]
    other = None
    if a.other != "none":
        other = BpfObject.open_file(a.other_obj, "other_tc")
        other.rodata["shot_port"] = a.shot
        other.rodata["pass_port"] = a.pass_port
        other.rodata["other_verdict"] = a.other_verdict
        other.load()

    def attach_ours() -> None:
        if a.ours == "none":  # only the other program (ours is the agent's)
            return
        if a.ours == "tcx":
            prog.attach_tcx(idx, "ingress")
        else:
            prog.attach_tc(idx, "ingress")

    def attach_other() -> None:
        if a.other == "tcx":
            other.programs["other_tc"].attach_tcx(idx, "ingress", first=a.other_first)
        else:  # clsact: priority 1 runs before ours (0xeb00...), 0xf000 after
            attach_other_clsact(other.programs["other_tc"].fd, idx,
                                1 if a.other_first else 0xF000)

    if other is not None and a.other_first:
        attach_other()
    attach_ours()
    if other is not None and not a.other_first:
        attach_other()
    print("ready", flush=True)
    if a.hold:
        while True:
            sys.stdin.readline()
    sys.stdin.readline()
    result = {"ours": our_counts(ours, idx), "other": None}
    if other is not None:
        m = other.maps["other_counts"]
        result["other"] = {"shot": int.from_bytes(m.lookup(0)[:8], "little"),
                           "pass": int.from_bytes(m.lookup(1)[:8], "little")}
    print(json.dumps(result), flush=True)
    ours.close()
    if other is not None:
        other.close()


if __name__ == "__main__":
    main()
