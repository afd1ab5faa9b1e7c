"""Packet drops against the real kernel: nftables and closed ports in test
namespaces, the real agent and receiver, compared with the packets sent and
with the kernel's own counters (nft rule counters, /proc/net/snmp)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import require
from otlp import AgentProc, ReceiverProc, by_attrs, metric_total

from ebpf_otlp.platform.btf import kernel_enum
from ebpf_otlp.platform.layout import constant
from ebpf_otlp.signals.drops.reasons import DropReasons

pytestmark = pytest.mark.kernel
PY = sys.executable
METRIC = "network.packet.drops"

# Sends `count` UDP datagrams from a fixed source port with sendto in a loop
# and prints how many the kernel accepted (the truth the tests compare with).
SENDER = r"""
import socket, sys
fam, dst = sys.argv[1], sys.argv[2]
port, sport, count = (int(a) for a in sys.argv[3:6])
af = socket.AF_INET if fam == "4" else socket.AF_INET6
s = socket.socket(af, socket.SOCK_DGRAM)
s.bind(("0.0.0.0" if fam == "4" else "::", sport))
if fam == "6x":  # an IPv6 destination-options header before UDP (one PadN option)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
payload, addr, ok = b"d" * 32, (dst, port), 0
send = s.sendto
for _ in range(count):
    try:
        send(payload, addr)
        ok += 1
    except OSError:
        pass
print(ok)
"""


def send_udp(topo, fam: str, dst: str, port: int, sport: int, count: int) -> int:
    out = topo.run(topo.a, PY, "-c", SENDER, fam, dst, str(port), str(sport), str(count),
                   timeout=120)
    return int(out.stdout.strip())


def free_ports(n: int) -> list[int]:
    """Ports unlikely to meet another test's traffic (the tracepoint sees every netns)."""
    return random.sample(range(20000, 60000), n)


def nft_drop_udp(topo, table: str, port: int) -> None:
    require(shutil.which("nft") is not None, "nft (Debian nftables) is not installed")
    topo.run(topo.b, "nft", "add", "table", "inet", table)
    topo.run(topo.b, "nft", "add", "chain", "inet", table, "input",
             "{ type filter hook input priority 0 ; }")
    topo.run(topo.b, "nft", "add", "rule", "inet", table, "input", "udp", "dport", str(port),
             "counter", "drop")


def nft_packets(topo, table: str) -> int:
    out = json.loads(topo.run(topo.b, "nft", "-j", "list", "table", "inet", table).stdout)
    return sum(e["rule"]["expr"][-2]["counter"]["packets"] for e in out["nftables"]
               if "rule" in e)


class TraceInstance:
    """A private ftrace instance recording skb:kfree_skb with a filter: the
    kernel's own text rendering of each drop (``location=func+0x../0x..``)."""

    def __init__(self, filt: str):
        self.dir = Path(f"/sys/kernel/tracing/instances/eodrops{random.randrange(1 << 30)}")
        self.filt = filt

    def __enter__(self) -> TraceInstance:
        require(Path("/sys/kernel/tracing/instances").is_dir(), "tracefs is not mounted")
        self.dir.mkdir()
        event = self.dir / "events/skb/kfree_skb"
        (event / "filter").write_text(self.filt)
        (event / "enable").write_text("1")
        return self

    def locations(self) -> set[str]:
        text = (self.dir / "trace").read_text()
        return set(re.findall(r"location=([\w.]+)\+0x", text))

    def __exit__(self, *exc: object) -> None:
        (self.dir / "events/skb/kfree_skb/enable").write_text("0")
        self.dir.rmdir()


def flow_points(rx: ReceiverProc, **attrs: object) -> list[dict]:
    return rx.metrics(METRIC, **attrs)


def wait_total(rx: ReceiverProc, want: int, timeout: float = 30.0, **attrs: object) -> float:
    """Wait until the exported total for ``attrs`` reaches ``want``, then for one more
    export of the agent (any metric newer than those seen), so an over-count shows too."""
    try:
        rx.wait_for(lambda: metric_total(flow_points(rx, **attrs)) >= want, timeout,
                    f"{want} drops for {attrs}")
    except AssertionError as e:
        raise AssertionError(f"{e}; exported so far: "
                             f"{metric_total(flow_points(rx, **attrs))}") from None
    seen = max(r["time_ns"] for r in rx.records() if r["type"] == "metric")
    rx.wait_for(lambda: any(r["type"] == "metric" and r["time_ns"] > seen
                            for r in rx.records()), timeout, "one more export")
    return metric_total(flow_points(rx, **attrs))


