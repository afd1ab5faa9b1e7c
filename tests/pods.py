""""Pods" as the kernel sees them, without Kubernetes: a node namespace (the
agent's host), and per pod a network namespace joined to the node by a veth
plus a cgroup v2 directory named exactly as a runtime names it, with
processes in both. Everything (processes, cgroups, namespaces) is removed
on exit; cgroups live under one unique test directory of the cgroup2 mount.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ebpf_otlp.lab import sh
from ebpf_otlp.platform.host import cgroup2_mount

_n = itertools.count()


# A TCP server that reads each connection to its end and closes it (argv[1]: port).
SINK_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(65536):
        pass
    c.close()
"""


def cgroup_name(scheme: str, uid: str, cid: str) -> str:
    """The cgroup path (relative) a runtime gives a container of pod ``uid``."""
    u = uid.replace("-", "_")
    pod_slice = (f"kubepods.slice/kubepods-besteffort.slice/"
                 f"kubepods-besteffort-pod{u}.slice")
    return {
        "containerd": f"{pod_slice}/cri-containerd-{cid}.scope",  # kubelet+containerd, systemd
        "crio": f"{pod_slice}/crio-{cid}.scope",
        "docker": f"system.slice/docker-{cid}.scope",  # plain Docker: no pod
        "cgroupfs": f"kubepods/besteffort/pod{uid}/{cid}",
    }[scheme]


@dataclass
class Pod:
    name: str  # its network namespace
    node_if: str  # the veth end in the node namespace
    ip: str
    gw: str
    uid: str
    cid: str
    scheme: str
    cgroup: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    netns: int = 0  # the namespace's inode


    @property
    def pod_uid(self) -> str | None:
        return None if self.scheme == "docker" else self.uid


class PodLab:
    """Node namespace + ``len(schemes)`` pods, pod i at 10.2<k>.i.2 behind node 10.2<k>.i.1."""

    def __init__(self, schemes: list[str]):
        k = f"{os.getpid() % 10000}{next(_n)}"
        self.tag = k
        self.node = f"eo{k}n"
        mount = cgroup2_mount()
        if not mount:
            raise RuntimeError("no cgroup2 mount")
        self.cg_root = Path(mount) / f"ebpf-otlp-test-{k}"
        self.schemes = schemes
        self.pods: list[Pod] = []
        self.procs: list[subprocess.Popen] = []
        self._net = 180 + (os.getpid() + int(k)) % 60
        self.host_cgroup = self.cg_root / "node.slice"  # the node's own processes

    def __enter__(self) -> PodLab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        sh("ip", "netns", "add", self.node)
        sh("ip", "-n", self.node, "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.node)
        self.cg_root.mkdir()
        self.host_cgroup.mkdir()
        for i, scheme in enumerate(self.schemes):
            uid = str(uuid.uuid4())
            cid = secrets.token_hex(32)
            pod = Pod(f"eo{self.tag}p{i}", f"eo{self.tag}v{i}", f"10.{self._net}.{i}.2",
                      f"10.{self._net}.{i}.1", uid, cid, scheme,
                      self.cg_root / cgroup_name(scheme, uid, cid))
            sh("ip", "netns", "add", pod.name)
            pod.netns = os.stat(f"/run/netns/{pod.name}").st_ino
            sh("ip", "-n", pod.name, "link", "set", "lo", "up")
            self.pods.append(pod)
            self.plug(pod)
            pod.cgroup.mkdir(parents=True)
            self.run(pod, "sleep", "3600")  # keeps the namespace populated, as a pod's are

    def plug(self, pod: Pod) -> None:
        """(Re)create the pod's veth: node end in the node namespace, eth0 in the pod."""
        tmp = f"eo{self.tag}t"
        sh("ip", "link", "add", tmp, "type", "veth", "peer", "name", "eth0", "netns", pod.name)
        sh("ip", "link", "set", tmp, "netns", self.node, "name", pod.node_if)
        sh("ip", "-n", self.node, "addr", "add", f"{pod.gw}/24", "dev", pod.node_if)
        sh("ip", "-n", self.node, "link", "set", pod.node_if, "up")
        sh("ip", "-n", pod.name, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        sh("ip", "-n", pod.name, "link", "set", "eth0", "up")
        sh("ip", "-n", pod.name, "route", "add", "default", "via", pod.gw)

    def unplug(self, pod: Pod) -> None:
        sh("ip", "-n", self.node, "link", "del", pod.node_if)

    def restart(self, pod: Pod) -> None:
        """A container restart: processes gone, interface deleted, a new container id and
        cgroup, the interface created again."""
        for p in pod.procs:
            _kill(p)
        pod.procs.clear()
        self.unplug(pod)
        pod.cgroup.rmdir()
        pod.cid = secrets.token_hex(32)
        pod.cgroup = self.cg_root / cgroup_name(pod.scheme, pod.uid, pod.cid)
        pod.cgroup.mkdir(parents=True)
        self.plug(pod)
        self.run(pod, "sleep", "3600")

    def run(self, pod: Pod | None, *argv: str, cgroup: Path | None = None,
            **kw) -> subprocess.Popen:
        """Start ``argv`` in the pod's namespace and cgroup (the node's namespace and
        a plain cgroup when ``pod`` is None)."""
        ns = pod.name if pod else self.node
        cg = cgroup or (pod.cgroup if pod else self.host_cgroup)

        def enter() -> None:  # in the child, before exec: the cgroup first
            if cg is not None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], preexec_fn=enter, **kw)
        (pod.procs if pod else self.procs).append(p)
        return p

    def exec(self, pod: Pod | None, *argv: str, timeout: float = 60) -> str:
        p = self.run(pod, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{argv} failed ({p.returncode}): {err.strip()}")
        return out

    def popen(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        """Like Topology.popen (receiver and agent helpers): namespace only, our cgroup."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

    def move(self, pid: int, cgroup: Path) -> None:
        (cgroup / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for p in [*self.procs, *(q for pod in self.pods for q in pod.procs)]:
            _kill(p)
        for pod in self.pods:
            sh("ip", "netns", "del", pod.name, check=False)
        sh("ip", "netns", "del", self.node, check=False)
        if self.cg_root.exists():
            dirs = sorted((d for d in self.cg_root.rglob("*") if d.is_dir()),
                          key=lambda d: len(d.parts), reverse=True)
            for d in [*dirs, self.cg_root]:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except OSError:
                        time.sleep(0.05)  # a killed process leaves its cgroup a moment later

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
