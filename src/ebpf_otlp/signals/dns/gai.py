"""getaddrinfo() latency per process, from uprobes on libc.

The wire view (TC) misses lookups answered without a packet: from nscd or
systemd-resolved's cache, from /etc/hosts, or failing before sending. The
uprobe pair on ``getaddrinfo`` sees what the application waited for. Exported
as its own histogram, ``dns.getaddrinfo.duration``, so it never mixes with
the wire-level ``dns.lookup.duration``.

Only processes that map the same libc file as the agent are covered (the
uprobe is attached to that file): on a host with containers, those using
another libc image are not.
"""

from __future__ import annotations

import socket

import numpy as np

from ...otlp.histogram import BatchHistogram

# EAI_* codes as this libc defines them (negative on glibc), from Python's socket module.
EAI_NAMES = {getattr(socket, n): n for n in dir(socket)
             if n.startswith("EAI_") and isinstance(getattr(socket, n), int)}


class GaiMetrics:
    """Turns ``struct gai_event`` batches into ``dns.getaddrinfo.duration``."""

    def __init__(self, histogram: BatchHistogram, names: bool):
        self.histogram = histogram
        self.names = names
        self.calls = 0
        # cgroup id -> resource attributes (signals/attribution.py); None: off
        self.resource = None

    def on_batch(self, recs: np.ndarray) -> None:
        items = []
        comms = [c.split(b"\0", 1)[0].decode(errors="replace") for c in
                 recs["comm"].view(f"S{recs['comm'].shape[1]}").ravel().tolist()]
        qnames = ([n.split(b"\0", 1)[0].decode(errors="replace").rstrip(".").lower() for n in
                   recs["name"].view(f"S{recs['name'].shape[1]}").ravel().tolist()]
                  if self.names else None)
        res = None
        if self.resource is not None:
            by_cg = {c: tuple(self.resource(c, 0).items())
                     for c in set(recs["cgroup_id"].tolist())}
            res = [by_cg[c] for c in recs["cgroup_id"].tolist()]
        for i, (ret, dur) in enumerate(zip(recs["ret"].tolist(), recs["duration_ns"].tolist())):
            key: tuple = (("process.executable.name", comms[i]),)
            if ret != 0:
                key += (("error.type", EAI_NAMES.get(ret, str(ret))),)
            if qnames is not None:
                key += (("dns.question.name", qnames[i]),)
            if res is not None:
                key += res[i]
            items.append((key, dur / 1e9))
        self.calls += len(items)
        self.histogram.record_batch(items)
