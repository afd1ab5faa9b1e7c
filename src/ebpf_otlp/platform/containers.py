"""Container and pod identity from a cgroup v2 path, table-driven.

Each container runtime names the cgroup of a container after its id, in a
scheme that depends on the runtime and on the cgroup driver (systemd or
cgroupfs); the kubelet names each pod's cgroup after the pod's uid (with
``_`` for ``-`` under the systemd driver, where ``-`` separates slice
levels). One row of :data:`CONTAINER_SCHEMES` per documented scheme; the
first row whose pattern matches a path component (searched from the leaf
up) wins, so a container's own sub-cgroups (``.../<id>.scope/init``) still
resolve to it. tests/platform/test_containers.py has one case per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

_ID = r"(?P<id>[0-9a-f]{64})"


class Scheme(NamedTuple):
    runtime: str  # container.runtime.name
    pattern: re.Pattern  # matched against one path component
    needs_kubepods: bool  # only inside a kubepods hierarchy (a bare 64-hex name)
    example: str  # a documented path of this scheme (the tests use it)


def _s(runtime: str, pattern: str, example: str, needs_kubepods: bool = False) -> Scheme:
    return Scheme(runtime, re.compile(pattern), needs_kubepods, example)


_X = "0123456789abcdef" * 4  # 64 hex digits, for the examples
_U = "1f2e3d4c-5b6a-4789-8abc-def012345678"
_UU = _U.replace("-", "_")

CONTAINER_SCHEMES: tuple[Scheme, ...] = (
    # containerd CRI plugin, systemd cgroup driver
    _s("containerd", rf"^cri-containerd-{_ID}\.scope$",
       f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_UU}.slice/"
       f"cri-containerd-{_X}.scope"),
    # CRI-O, systemd driver (crio-conmon-<id>.scope is its monitor, not the container)
    _s("cri-o", rf"^crio-{_ID}\.scope$",
       f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_UU}.slice/"
       f"crio-{_X}.scope"),
    # CRI-O, cgroupfs driver
    _s("cri-o", rf"^crio-{_ID}$", f"/kubepods/besteffort/pod{_U}/crio-{_X}"),
    # Docker, systemd driver (also cri-dockerd pods under kubepods.slice)
    _s("docker", rf"^docker-{_ID}\.scope$", f"/system.slice/docker-{_X}.scope"),
    # Podman (rootful machine.slice, rootless user@.service), systemd driver
    _s("podman", rf"^libpod-{_ID}\.scope$", f"/machine.slice/libpod-{_X}.scope"),
    # Podman, cgroupfs driver
    _s("podman", rf"^libpod-{_ID}$", f"/libpod_parent/libpod-{_X}"),
    # nerdctl (containerd without CRI), systemd driver
    _s("containerd", rf"^nerdctl-{_ID}\.scope$", f"/system.slice/nerdctl-{_X}.scope"),
    # containerd CRI (or cri-dockerd), cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>
    _s("containerd", rf"^{_ID}$", f"/kubepods/burstable/pod{_U}/{_X}", needs_kubepods=True),
)
# Docker, cgroupfs driver: /docker/<id> (the parent names the runtime)
DOCKER_CGROUPFS = re.compile(rf"^{_ID}$")

# kubelet pod cgroups: systemd driver kubepods[-<qos>]-pod<uid with _>.slice,
# cgroupfs driver pod<uid>
POD_SYSTEMD = re.compile(
    r"^kubepods(?:-(?:besteffort|burstable|guaranteed))?-pod"
    r"(?P<uid>[0-9a-f]{8}[_-][0-9a-f]{4}[_-][0-9a-f]{4}[_-][0-9a-f]{4}[_-][0-9a-f]{12})\.slice$")
POD_CGROUPFS = re.compile(
    r"^pod(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
POD_EXAMPLES = (f"/kubepods.slice/kubepods-pod{_UU}.slice",  # Guaranteed QoS, systemd
                f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_UU}.slice",
                f"/kubepods/pod{_U}", f"/kubepods/burstable/pod{_U}")


@dataclass(frozen=True)
class Workload:
    """What a cgroup path says about its processes (empty strings: unknown)."""

    container_id: str = ""
    runtime: str = ""
    pod_uid: str = ""

    def attributes(self) -> dict[str, str]:
        """Resource attributes (semantic-convention names) of what is known."""
        out = {}
        if self.pod_uid:
            out["k8s.pod.uid"] = self.pod_uid
        if self.container_id:
            out["container.id"] = self.container_id
            out["container.runtime.name"] = self.runtime
        return out

    def __bool__(self) -> bool:
        return bool(self.container_id or self.pod_uid)


NONE = Workload()


def parse_cgroup_path(path: str) -> Workload:
    """The container and pod a cgroup v2 path (relative to any mount point) belongs to."""
    parts = [p for p in path.split("/") if p]
    in_kubepods = any(p == "kubepods" or p.startswith("kubepods.") or p.startswith("kubepods-")
                      for p in parts)
    cid = runtime = uid = ""
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i]
        if not cid:
            for sch in CONTAINER_SCHEMES:
                if sch.needs_kubepods and not in_kubepods:
                    continue
                m = sch.pattern.match(p)
                if m:
                    cid, runtime = m.group("id"), sch.runtime
                    break
            else:
                if i > 0 and parts[i - 1] == "docker" and DOCKER_CGROUPFS.match(p):
                    cid, runtime = p, "docker"
        if not uid:
            m = POD_SYSTEMD.match(p) or (POD_CGROUPFS.match(p) if in_kubepods else None)
            if m:
                uid = m.group("uid").replace("_", "-")
                break  # the pod is above its containers: nothing left to find
    if not cid and not uid:
        return NONE
    return Workload(cid, runtime, uid)
