"""``--attribution`` decides how far the kernel's counter keys split: at ``none`` no
key carries a cgroup or a pod namespace, at ``namespace`` no cgroup, so the maps
hold one key where they would hold one per cgroup (or namespace), and user space
has nothing to fold.

The real TCP and drops signals run in this process at each level; clients in three
(cgroup, namespace) pairs of a PodLab connect to one server (TCP), and the same
datagram is dropped in three pod namespaces and the node's own (drops). The
drained tables are read directly, our port's keys counted and compared with the
cgroups and namespaces the test made (their inodes are the ids the kernel uses)
and with the connections and datagrams sent."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
from pods import SINK_SERVER, PodLab

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.platform.layout import constant
from ebpf_otlp.signals.drops import DropsSignal
from ebpf_otlp.signals.drops.decode import key_dtype, own_netns, value_dtype
from ebpf_otlp.signals.tcp import TcpSignal
from ebpf_otlp.signals.tcp.records import CKEY
from ebpf_otlp.views.session import LocalExporter

pytestmark = pytest.mark.kernel

PY = sys.executable
CONNS = 2  # per client
DATAGRAMS = 5  # per namespace
SERVER = SINK_SERVER
CLIENT = """
import socket, sys
for _ in range(int(sys.argv[3])):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b"x"); c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    c.close()
"""
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    s.sendto(b"d" * 40, ("127.0.0.1", int(sys.argv[1])))
"""
OPENED = constant("tcp", "TCP_CNT_OPENED")
CLIENT_ROLE = constant("tcp", "TCP_ROLE_CLIENT")


def drain_both(obj, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [obj.maps[n].drain() for n in names]
    return (np.concatenate([k for k, _ in parts]) if parts else np.zeros((0, 0), np.uint8),
            np.concatenate([v for _, v in parts]))


@pytest.mark.parametrize("level,tcp_keys,drop_keys", [
    ("none", 1, 2), ("namespace", 2, 4), ("container", 3, 4)])
def test_kernel_keys_split_only_as_far_as_the_level_exports(level, tcp_keys, drop_keys):
    port, dport, sport = random.sample(range(20000, 60000), 3)
    cfg = AgentConfig(attribution=level)
    exporter = LocalExporter(cfg)
    tcp, drops = TcpSignal(cfg, exporter), DropsSignal(cfg, exporter)
    try:
        with PodLab(["containerd", "containerd", "crio"]) as lab:
            p0, p1, p2 = lab.pods
            tcp.start()
            drops.start()
            srv = lab.run(p0, PY, "-c", SERVER, str(port), stdout=subprocess.PIPE, text=True)
            assert srv.stdout.readline().strip() == "ready"
            # three (cgroup, namespace) pairs: two cgroups share p1's namespace
            clients = [(p1, p1.cgroup), (p1, p2.cgroup), (p2, p2.cgroup)]
            for pod, cg in clients:
                p = lab.run(pod, PY, "-c", CLIENT, p0.ip, str(port), str(CONNS), cgroup=cg)
                assert p.wait(60) == 0
            for pod in (p0, p1, p2):
                lab.exec(pod, PY, "-c", SEND, str(dport), str(sport), str(DATAGRAMS))
            subprocess.run([PY, "-c", SEND, str(dport), str(sport), str(DATAGRAMS)], check=True)
            truth_cg = {(os.stat(cg).st_ino, pod.netns) for pod, cg in clients}
            pod_ns = {p0.netns, p1.netns, p2.netns}
            tcp_obj, drops_obj = tcp.objects[0], drops.objects[0]
            tcp_obj.detach_all()
            drops_obj.detach_all()
            tk, tv = drain_both(tcp_obj, ("counters_a", "counters_b"))
            dk, dv = drain_both(drops_obj, ("drops_0", "drops_1"))
    finally:
        tcp.close()
        drops.close()
        exporter.shutdown(1.0)

    k = np.ascontiguousarray(tk[:, :CKEY.itemsize]).view(CKEY).reshape(-1)
    n = np.ascontiguousarray(tv[:, :8]).view("<u8").reshape(-1)
    mine = (k["sport"] == port) & (k["kind"] == OPENED) & (k["role"] == CLIENT_ROLE)
    got = {(int(c), int(ns)) for c, ns in zip(k["cgroup_id"][mine], k["netns"][mine])}
    assert int(n[mine].sum()) == CONNS * len(clients), "every client connection opened"
    assert len(got) == tcp_keys, (level, got)
    want = {"none": {(0, 0)}, "namespace": {(0, ns) for _, ns in truth_cg},
            "container": truth_cg}[level]
    assert got == want, (level, got, want)

    d = np.ascontiguousarray(dk[:, :key_dtype().itemsize]).view(key_dtype()).reshape(-1)
    dpk = np.ascontiguousarray(dv[:, :value_dtype().itemsize]).view(value_dtype()).reshape(-1)
    ours = (d["dport"] == dport) & (d["sport"] == sport) & (d["l4proto"] == 17)
    netns = {int(x) for x in d["netns"][ours]}
    assert int(dpk["packets"][ours].sum()) == DATAGRAMS * 4, "every datagram dropped once"
    assert len(netns) == drop_keys, (level, netns)
    # the node's own namespace stays named at every level (its interface indexes resolve)
    assert netns == ({0, own_netns()} if level == "none" else pod_ns | {own_netns()}), netns
