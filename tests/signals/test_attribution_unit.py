"""--attribution levels on a resolver whose answers the test fixes."""

from __future__ import annotations

import pytest

from ebpf_otlp.platform.containers import Workload
from ebpf_otlp.platform.workloads import HOST, Attribution
from ebpf_otlp.signals.attribution import Attributor

CID = "ab" * 32
UID = "11111111-2222-4333-8444-555555555555"
POD = Attribution(Workload(CID, "containerd", UID), "10.0.0.7", 4026532000)


class FakeResolver:
    def __init__(self) -> None:
        self.calls = 0

    def by_netns(self, inode: int) -> Attribution:
        self.calls += 1
        return POD if inode == POD.netns else HOST

    def by_cgroup(self, cgid: int) -> Workload:
        self.calls += 1
        return POD.workload if cgid == 42 else Workload()

    def by_ifindex(self, ifindex: int) -> Attribution:
        return POD if ifindex == 7 else HOST

    def close(self) -> None:
        pass


@pytest.mark.parametrize("level,want", [
    ("none", {}),
    ("namespace", {"k8s.pod.uid": UID, "k8s.pod.ip": "10.0.0.7", "k8s.node.name": "n1"}),
    ("container", {"k8s.pod.uid": UID, "k8s.pod.ip": "10.0.0.7", "k8s.node.name": "n1",
                   "container.id": CID, "container.runtime.name": "containerd"}),
    ("process", {"k8s.pod.uid": UID, "k8s.pod.ip": "10.0.0.7", "k8s.node.name": "n1",
                 "container.id": CID, "container.runtime.name": "containerd"}),
])
def test_levels(level, want):
    a = Attributor(level, "n1", None if level == "none" else FakeResolver())
    assert a.socket(42, POD.netns) == want
    assert a.netns(POD.netns) == want
    assert a.interface(7) == want
    assert a.per_process == (level == "process")


def test_host_is_empty_and_socket_answers_are_cached():
    r = FakeResolver()
    a = Attributor("container", "n1", r)
    assert a.socket(1, 0) == {} and a.interface(3) == {} and a.netns(99) == {}
    calls = r.calls
    for _ in range(100):
        a.socket(42, POD.netns)
    assert r.calls <= calls + 2  # resolved once, then the bounded cache answers


def test_cgroup_outside_the_pod_namespace_keeps_no_pod_ip():
    a = Attributor("container", "", FakeResolver())
    # a container cgroup seen through a socket of another namespace (a process moved)
    assert a.socket(42, 0) == {"k8s.pod.uid": UID, "container.id": CID,
                               "container.runtime.name": "containerd"}


def test_unknown_level_is_refused():
    with pytest.raises(ValueError):
        Attributor("pods")
