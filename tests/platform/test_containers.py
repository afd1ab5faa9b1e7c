"""The cgroup-path parser: one case per documented naming scheme (each row of
CONTAINER_SCHEMES carries its example), plus the cases that must not match."""

from __future__ import annotations

import pytest

from ebpf_otlp.platform.containers import (
    CONTAINER_SCHEMES,
    POD_EXAMPLES,
    Workload,
    parse_cgroup_path,
)

CID = "0123456789abcdef" * 4
UID = "1f2e3d4c-5b6a-4789-8abc-def012345678"
UU = UID.replace("-", "_")
KP = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UU}.slice"


@pytest.mark.parametrize("scheme", CONTAINER_SCHEMES, ids=lambda s: s.example)
def test_every_scheme_row(scheme):
    w = parse_cgroup_path(scheme.example)
    assert w.container_id == CID and w.runtime == scheme.runtime, w
    assert w.pod_uid == (UID if "kubepods" in scheme.example else ""), w


@pytest.mark.parametrize("path", POD_EXAMPLES)
def test_pod_cgroups_without_container(path):
    assert parse_cgroup_path(path) == Workload(pod_uid=UID)


CASES = [
    # documented paths, written out once more by hand
    (f"{KP}/cri-containerd-{CID}.scope", Workload(CID, "containerd", UID)),
    (f"/kubepods.slice/kubepods-pod{UU}.slice/cri-containerd-{CID}.scope",
     Workload(CID, "containerd", UID)),  # Guaranteed QoS: no QoS slice
    (f"/kubepods/pod{UID}/{CID}", Workload(CID, "containerd", UID)),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", Workload(CID, "cri-o", UID)),
    (f"{KP}/crio-{CID}.scope", Workload(CID, "cri-o", UID)),
    (f"{KP}/docker-{CID}.scope", Workload(CID, "docker", UID)),  # cri-dockerd
    (f"/docker/{CID}", Workload(CID, "docker", "")),
    (f"/system.slice/docker-{CID}.scope", Workload(CID, "docker", "")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
     Workload(CID, "podman", "")),  # rootless Podman
    # a container's own sub-cgroups (systemd inside, cgroup namespaces)
    (f"{KP}/cri-containerd-{CID}.scope/init.scope", Workload(CID, "containerd", UID)),
    # mounted somewhere else, or seen through a prefix (nested hierarchies)
    (f"/some/parent{KP}/cri-containerd-{CID}.scope", Workload(CID, "containerd", UID)),
    # not containers
    ("/", Workload()),
    ("/system.slice/ssh.service", Workload()),
    ("/user.slice/user-0.slice/session-1.scope", Workload()),
    (f"{KP}/crio-conmon-{CID}.scope", Workload(pod_uid=UID)),  # CRI-O's monitor
    (f"/machine.slice/libpod-conmon-{CID}.scope", Workload()),
    (f"/{CID}", Workload()),  # a bare id outside kubepods and docker: unknown
    (f"/kubepods/burstable/pod{UID}/{CID[:-1]}", Workload(pod_uid=UID)),  # 63 hex
    (f"/kubepods/burstable/pod{UID}/{CID.upper()}", Workload(pod_uid=UID)),
    ("/kubepods.slice/kubepods-podnot_a_uid.slice", Workload()),
    ("", Workload()),
]


@pytest.mark.parametrize("path,want", CASES)
def test_paths(path, want):
    assert parse_cgroup_path(path) == want


def test_attributes_use_semantic_convention_names():
    w = parse_cgroup_path(f"{KP}/cri-containerd-{CID}.scope")
    assert w.attributes() == {"k8s.pod.uid": UID, "container.id": CID,
                              "container.runtime.name": "containerd"}
    assert parse_cgroup_path("/").attributes() == {}


def test_hostile_input_never_raises():
    for p in ("/" * 10000, "\0\n", "kubepods-pod" + "_" * 5000 + ".slice", "💥/docker/x"):
        assert isinstance(parse_cgroup_path(p), Workload)
