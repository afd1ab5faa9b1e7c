"""Per-packet (per-event) cost of each ebpf-otlp kernel program.

Packet programs (flows TC/XDP, DNS TC) run under ``BPF_PROG_TEST_RUN`` with
``repeat`` on crafted frames, interleaved with the self-test object's empty
``probe_tc`` / ``probe_xdp``: the figure is the added ns per packet (the
kernel reports the mean time per run, excluding the syscall). The same frame
repeated is a flow-table hit after the first run.

Tracepoint programs (drops on ``skb:kfree_skb``, TCP on
``sock:inet_sock_set_state``) cannot be test-run: both they and an empty
program compiled here are attached to the same tracepoint, real events are
generated on loopback, and the kernel's BPF run-time statistics
(``run_time_ns / run_cnt``) give the cost per event of each.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Callable

from .common import OBJ_DIR, REPO, WORK, Figure, Result, command_for, median

NAME = "pktcost"
TITLE = "Kernel cost per packet / per event (ns)"
TARGET_HIT_NS = 100.0


# --- frames (own minimal builder; checksums are not checked by the programs) ---
def _eth(ethertype: int, payload: bytes) -> bytes:
    return bytes.fromhex("020000000002020000000001") + struct.pack("!H", ethertype) + payload


def _ip4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def _ip6(nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64,
                       ipaddress.ip_address("fd00::1").packed,
                       ipaddress.ip_address("fd00::2").packed) + payload


def _tcp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + payload


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _dns_query() -> bytes:
    qname = b"".join(bytes([len(p)]) + p for p in b"www.example.com".split(b".")) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


FRAMES = {
    "ipv4 tcp 100B": _eth(0x0800, _ip4(6, _tcp(40000, 443, bytes(100)))),
    "ipv6 tcp 100B": _eth(0x86DD, _ip6(6, _tcp(40000, 443, bytes(100)))),
    "ipv4 udp dns query": _eth(0x0800, _ip4(17, _udp(40000, 53, _dns_query()))),
}


def _test_run_ns(prog: object, data: bytes, repeat: int) -> float:
    return float(prog.test_run(data, repeat=repeat).duration_ns)


def _interleaved(prog: object, base: object, data: bytes, repeat: int, trials: int,
                 between: Callable[[], None] | None = None) -> tuple[float, float, float]:
    """(median ns of prog, median ns of base, median of the per-trial difference)."""
    xs, bs, ds = [], [], []
    for _ in range(trials):
        b = _test_run_ns(base, data, repeat)
        x = _test_run_ns(prog, data, repeat)
        if between:
            between()
        xs.append(x)
        bs.append(b)
        ds.append(x - b)
    return median(xs), median(bs), median(ds)


def _added(res: Result, label: str, ns: float, base_ns: float, added: float, base_name: str,
           target: float | None = None, note: str = "") -> None:
    met = None if target is None else added < target
    res.add(Figure(label, added, "ns added/packet", base_ns, base_name,
                   ns / base_ns if base_ns else None,
                   f"< {target:g} ns added" if target is not None else "", met,
                   f"program {ns:.0f} ns/run vs empty {base_ns:.0f} ns/run" +
                   (f"; {note}" if note else "")))


def packet_programs(res: Result, quick: bool) -> None:
    from ebpf_otlp.platform.bpfobj import BpfObject

    base = BpfObject.open_packaged("selftest")
    base.only_programs(["probe_tc"])
    base.load()
    try:
        empty_tc = base.programs["probe_tc"]
        if not (OBJ_DIR / "packet.bpf.o").exists():
            res.note("packet: not built yet (src/ebpf_otlp/bpf/packet.bpf.o missing)")
            return
        res.note("flows alone on more frames and XDP: the flows_cost benchmark")
        dns_programs(res, empty_tc, quick)
        stats_cost(res, empty_tc, quick)
        packet_object(res, empty_tc, quick)
    finally:
        base.close()


TARGET_ONE_PARSE_NS = 60.0


def stats_cost(res: Result, empty_tc: object, quick: bool) -> None:
    """What kernel BPF run-time statistics add to every run of every program on
    the host: the empty TC program with them on (an enable_stats fd held open)
    against off. Another process holding them on meanwhile hides the difference."""
    from ebpf_otlp.platform.libbpf import lib

    # Someone else holds them on if a run of ours is counted without our fd (the
    # kernel.bpf_stats_enabled sysctl only shows its own setting, not fd holders).
    frame = FRAMES["ipv4 tcp 100B"]

    def held() -> bool:
        before = empty_tc.run_stats()[1]
        empty_tc.test_run(frame, repeat=10)
        return empty_tc.run_stats()[1] > before

    repeat = 20_000 if quick else 1_000_000
    on, off = [], []
    deadline = time.monotonic() + (5 if quick else 60)
    # Other sessions' agents toggle them: take only pairs measured while nobody
    # else held them, waiting for such moments up to the deadline.
    while len(on) < (1 if quick else 5) and time.monotonic() < deadline:
        if held():
            time.sleep(0.5)
            continue
        x = _test_run_ns(empty_tc, frame, repeat)
        fd = lib.bpf_enable_stats(0)
        if fd < 0:
            res.note("BPF run-time statistics unavailable: their cost not measured")
            return
        try:
            y = _test_run_ns(empty_tc, frame, repeat)
        finally:
            os.close(fd)
        if not held():
            off.append(x)
            on.append(y)
    if not on:
        res.note("BPF run-time statistics were held on by another process for the whole "
                 "attempt: their cost is not measured in this run; the ns/run of every "
                 "program and of the empty baseline include it, the added ns do not")
        return
    a, b = median(on), median(off)
    _added(res, "BPF run-time statistics on (any program, per run)", a, b,
           median([x - y for x, y in zip(on, off)]), "statistics off",
           note="host-wide while any process holds them on: the agent enables them only "
                "with --bpf-stats")


def build_percpu_packet() -> str:
    """packet.bpf.c with per-CPU flow tables (-DFLOWS_PERCPU), for comparison."""
    clang = shutil.which("clang-19") or shutil.which("clang")
    if not clang:
        raise RuntimeError("clang not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "packet_percpu.bpf.o"
    cmd = [clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-DFLOWS_PERCPU",
           "-I", str(REPO / "bpf"), "-I", str(REPO / "vmlinux" / "x86"),
           "-c", str(REPO / "bpf" / "packet.bpf.c"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the per-CPU packet variant failed: {r.stderr}")
    return str(out)


def _packet(flows: bool, dns: bool, path: str | None = None, hooks: bool = False) -> object:
    from ebpf_otlp.platform.bpfobj import BpfObject

    obj = BpfObject.open_file(path, "packet") if path else BpfObject.open_packaged("packet")
    obj.only_programs(["packet_tc_ingress", "packet_tc_egress", "packet_xdp_ingress"])
    obj.rodata["flows_on"] = int(flows)
    obj.rodata["dns_on"] = int(dns)
    obj.rodata["hook_count_on"] = int(hooks)
    obj.rodata["ringbuf_wakeup_bytes"] = 64 << 10  # the agent's default policy
    obj.load()
    if hooks:
        # As the agent sets it up (signals/packet.py): the test-run packets'
        # interface (loopback, ifindex 1) owns its hook slots.
        import numpy as np

        slots = obj.maps["hook_slots"]
        owned = np.zeros((slots.ncpus, slots.value_stride // slots.ncpus // 8), "<u8")
        owned[:, 0] = 1
        for d in (0, 1):
            slots.update((1 << 1) | d, owned.tobytes())
    return obj


def packet_object(res: Result, empty_tc: object, quick: bool) -> None:
    """The one-parse program (bpf/packet.bpf.c) per signal combination, and the
    flow table shared with atomic adds against per-CPU tables."""
    repeat = 20_000 if quick else 1_000_000
    trials = 1 if quick else 5
    frame = FRAMES["ipv4 tcp 100B"]
    cases = [("flows+dns", True, True, None), ("flows only", True, False, None),
             ("dns only", False, True, None), ("all off", False, False, None),
             ("flows+dns+hook counts, as the agent runs it", True, True, None)]
    try:
        cases.append(("flows+dns, per-CPU flow tables", True, True, build_percpu_packet()))
    except RuntimeError as e:
        res.note(str(e))
    for label, flows, dns, path in cases:
        obj = _packet(flows, dns, path, hooks="hook counts" in label)
        try:
            for direction in ("ingress", "egress"):
                ns, b, d = _interleaved(obj.programs[f"packet_tc_{direction}"], empty_tc, frame,
                                        repeat, trials)
                target = TARGET_ONE_PARSE_NS if label == "flows+dns" else None
                _added(res, f"packet TC {direction} ({label}), ipv4 tcp 100B, flow-table hit",
                       ns, b, d, "empty TC program", target,
                       note="one parse for both signals (bpf/packet.bpf.c)")
            if label == "flows+dns":
                ns, b = _front_misses(obj.programs["packet_tc_ingress"], empty_tc, quick)
                _added(res, "packet TC ingress (flows+dns), every packet a new flow in its "
                       "front slot", ns, b, ns - b, "empty TC program",
                       note="two flows sharing one per-CPU front slot, alternating: each "
                            "packet spills the other into the shared table (lookup + atomic "
                            "adds); single runs, medians")
        finally:
            obj.close()


def _front_misses(prog: object, base: object, quick: bool) -> tuple[float, float]:
    """Median ns per run when consecutive packets alternate between two flows
    that share a front slot (source ports 8 apart, bpf/flows.bpf.h)."""
    frames = [_eth(0x0800, _ip4(6, _tcp(40000 + 8 * i, 443, bytes(100)))) for i in range(2)]
    xs, bs = [], []
    for i in range(2_000 if quick else 40_000):
        f = frames[i & 1]
        xs.append(prog.test_run(f).duration_ns)
        bs.append(base.test_run(f).duration_ns)
    return median(xs), median(bs)


def dns_programs(res: Result, empty_tc: object, quick: bool) -> None:
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.ringbuf import RingBuffer

    obj = BpfObject.open_packaged("packet")  # DNS only: flows off is dead code
    obj.only_programs(["packet_tc_ingress", "packet_tc_egress"])
    obj.rodata["flows_on"] = 0
    obj.rodata["ringbuf_wakeup_bytes"] = 64 << 10  # the agent's default policy
    obj.set_max_entries("dns_events", 16 << 20)
    obj.load()
    try:
        prog = obj.programs["packet_tc_egress"]
        trials = 1 if quick else 5
        ns, b, d = _interleaved(prog, empty_tc, FRAMES["ipv4 tcp 100B"],
                                20_000 if quick else 1_000_000, trials)
        _added(res, "DNS capture alone, TC egress, non-DNS packet (ipv4 tcp 443)", ns, b, d,
               "empty TC program")
        # DNS messages go to the ring: keep it drained so we time submits, not a full ring.
        rb = RingBuffer(obj.maps["dns_events"], on_record=lambda _r: None,
                        lost_map=obj.maps.get("dns_events_lost"))
        ns, b, d = _interleaved(prog, empty_tc, FRAMES["ipv4 udp dns query"],
                                2_000 if quick else 20_000, trials * 2, between=rb.drain)
        lost = rb.lost()
        _added(res, "DNS capture alone, TC egress, DNS query (head copied to the ring buffer)",
               ns, b, d,
               "empty TC program", note=f"ring drained between runs, {lost} lost")
        rb.close()
    finally:
        obj.close()


# --- tracepoint programs: kernel run-time statistics ---------------------------------
EMPTY_TP_SRC = """\
#include "common.bpf.h"
char LICENSE[] SEC("license") = "Dual BSD/GPL";
SEC("tracepoint/skb/kfree_skb")
int empty_kfree_skb(void *ctx) { return 0; }
SEC("tracepoint/sock/inet_sock_set_state")
int empty_set_state(void *ctx) { return 0; }
"""


def build_empty_tp() -> str:
    clang = shutil.which("clang-19") or shutil.which("clang")
    if not clang:
        raise RuntimeError("clang not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    src, out = WORK / "empty_tp.bpf.c", WORK / "empty_tp.bpf.o"
    src.write_text(EMPTY_TP_SRC)
    cmd = [clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", str(REPO / "bpf"),
           "-I", str(REPO / "vmlinux" / "x86"), "-c", str(src), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the empty tracepoint program failed: {r.stderr}")
    return str(out)


def _udp_to_closed_port(n: int) -> None:
    """Each datagram to a port nobody listens on is freed with reason NO_SOCKET."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    try:
        for _ in range(n):
            try:
                s.sendto(b"x" * 32, ("127.0.0.1", port))
            except OSError:  # ICMP port unreachable reported back: fine
                pass
    finally:
        s.close()


