"""Which container and pod a cgroup id, a network namespace or an interface
belongs to, resolved on the host with bounded caches.

- cgroup id (sockets, uprobes) -> path (:class:`~.cgroups.CgroupPaths`) ->
  :func:`~.containers.parse_cgroup_path`. cgroup ids are never reused, so
  these entries live until evicted (LRU).
- network namespace inode (drops, sockets) -> its processes (``/proc``) ->
  their cgroups -> the pod; the container too when every process in the
  namespace is in one container (a Kubernetes pod's namespace also holds
  its sandbox, so there it is the pod alone). Namespace inodes are reused
  after a namespace dies, so these entries expire after ``ttl_s``.
- interface index (flows, DNS at TC) -> the namespace of its veth peer
  (rtnetlink) -> as above; expires after ``ttl_s`` too (interfaces come back
  with new indexes, and a pod's address can change).

Every cache counts its evictions (``evictions()``); nothing here raises on
bad input: an unknown id resolves to no workload.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .cgroups import BoundedCache, CgroupPaths, pid_cgroup
from .containers import NONE, Workload, parse_cgroup_path
from .netns import ProcessTable, Rtnl, link_peer, local_addresses, netns_inode

log = logging.getLogger(__name__)

LEVELS = ("none", "namespace", "container", "process")


@dataclass(frozen=True)
class Attribution:
    """A resolved origin: the workload and, for a pod's namespace, its addresses."""

    workload: Workload = NONE
    pod_ip: str = ""
    netns: int = 0

    def resource(self, level: str, node_name: str = "") -> dict[str, str]:
        """Resource attributes at attribution ``level`` (empty: the host's resource)."""
        if level == "none" or not self.workload:
            return {}
        w = self.workload
        if level == "namespace":
            w = Workload(pod_uid=w.pod_uid)
            if not w:
                return {}
        out = w.attributes()
        if self.pod_ip and w.pod_uid:
            out["k8s.pod.ip"] = self.pod_ip
        if node_name:
            out["k8s.node.name"] = node_name
        return out


HOST = Attribution()


class WorkloadResolver:
    """Resolves cgroup ids, namespaces and interfaces to :class:`Attribution`."""

    def __init__(self, cgroup_mount: str | None = None, cap: int = 16384, ttl_s: float = 30.0,
                 proc: str = "/proc"):
        self.paths = CgroupPaths(cgroup_mount, cap=cap)
        self.by_path = BoundedCache(cap)
        self.by_ns = BoundedCache(cap)
        self.by_if = BoundedCache(1024)
        self.procs = ProcessTable(proc)
        self.proc = proc
        self.ttl_s = ttl_s
        self.host_netns = netns_inode("self", proc)
        self.errors = 0
        self._rtnl: Rtnl | None = None

    def close(self) -> None:
        self.paths.close()
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    def evictions(self) -> dict[str, int]:
        return {"cgroup_path": self.paths.cache.evictions, "cgroup": self.by_path.evictions,
                "netns": self.by_ns.evictions, "interface": self.by_if.evictions}

    # --- cgroups -----------------------------------------------------------------
    def workload_of_path(self, path: str) -> Workload:
        w = self.by_path.get_lru(path)
        if w is None:
            w = parse_cgroup_path(path)
            self.by_path.put(path, w)
        return w  # type: ignore[return-value]

    def by_cgroup(self, cgid: int) -> Workload:
        """The workload of cgroup v2 id ``cgid`` (NONE when unknown or the host's)."""
        if not cgid:
            return NONE
        path = self.paths.path(int(cgid))
        return self.workload_of_path(path) if path else NONE

    def by_pid(self, pid: int) -> Workload:
        path = pid_cgroup(pid, self.proc)
        return self.workload_of_path(path) if path else NONE

    # --- network namespaces -----------------------------------------------------------
    def by_netns(self, inode: int) -> Attribution:
        """The pod (and container, when unambiguous) whose namespace is ``inode``."""
        if not inode or inode == self.host_netns:
            return HOST
        now = time.monotonic()
        hit = self.by_ns.get_lru(inode)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        a = self._resolve_netns(inode)
        # An unknown namespace is retried after a second, a known one after ttl_s.
        self.by_ns.put(inode, (now - (self.ttl_s - 1.0 if not a.workload else 0.0), a))
        return a

    def _resolve_netns(self, inode: int) -> Attribution:
        try:
            pids = self.procs.pids(inode)
            seen = {self.workload_of_path(p) for p in
                    (pid_cgroup(pid, self.proc) for pid in pids) if p}
            seen.discard(NONE)
            if not seen:
                return Attribution(netns=inode)
            uids = {w.pod_uid for w in seen if w.pod_uid}
            cids = {(w.container_id, w.runtime) for w in seen if w.container_id}
            uid = uids.pop() if len(uids) == 1 else ""
            cid, rt = cids.pop() if len(cids) == 1 else ("", "")
            addrs = local_addresses(pids[0], self.proc) if uid else []
            return Attribution(Workload(cid, rt, uid), addrs[0] if addrs else "", inode)
        except Exception:  # a process vanishing mid-read must not stop a signal
            self.errors += 1
            log.debug("netns %d not resolved", inode, exc_info=True)
            return Attribution(netns=inode)

    # --- interfaces ------------------------------------------------------------------
    def by_ifindex(self, ifindex: int) -> Attribution:
        """The workload at the far end of host interface ``ifindex`` (a veth whose
        peer lives in another namespace); HOST for any other interface."""
        now = time.monotonic()
        hit = self.by_if.get_lru(ifindex)
        if hit is not None and now - hit[0] < min(self.ttl_s, 5.0):
            return hit[1]
        a = self._resolve_if(ifindex)
        self.by_if.put(ifindex, (now, a))
        return a

    def peer_netns(self, ifindex: int) -> int:
        """The inode of the namespace holding the peer of veth ``ifindex`` (0: none found)."""
        if self._rtnl is None:
            self._rtnl = Rtnl()
        peer = link_peer(self._rtnl, ifindex)
        if peer is None:
            return 0
        nsid = peer[0]
        for attempt in (False, True):
            self.procs.scan(force=attempt)
            for ino, pids in self.procs.by_netns.items():
                if ino != self.host_netns and self._rtnl.nsid_of_pid(pids[0]) == nsid:
                    return ino
        return 0

    def _resolve_if(self, ifindex: int) -> Attribution:
        try:
            ino = self.peer_netns(ifindex)
        except OSError:
            self.errors += 1
            return HOST
        if not ino or ino == self.host_netns:
            return HOST
        # A new interface into a known namespace (a pod's container restarted): what
        # runs there may have changed, so the namespace is looked at afresh.
        a = self._resolve_netns(ino)
        self.by_ns.put(ino, (time.monotonic(), a))
        return a