def test_reason_table_is_the_kernels_btf() -> None:
    """Names and values equal what bpftool prints of enum skb_drop_reason."""
    require(shutil.which("bpftool") is not None, "bpftool is not installed")
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\[\d+\] ENUM(?:64)? 'skb_drop_reason' .*\n((?:\t'.*\n)+)", dump, re.M)
    require(m is not None, "this kernel has no enum skb_drop_reason")
    truth = {int(v): n for n, v in re.findall(r"'(\w+)' val=(-?\d+)", m.group(1))}
    raw = {v & 0xFFFFFFFF: n for v, n in kernel_enum("skb_drop_reason").items()}
    assert raw == truth
    reasons = DropReasons.from_kernel()
    want = {v: n[len("SKB_DROP_REASON_"):] if n.startswith("SKB_DROP_REASON_") else n[4:]
            for v, n in truth.items()
            if n not in ("SKB_DROP_REASON_MAX", "SKB_DROP_REASON_SUBSYS_MASK")}
    assert reasons.names == want
    assert reasons.name(truth_value(truth, "SKB_DROP_REASON_NETFILTER_DROP")) == "NETFILTER_DROP"
    assert reasons.consumed == truth_value(truth, "SKB_CONSUMED")
    assert reasons.not_specified == truth_value(truth, "SKB_DROP_REASON_NOT_SPECIFIED")
    # The tracepoint prints the same short names (it has no CONSUMED entry).
    fmt = Path("/sys/kernel/tracing/events/skb/kfree_skb/format")
    if fmt.exists():
        printed = {int(v): n for v, n in re.findall(r'\{ (\d+), "(\w+)" \}', fmt.read_text())}
        printed = {v: n for v, n in printed.items() if n != "MAX"}
        assert printed and all(reasons.names[v] == n for v, n in printed.items())


def truth_value(truth: dict[int, str], name: str) -> int:
    return next(v for v, n in truth.items() if n == name)


def test_netfilter_drops_counted_exactly_per_flow(topo) -> None:
    port, sport4, sport6, sport6x = free_ports(4)
    nft_drop_udp(topo, "eodrops", port)
    n4, n6 = 700, 300
    netfilter = DropReasons.from_kernel().value("NETFILTER_DROP")
    with ReceiverProc(topo, topo.b) as rx, \
            AgentProc(topo, topo.b, rx, "--signals", "drops", "--drop-location",
                      # only our reason: host-wide drops of other kinds must not use up
                      # the first-drop log budget (10/s, burst 100) before ours
                      "--drop-logs", "--drop-reasons", "NETFILTER_DROP"), \
            TraceInstance(f"reason == {netfilter}") as trace:
        sent4 = send_udp(topo, "4", topo.b_ip4, port, sport4, n4)
        sent6 = send_udp(topo, "6", topo.b_ip6, port, sport6, n6)
        sent6x = send_udp(topo, "6x", topo.b_ip6, port, sport6x, n6)
        flow4 = {"destination.port": port, "source.port": sport4}
        flow6 = {"destination.port": port, "source.port": sport6}
        flow6x = {"destination.port": port, "source.port": sport6x}
        got4 = wait_total(rx, sent4, **flow4)
        got6 = wait_total(rx, sent6, **flow6)
        got6x = wait_total(rx, sent6x, **flow6x)
        # Log records travel on their own batch schedule: wait for them too.
        rx.wait_for(lambda: len([r for r in rx.records() if r["type"] == "log" and
                                 r["attributes"].get("destination.port") == port]) >= 3,
                    what="first-drop log records")
        records = rx.records()
        traced = trace.locations()
    assert (sent4, sent6, sent6x) == (n4, n6, n6)
    assert nft_packets(topo, "eodrops") == sent4 + sent6 + sent6x
    assert got4 == sent4 and got6 == sent6
    assert got6x == sent6x  # ports found behind an extension header
    for flow, src, dst, typ in ((flow4, topo.a_ip4, topo.b_ip4, "ipv4"),
                                (flow6, topo.a_ip6, topo.b_ip6, "ipv6"),
                                (flow6x, topo.a_ip6, topo.b_ip6, "ipv6")):
        points = flow_points(rx, **flow)
        attrs = {k: v for k, v in points[0]["attributes"].items()}
        assert attrs["network.drop.reason"] == "NETFILTER_DROP"
        assert attrs["source.address"] == src and attrs["destination.address"] == dst
        assert attrs["network.transport"] == "udp" and attrs["network.type"] == typ
        assert attrs["network.interface.name"] == topo.b_if
        assert all(p["attributes"] == points[0]["attributes"] for p in points)
        # The drop site is the function the kernel's own tracepoint output names.
        assert attrs["network.drop.location"] in traced, (attrs, traced)
    # One log record per new (reason, flow) pair, however many packets.
    logs = [r for r in records if r["type"] == "log"
            and r["attributes"].get("destination.port") == port]
    assert len(logs) == 3
    assert all("NETFILTER_DROP" in r["body"] for r in logs)


def test_udp_to_a_closed_port_is_no_socket(topo) -> None:
    port, sport4, sport6 = free_ports(3)
    n4, n6 = 400, 250
    udp4 = topo.snmp(topo.b, "Udp")["NoPorts"]
    with ReceiverProc(topo, topo.b) as rx, AgentProc(topo, topo.b, rx, "--signals", "drops"):
        sent4 = send_udp(topo, "4", topo.b_ip4, port, sport4, n4)
        sent6 = send_udp(topo, "6", topo.b_ip6, port, sport6, n6)
        got4 = wait_total(rx, sent4, **{"destination.port": port, "source.port": sport4})
        got6 = wait_total(rx, sent6, **{"destination.port": port, "source.port": sport6})
        reasons = by_attrs(rx.metrics(METRIC, **{"destination.port": port}),
                           "network.drop.reason", "network.type")
    no_ports4 = topo.snmp(topo.b, "Udp")["NoPorts"] - udp4
    assert no_ports4 == sent4 == n4  # the kernel's own count agrees with what was sent
    assert got4 == sent4 and got6 == sent6 == n6
    assert reasons == {("NO_SOCKET", "ipv4"): n4, ("NO_SOCKET", "ipv6"): n6}


def rss(agent: AgentProc) -> int:
    return psutil.Process(agent.proc.pid).memory_info().rss


def test_drop_storm_counted_exactly_memory_flat(topo) -> None:
    port, sport_warm, sport = free_ports(3)
    nft_drop_udp(topo, "eostorm", port)
    storm = 100_000
    with ReceiverProc(topo, topo.b) as rx, \
            AgentProc(topo, topo.b, rx, "--signals", "drops", interval=0.5) as agent:
        warm = send_udp(topo, "4", topo.b_ip4, port, sport_warm, 20_000)
        wait_total(rx, warm, **{"destination.port": port, "source.port": sport_warm})
        rss_warm = rss(agent)
        t0 = time.monotonic()
        sent = send_udp(topo, "4", topo.b_ip4, port, sport, storm)
        took = time.monotonic() - t0
        got = wait_total(rx, sent, **{"destination.port": port, "source.port": sport})
        rss_after = rss(agent)
        points = flow_points(rx, **{"destination.port": port, "source.port": sport})
        health = {n: metric_total(rx.metrics(f"ebpf_otlp.drops.{n}"))
                  for n in ("events", "table_full", "lost")}
    print(f"storm: {sent} packets in {took:.2f}s; agent RSS {rss_warm >> 20} -> "
          f"{rss_after >> 20} MiB; {len(points)} points")
    assert sent == storm
    assert nft_packets(topo, "eostorm") == warm + sent
    assert got == sent
    assert {p["attributes"]["network.drop.reason"] for p in points} == {"NETFILTER_DROP"}
    # The agent's own counters: it saw at least our drops and lost none.
    assert health["events"] >= warm + sent
    assert health["table_full"] == health["lost"] == 0
    # Flat: a drop storm costs no per-drop memory in user space.
    assert rss_after - rss_warm < 4 << 20, (rss_warm, rss_after)


def drops_object(table_size: int, **rodata: int):
    from ebpf_otlp.platform.bpfobj import BpfObject

    reasons = DropReasons.from_kernel()
    obj = BpfObject.open_packaged("drops")
    obj.rodata["reason_consumed"] = reasons.consumed
    obj.rodata["reason_not_specified"] = reasons.not_specified
    for name, value in rodata.items():
        obj.rodata[name] = value
    for t in ("drops_0", "drops_1"):
        obj.set_max_entries(t, table_size)
    obj.load()
    obj.programs["on_kfree_skb"].attach_tracepoint("skb", "kfree_skb")
    return obj, reasons


def my_rows(obj, table: str, ports: set[int]) -> dict[int, int]:
    """dport -> packets of the drained ``table`` rows whose destination port is ours."""
    from ebpf_otlp.signals.drops.decode import key_dtype, value_dtype

    keys, values = obj.maps[table].drain()
    k = keys.view(key_dtype()).reshape(-1)
    v = values.view(value_dtype()).reshape(-1)
    out: dict[int, int] = {}
    for i in range(len(k)):
        if int(k[i]["dport"]) in ports and int(k[i]["l4proto"]) == 17:
            out[int(k[i]["dport"])] = out.get(int(k[i]["dport"]), 0) + int(v[i]["packets"])
    return out


def test_tables_alternate_so_a_drain_never_races(topo) -> None:
    """Writing ``active`` (a .bss variable) moves new drops to the other table."""
    port, sport = free_ports(2)
    nft_drop_udp(topo, "eoflip", port)
    obj, _ = drops_object(4096)
    with obj:
        sent0 = send_udp(topo, "4", topo.b_ip4, port, sport, 30)
        obj.bss["active"] = 1
        sent1 = send_udp(topo, "4", topo.b_ip4, port, sport, 20)
        obj.detach_all()
        assert my_rows(obj, "drops_0", {port}) == {port: sent0}
        assert my_rows(obj, "drops_1", {port}) == {port: sent1}


def test_full_table_counts_every_drop_in_overflow(topo) -> None:
    """A 4-entry table and 12 dropped flows: nothing is lost, the rest is
    counted per reason, and every counted drop is in exactly one place."""
    ports = free_ports(12)
    table = "eofull"
    nft_drop_udp(topo, table, ports[0])
    for p in ports[1:]:
        topo.run(topo.b, "nft", "add", "rule", "inet", table, "input", "udp", "dport", str(p),
                 "counter", "drop")
    obj, reasons = drops_object(4)
    per_port = 10
    with obj:
        sent = sum(send_udp(topo, "4", topo.b_ip4, p, p, per_port) for p in ports)
        obj.detach_all()  # from here on the counters hold still
        stats = obj.maps["drop_stats"]
        events, table_full, lost = (stats.sum_u64(constant("drops", f"DROP_STAT_{n}"))
                                    for n in ("EVENTS", "TABLE_FULL", "OVERFLOW_LOST"))
        overflow = {int.from_bytes(k, "little"): int(obj.maps["drop_overflow"].per_cpu(v).sum())
                    for k, v in obj.maps["drop_overflow"].items()}
        keys, values = obj.maps["drops_0"].drain(delete=False)
        in_table = int(values.view("<u8").reshape(len(values), -1)[:, 0].sum())
        mine = my_rows(obj, "drops_0", set(ports))
    assert sent == nft_packets(topo, table) == 12 * per_port
    assert len(keys) <= 4 and len(mine) <= 4
    assert all(n == per_port for n in mine.values())  # a flow in the table is whole
    # The truth is nft's count of our packets: those not in the table are in the
    # overflow of their reason (other hosts' drops may add to it: the tracepoint is
    # host-wide), and none was lost.
    nf = reasons.value("NETFILTER_DROP")
    assert overflow.get(nf, 0) >= sent - sum(mine.values()) > 0
    assert lost == 0 and table_full >= sent - sum(mine.values())
    assert events >= in_table


@pytest.mark.parametrize("rodata", [
    {"reason_consumed": "NETFILTER_DROP"},
    {"reason_not_specified": "NETFILTER_DROP", "exclude_not_specified": 1},
    {"reason_not_specified": "NETFILTER_DROP", "exclude_not_specified": 0},
], ids=["consumed", "not-specified-excluded", "not-specified-kept"])
def test_frees_that_are_not_drops_are_filtered_in_the_kernel(topo, rodata) -> None:
    """The filter values travel as .rodata: stand NETFILTER_DROP in for the
    reason being filtered and watch its drops disappear (or not)."""
    port, sport = free_ports(2)
    nft_drop_udp(topo, "eofilter", port)
    nf = DropReasons.from_kernel().value("NETFILTER_DROP")
    values = {k: nf if v == "NETFILTER_DROP" else v for k, v in rodata.items()}
    obj, _ = drops_object(4096, **values)
    with obj:
        sent = send_udp(topo, "4", topo.b_ip4, port, sport, 40)
        obj.detach_all()
        got = my_rows(obj, "drops_0", {port})
    assert nft_packets(topo, "eofilter") == sent == 40
    filtered = rodata.get("exclude_not_specified", 1) == 1
    assert got == ({} if filtered else {port: sent})


@pytest.mark.parametrize("wanted", ["NETFILTER_DROP", "NO_SOCKET"])
def test_reason_filter_in_the_kernel(topo, wanted: str) -> None:
    """With the reason filter on, only the wanted reason is counted: nft drops
    on one port (NETFILTER_DROP), datagrams to a closed port (NO_SOCKET)."""
    import numpy as np

    nft_port, closed_port, sport = free_ports(3)
    nft_drop_udp(topo, "eoreason", nft_port)
    reasons = DropReasons.from_kernel()
    bits = np.zeros(constant("drops", "DROP_REASON_WORDS"), "<u8")
    v = reasons.value(wanted)
    bits[v >> 6] |= np.uint64(1 << (v & 63))
    obj, _ = drops_object(4096, reason_filter=1, reason_bits=bits.tobytes())
    with obj:
        sent_nft = send_udp(topo, "4", topo.b_ip4, nft_port, sport, 30)
        sent_closed = send_udp(topo, "4", topo.b_ip4, closed_port, sport, 20)
        obj.detach_all()
        got = my_rows(obj, "drops_0", {nft_port, closed_port})
    assert nft_packets(topo, "eoreason") == sent_nft == 30
    want = {nft_port: sent_nft} if wanted == "NETFILTER_DROP" else {closed_port: sent_closed}
    assert got == want
