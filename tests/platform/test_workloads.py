"""Host-side resolution against real kernel objects: cgroup v2 directories
named as the runtimes name them, network namespaces with processes in them,
veths whose far end is in a pod's namespace. Truth: what the test created
(uid, container id, addresses) and the kernel's own ids (directory inodes,
/proc/PID/ns/net)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from pods import PodLab

from ebpf_otlp.platform.cgroups import CgroupPaths, cgroup_id
from ebpf_otlp.platform.workloads import WorkloadResolver

pytestmark = pytest.mark.kernel

PROBE = r"""
import json, socket, sys
from ebpf_otlp.platform.workloads import WorkloadResolver
args = json.loads(sys.argv[1])
r = WorkloadResolver()
out = []
for p in args:
    c = r.by_cgroup(p["cgid"])
    n = r.by_netns(p["netns"])
    i = r.by_ifindex(socket.if_nametoindex(p["ifname"]))
    out.append({"cgroup": [c.pod_uid, c.container_id, c.runtime],
                "netns": [n.workload.pod_uid, n.workload.container_id, n.pod_ip],
                "iface": [i.workload.pod_uid, i.workload.container_id, i.pod_ip, i.netns]})
out.append({"lo": r.by_ifindex(1).workload.pod_uid,
            "host": r.by_netns(r.host_netns) == r.by_netns(0)})
print(json.dumps(out))
"""


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.mark.parametrize("schemes", [["containerd", "crio"], ["cgroupfs", "docker"]])
def test_resolves_pods_by_cgroup_netns_and_interface(schemes):
    with PodLab(schemes) as lab:
        procs = [lab.run(p, "sleep", "60") for p in lab.pods]
        args = [{"cgid": cgroup_id(str(p.cgroup)), "netns": 0, "ifname": p.node_if}
                for p in lab.pods]
        for a, proc in zip(args, procs):
            # the sleeper is in its pod's namespace once `ip netns exec` has exec'd
            for _ in range(100):
                a["netns"] = netns_inode(proc.pid)
                if a["netns"] != netns_inode(os.getpid()):
                    break
                time.sleep(0.02)
        # The agent's view: from inside the node namespace (/sys remounted there, so the
        # cgroup2 root is a private detached mount).
        out = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-c", PROBE,
                              json.dumps(args)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        for pod, a, g in zip(lab.pods, args, got):
            uid = pod.pod_uid or ""
            runtime = {"containerd": "containerd", "crio": "cri-o", "docker": "docker",
                       "cgroupfs": "containerd"}[pod.scheme]
            assert g["cgroup"] == [uid, pod.cid, runtime], (pod, g)
            assert g["netns"] == [uid, pod.cid, pod.ip if uid else ""], (pod, g)
            assert g["iface"] == [uid, pod.cid, pod.ip if uid else "", a["netns"]], (pod, g)
        assert got[-1] == {"lo": "", "host": True}


def test_process_moving_between_cgroups():
    with PodLab(["containerd", "crio"]) as lab:
        a, b = lab.pods
        p = lab.run(a, "sleep", "60")
        r = WorkloadResolver()
        try:
            assert r.by_pid(p.pid).container_id == a.cid
            lab.move(p.pid, b.cgroup)
            assert r.by_pid(p.pid).container_id == b.cid
            assert r.by_pid(p.pid).runtime == "cri-o"
        finally:
            r.close()


def test_cgroup_cache_is_bounded_and_counts_evictions():
    with PodLab(["containerd", "crio", "docker"]) as lab:
        paths = CgroupPaths(cap=2)
        try:
            ids = [cgroup_id(str(p.cgroup)) for p in lab.pods]
            for _ in range(2):
                for i, pod in zip(ids, lab.pods):
                    assert paths.path(i).endswith(pod.cgroup.name)
            assert len(paths.cache) == 2 and paths.cache.evictions >= 3
            assert paths.path(1 << 60) is None and paths.unresolved == 1  # no such cgroup
        finally:
            paths.close()


def test_pod_namespace_of_several_containers_gives_the_pod_alone():
    """A pod whose namespace holds two containers (and its sandbox, as Kubernetes
    pods do): the namespace and the pod's interface name the pod (uid and address),
    not a container; each container's cgroup still names its own container."""
    with PodLab(["containerd"]) as lab:
        (pod,) = lab.pods
        others = [pod.cgroup.parent / f"cri-containerd-{c}.scope" for c in ("ab" * 32, "cd" * 32)]
        procs = [lab.run(pod, "sleep", "60")]
        for cg in others:
            cg.mkdir()
            procs.append(lab.run(pod, "sleep", "60", cgroup=cg))
        for _ in range(100):  # every sleeper in the pod's namespace ('ip netns exec' exec'd)
            if all(netns_inode(p.pid) == pod.netns for p in procs):
                break
            time.sleep(0.02)
        args = [{"cgid": cgroup_id(str(cg)), "netns": pod.netns, "ifname": pod.node_if}
                for cg in (pod.cgroup, *others)]
        out = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-c", PROBE,
                              json.dumps(args)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
    for cid, g in zip((pod.cid, "ab" * 32, "cd" * 32), got):
        assert g["cgroup"] == [pod.uid, cid, "containerd"], g  # sockets: their container
        assert g["netns"] == [pod.uid, "", pod.ip], g  # the namespace: the pod alone
        assert g["iface"] == [pod.uid, "", pod.ip, pod.netns], g