def _tcp_churn(n: int, every_100: Callable[[], None] = lambda: None) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    addr = srv.getsockname()
    try:
        for i in range(n):
            if i % 100 == 0:
                every_100()
            c = socket.create_connection(addr)
            a, _ = srv.accept()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            a.close()
    finally:
        srv.close()


def _stats_delta(progs: list, action: Callable[[], None]) -> list[tuple[float, int]]:
    before = [p.run_stats() for p in progs]
    action()
    after = [p.run_stats() for p in progs]
    return [((a[0] - b[0]) / max(1, a[1] - b[1]), a[1] - b[1]) for a, b in zip(after, before)]


def tracepoint_programs(res: Result, quick: bool) -> None:
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.btf import kernel_enum
    from ebpf_otlp.platform.libbpf import lib

    stats_fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME while the fd is open
    if stats_fd < 0:
        res.note("kernel BPF run-time statistics unavailable: tracepoint costs not measured")
        return
    empty = None
    try:
        empty = BpfObject.open_file(build_empty_tp(), "empty_tp")
        empty.load()
        n = 2_000 if quick else 50_000
        if (OBJ_DIR / "drops.bpf.o").exists():
            names = {v: k for k, v in kernel_enum("skb_drop_reason").items()}
            for label, filtered in (("", False), (", reason filtered out (--drop-reasons)",
                                                  True)):
                drops = BpfObject.open_packaged("drops")
                drops.rodata["reason_consumed"] = names.get("SKB_CONSUMED", 0xFFFFFFFE)
                drops.rodata["reason_not_specified"] = names.get(
                    "SKB_DROP_REASON_NOT_SPECIFIED", 0xFFFFFFFE)
                if filtered:  # only NETFILTER_DROP wanted: NO_SOCKET leaves at once
                    drops.rodata["reason_filter"] = 1
                    v = names.get("SKB_DROP_REASON_NETFILTER_DROP", 0)
                    bits = bytearray(8 * 8)
                    bits[v >> 3] |= 1 << (v & 7)
                    drops.rodata["reason_bits"] = bytes(bits)
                drops.load()
                try:
                    drops.programs["on_kfree_skb"].attach_tracepoint("skb", "kfree_skb")
                    if not filtered:
                        empty.programs["empty_kfree_skb"].attach_tracepoint("skb", "kfree_skb")
                    (ns, cnt), (bns, _) = _stats_delta(
                        [drops.programs["on_kfree_skb"], empty.programs["empty_kfree_skb"]],
                        lambda: _udp_to_closed_port(n))
                    _added(res, "drops on skb:kfree_skb, per freed skb (UDP to a closed port)"
                           + label, ns, bns, ns - bns, "empty program on the same tracepoint",
                           note=f"{cnt} runs from BPF stats; the tracepoint also fires for "
                                "consumed skbs, which the program leaves early")
                finally:
                    drops.close()
        else:
            res.note("drops: not built yet")
        if (OBJ_DIR / "tcp.bpf.o").exists():
            from ebpf_otlp.platform.ringbuf import RingBuffer

            tcp = BpfObject.open_packaged("tcp")
            tcp.only_programs(["tcp_state"])
            tcp.rodata["ringbuf_wakeup_bytes"] = 64 << 10  # the agent's default
            tcp.load()
            rb = RingBuffer(tcp.maps["tcp_events"], on_record=lambda _r: None)
            try:
                tcp.programs["tcp_state"].attach_tracepoint("sock", "inet_sock_set_state")
                empty.programs["empty_set_state"].attach_tracepoint("sock", "inet_sock_set_state")
                (ns, cnt), (bns, _) = _stats_delta(
                    [tcp.programs["tcp_state"], empty.programs["empty_set_state"]],
                    lambda: _tcp_churn(n // 10, rb.drain))
                _added(res, "tcp on sock:inet_sock_set_state, per state change", ns, bns,
                       ns - bns, "empty program on the same tracepoint",
                       note=f"{cnt} runs from BPF stats (loopback connect/close churn)")
            finally:
                rb.close()
                tcp.close()
        else:
            res.note("tcp: not built yet")
    finally:
        if empty is not None:
            empty.close()
        os.close(stats_fd)


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    t0 = time.monotonic()
    packet_programs(res, quick)
    tracepoint_programs(res, quick)
    res.raw["seconds_measuring"] = time.monotonic() - t0
    res.note("In these rows the value is the time added per packet (or event) and the ratio "
             "is the program's own time over the empty program's.")
    res.note("Packet programs: BPF_PROG_TEST_RUN repeat on one frame (flow-table hit after the "
             "first run), interleaved with the empty program of the same type; medians.")
    res.note("XDP test runs with repeat > 1 pay a fixed ~20 ms per call on this kernel "
             "(dispatcher swap); the kernel's per-run figure excludes it.")
    return res
