"""Workload attribution shared by the signals of one agent run.

Signals hand in what the kernel gave them (a socket's cgroup id and network
namespace, a drop's namespace, an interface index) and get back the
resource attributes of the pod or container it belongs to, at the level
``--attribution`` chose:

- ``none``: nothing; everything stays under the host resource;
- ``namespace``: the pod (``k8s.pod.uid``, ``k8s.pod.ip``) of a network namespace;
- ``container`` (default): also ``container.id`` / ``container.runtime.name``,
  from the socket's cgroup (socket signals) or from the namespace when one
  container owns it (interface and drop signals);
- ``process``: also ``process.pid`` and ``process.executable.name`` on
  connection metrics (spans always carry them).

The attributes go to the points of SDK instruments and bulk histograms,
where the otlp layer moves them onto a Resource of their own
(:mod:`ebpf_otlp.otlp.resources`), or as an explicit resource key to the
sums and span paths. Host traffic gets none, so it keeps the host resource.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ..otlp.resources import ResourceKey, resource_key
from ..platform.workloads import HOST, LEVELS, Attribution, WorkloadResolver

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..otlp import Exporter

log = logging.getLogger(__name__)

SOCKET_TTL_S = 5.0  # a namespace's address may change; cgroup ids never do
SOCKET_CACHE = 16384  # (cgroup, netns) pairs remembered
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class Attributor:
    """Resolves kernel identifiers to resource attributes (thread-safe, cached)."""

    def __init__(self, level: str = "container", node_name: str = "",
                 resolver: WorkloadResolver | None = None):
        if level not in LEVELS:
            raise ValueError(f"attribution level must be one of {', '.join(LEVELS)}")
        self.level = level
        self.node_name = node_name
        self.resolver = resolver if resolver is not None or level == "none" else \
            WorkloadResolver()
        self._lock = threading.Lock()
        # (cgroup, netns) -> (when, attributes, their resource key)
        self._sockets: dict[tuple[int, int],
                            tuple[float, dict[str, str], ResourceKey | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.level != "none"

    @property
    def per_process(self) -> bool:
        return self.level == "process"

    def kernel_flags(self) -> dict[str, int]:
        """The rodata of the socket-level BPF objects (tcp, http): which of a socket's
        cgroup id and namespace the kernel keeps. A level that does not use one has it
        zeroed in the kernel, so counter keys do not split on it (one key where there
        would be one per cgroup) and records carry nothing to resolve."""
        return {"keep_cgroup": int(self.level in ("container", "process")),
                "keep_netns": int(self.level != "none")}

    def close(self) -> None:
        if self.resolver is not None:
            self.resolver.close()

    # --- lookups (any thread) ---------------------------------------------------------
    def socket(self, cgroup_id: int, netns: int) -> dict[str, str]:
        """A socket's resource attributes: its cgroup decides the container, its
        namespace the pod's address (and the pod, where the cgroup names none)."""
        return self.socket_resource(cgroup_id, netns)[0]

    def socket_resource(self, cgroup_id: int, netns: int
                        ) -> tuple[dict[str, str], ResourceKey | None]:
        """:meth:`socket` and the resource key of its answer, both cached (a span
        path needs the key per connection: sorting it each time cost more than the
        rest of the lookup, bench/attribution.py)."""
        if self.resolver is None:
            return {}, None
        key = (cgroup_id, netns)
        now = time.monotonic()
        hit = self._sockets.get(key)
        if hit is not None and now - hit[0] < SOCKET_TTL_S:
            return hit[1], hit[2]
        out = self._socket(cgroup_id, netns)
        if len(self._sockets) >= SOCKET_CACHE:
            self._sockets.clear()  # bounded; entries are cheap to recompute
        rkey = resource_key(out)
        self._sockets[key] = (now, out, rkey)
        return out, rkey

    def _socket(self, cgroup_id: int, netns: int) -> dict[str, str]:
        with self._lock:
            ns = self.resolver.by_netns(netns) if netns else HOST
            if self.level == "namespace":
                return ns.resource("namespace", self.node_name)
            w = self.resolver.by_cgroup(cgroup_id)
            if w:
                ip = ns.pod_ip if ns.workload.pod_uid == w.pod_uid else ""
                return Attribution(w, ip, netns).resource(self.level, self.node_name)
            return ns.resource(self.level, self.node_name)

    def netns(self, inode: int) -> dict[str, str]:
        """The resource attributes of whatever owns network namespace ``inode``."""
        if self.resolver is None or not inode:
            return {}
        with self._lock:
            return self.resolver.by_netns(inode).resource(self.level, self.node_name)

    def interface(self, ifindex: int) -> dict[str, str]:
        """The resource attributes of the workload behind host interface ``ifindex``."""
        if self.resolver is None or not ifindex:
            return {}
        with self._lock:
            return self.resolver.by_ifindex(ifindex).resource(self.level, self.node_name)

    @staticmethod
    def key(attrs: dict[str, str]) -> ResourceKey | None:
        return resource_key(attrs)

    # --- health ------------------------------------------------------------------------
    def register_health(self, exporter: Exporter) -> None:
        r = self.resolver
        if r is None:
            return
        exporter.observe("ebpf_otlp.attribution.cache.evictions", "{entry}",
                         "entries evicted from the bounded attribution caches, by cache",
                         lambda: [(n, {"cache": c}) for c, n in r.evictions().items()])
        exporter.observe("ebpf_otlp.attribution.unresolved", "{lookup}",
                         "lookups that found nothing: cgroup ids no longer on the host, "
                         "namespace or netlink read errors",
                         lambda: [(r.paths.unresolved, {"what": "cgroup"}),
                                  (r.errors, {"what": "netns"})])
        exporter.observe("ebpf_otlp.attribution.lookups", "{lookup}",
                         "cgroup id lookups, and how many missed the cache",
                         lambda: [(r.paths.lookups, {"cache": "hit_or_miss"}),
                                  (r.paths.misses, {"cache": "miss"})])


def shared(config: AgentConfig, exporter: Exporter) -> Attributor:
    """The one :class:`Attributor` of the agent run that owns ``exporter``."""
    with _LOCK:
        a = _SHARED.get(exporter)
        if a is None:
            a = Attributor(getattr(config, "attribution", "container"),
                           getattr(config, "node_name", ""))
            a.register_health(exporter)
            weakref.finalize(exporter, a.close)
            _SHARED[exporter] = a
        return a
