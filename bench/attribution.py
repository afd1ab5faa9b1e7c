"""Workload attribution: what it adds.

1. Resolving cgroups: 10,000 TCP close records, each from a socket in its own
   cgroup v2 directory (10,000 directories named as containerd names
   containers of 100 pods), decoded by the TCP signal's grouping
   (``AttributeMapper.groups``) with attribution (``--attribution container``)
   and without, cold (every cgroup id new: one ``open_by_handle_at`` each) and
   warm (the bounded cache holds them). Also the walk of the cgroup2 tree that
   replaces the handle lookup where CAP_DAC_READ_SEARCH is missing.
3. HTTP: 10,000 exchanges (one connection each) of 100 containers through the
   HTTP signal's ring callback (``HttpSignal.on_batch``: pairing, span and
   histogram mapping), with attribution (``container``: one resource lookup
   per new connection) and without.
2. Export size and encode time with attribution on vs off: 10,000 flow series
   behind 100 pod interfaces (one resource each) through the sums path, and
   10,000 connection spans of 100 containers through the span path.

    sudo .venv/bin/python -m bench.attribution [--quick]
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
import uuid
from pathlib import Path

import numpy as np

from .common import Figure, Result, command_for

NAME = "attribution"
TITLE = "Workload attribution: cgroup resolution and export size, on vs off"


def _cgroups(root: Path, n: int, pods: int) -> list[int]:
    uids = [str(uuid.uuid4()).replace("-", "_") for _ in range(pods)]
    ids = []
    for i in range(n):
        d = (root / "kubepods.slice" / "kubepods-besteffort.slice" /
             f"kubepods-besteffort-pod{uids[i % pods]}.slice" /
             f"cri-containerd-{secrets.token_hex(32)}.scope")
        d.mkdir(parents=True)
        ids.append(d.stat().st_ino)
    return ids


def _rmtree(root: Path) -> None:
    dirs = sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts),
                  reverse=True)
    for d in [*dirs, root]:
        try:
            d.rmdir()
        except OSError:
            pass


def resolve_cost(res: Result, n: int) -> None:
    from ebpf_otlp.platform.cgroups import CgroupPaths
    from ebpf_otlp.platform.host import cgroup2_mount
    from ebpf_otlp.platform.workloads import WorkloadResolver
    from ebpf_otlp.signals.attribution import Attributor
    from ebpf_otlp.signals.tcp.records import EVENT, AttributeMapper

    mount = cgroup2_mount()
    if not mount:
        res.status = "skipped"
        res.note("no cgroup2 mount")
        return
    root = Path(mount) / f"ebpf-otlp-bench-{os.getpid()}"
    root.mkdir()
    try:
        t0 = time.perf_counter()
        ids = _cgroups(root, n, 100)
        res.raw["mkdir_s"] = time.perf_counter() - t0
        recs = np.zeros(n, EVENT)
        recs["kind"], recs["role"] = 2, 1
        recs["saddr"][:, 10:12] = 0xFF
        recs["saddr"][:, 12:] = [10, 0, 0, 1]
        recs["sport"] = 80
        recs["pid"] = np.arange(n) + 1000
        recs["cgroup_id"] = ids

        def decode(mapper: AttributeMapper) -> float:
            t = time.perf_counter()
            mapper.groups(recs, process=True)
            return time.perf_counter() - t

        off = min(decode(AttributeMapper(("server.address", "server.port")))
                  for _ in range(3))
        a = Attributor("container", "node", WorkloadResolver(cap=2 * n))
        m = AttributeMapper(("server.address", "server.port"))
        m.resource = a.socket
        cold = decode(m)
        m._rows.clear()  # the resolver's caches stay warm, the mapper's row cache not
        warm = decode(m)
        groups = len(m.groups(recs, process=True)[1])
        # The common case: many connections of few containers (100 here), warm.
        few = recs.copy()
        few["cgroup_id"] = np.asarray(ids)[np.arange(n) % 100]
        m._rows.clear()
        m.groups(few, process=True)
        t = time.perf_counter()
        m.groups(few, process=True)
        few_on = time.perf_counter() - t
        m0 = AttributeMapper(("server.address", "server.port"))
        t = time.perf_counter()
        m0.groups(few, process=True)
        few_off = time.perf_counter() - t
        a.close()
        paths = CgroupPaths(cap=2 * n)
        paths._handles = False  # the walk fallback: one walk indexes the whole tree
        t = time.perf_counter()
        paths.path(ids[0])
        walk = time.perf_counter() - t
        t = time.perf_counter()
        found = sum(paths.path(i) is not None for i in ids)
        walk_rest = time.perf_counter() - t
        paths.close()
    finally:
        _rmtree(root)
    res.raw.update(decode_off_s=off, decode_cold_s=cold, decode_warm_s=warm, walk_s=walk,
                   groups=groups, walk_found=found)
    res.add(Figure.compare(f"decode {n:,} TCP records, {n:,} distinct cgroups, cold", cold,
                           "s", off, "attribution off",
                           note=f"{(cold - off) / n * 1e6:.1f} us added per new cgroup "
                                "(open_by_handle_at + readlink + parse)"))
    res.add(Figure.compare(f"decode {n:,} TCP records, {n:,} distinct cgroups, warm", warm,
                           "s", off, "attribution off",
                           note=f"{(warm - off) / n * 1e6:.1f} us added per record"))
    res.add(Figure.compare(f"decode {n:,} TCP records of 100 containers, warm", few_on, "s",
                           few_off, "attribution off",
                           note="one resource lookup per (container, attributes) group"))
    res.add(Figure(f"cgroup2 walk fallback, {n:,} cgroups", walk, "s",
                   note=f"one walk indexes every directory; the other {found - 1:,} "
                        f"lookups then took {walk_rest * 1e3:.1f} ms"))


def export_size(res: Result, n: int, pods: int = 100) -> None:
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.otlp import Exporter, SpanRecord
    from ebpf_otlp.otlp.resources import resource_key
    from ebpf_otlp.otlp.sums import SumMetric, point_attribute

    cfg = AgentConfig(endpoint="http://127.0.0.1:9")
    exp = Exporter(cfg.export_settings(), 1.0, cfg.cardinality_limit)
    bodies: list[int] = []
    exp.senders["metrics"].send = lambda body, _t=None, **_kw: bodies.append(len(body)) or True
    keys = [resource_key({"k8s.pod.uid": str(uuid.uuid4()), "container.id": secrets.token_hex(32),
                          "container.runtime.name": "containerd", "k8s.pod.ip": f"10.1.{i}.2",
                          "k8s.node.name": "node-1"}) for i in range(pods)]
    attrs = [point_attribute("source.address", f"10.1.{i % pods}.2")
             + point_attribute("destination.port", 1024 + i) for i in range(n)]
    values = np.ones((n, 3), np.uint64)
    start = np.zeros(n, np.uint64)
    metrics = [SumMetric("network.flow.bytes", "By", "", 1),
               SumMetric("network.flow.packets", "{packet}", "", 0)]
    index = np.arange(n) % pods
    out = {}
    for label, kw in (("off", {}), ("on", {"resources": keys, "resource_index": index})):
        bodies.clear()
        t = time.perf_counter()
        exp.send_sums(metrics, attrs, values, start, 1, **kw)
        out[label] = (sum(bodies), time.perf_counter() - t)
    res.add(Figure.compare(f"flow export, {n:,} series behind {pods} pods: bytes", out["on"][0],
                           "B", out["off"][0], "attribution off",
                           note=f"encode+hand-off {out['on'][1] * 1e3:.0f} ms vs "
                                f"{out['off'][1] * 1e3:.0f} ms"))
    enc = exp.spans.encoder
    now = time.time_ns()
    span_attrs = (("server.address", "10.1.0.2"), ("server.port", 80),
                  ("network.transport", "tcp"), ("process.pid", 1234))
    for label, res_of in (("off", lambda i: None), ("on", lambda i: keys[i % pods])):
        items = [SpanRecord(now, now + 1000, "tcp connect 80", span_attrs,
                            resource=res_of(i)) for i in range(n)]
        t = time.perf_counter()
        body = enc.request(items)
        out["span_" + label] = (len(body), time.perf_counter() - t)
    res.add(Figure.compare(f"span export, {n:,} spans of {pods} containers: bytes",
                           out["span_on"][0], "B", out["span_off"][0], "attribution off",
                           note=f"encode {out['span_on'][1] * 1e3:.0f} ms vs "
                                f"{out['span_off'][1] * 1e3:.0f} ms"))
    exp.shutdown(0.5)
    res.raw["export"] = out


def _http_records(n: int, ids: list[int]) -> np.ndarray:
    """A server's read of a request and write of its response on ``n`` connections,
    connection i in cgroup ``ids[i % len(ids)]`` (``struct http_event`` as built)."""
    from ebpf_otlp.signals.http.signal import OP_READ, OP_WRITE, event_dtype

    req = b"GET /items/42 HTTP/1.1\r\nHost: svc\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    r = np.zeros(2 * n, event_dtype(256))
    i = np.arange(2 * n)
    conn = i // 2
    r["start_ns"] = 1_000_000 + i * 1000
    r["end_ns"] = r["start_ns"] + 500
    r["conn"], r["pid"], r["tid"], r["fd"] = conn + 1, 4321, 4321, 7
    r["family"], r["lport"], r["rport"] = 4, 8080, 30000 + conn % 30000
    r["laddr"][:, 10:] = [255, 255, 10, 1, 0, 2]
    r["raddr"][:, 10:] = [255, 255, 10, 2, 0, 9]
    r["comm"][:, :3] = np.frombuffer(b"srv", np.uint8)
    r["cgroup_id"] = np.asarray(ids, np.uint64)[conn % len(ids)]
    r["ids"][::2] = 1  # as the kernel: the process's ids on its first record per connection
    for op, data, rows in ((OP_READ, req, i[::2]), (OP_WRITE, resp, i[1::2])):
        r["op"][rows], r["len"][rows], r["head_len"][rows] = op, len(data), len(data)
        r["head"][rows, :len(data)] = np.frombuffer(data, np.uint8)
    return r


def http_cost(res: Result, n: int, containers: int = 100) -> None:
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.platform.host import cgroup2_mount
    from ebpf_otlp.platform.workloads import WorkloadResolver
    from ebpf_otlp.signals.attribution import Attributor
    from ebpf_otlp.signals.http.signal import HttpSignal
    from ebpf_otlp.views.session import LocalExporter

    mount = cgroup2_mount()
    if not mount:
        res.note("HTTP part skipped: no cgroup2 mount")
        return
    root = Path(mount) / f"ebpf-otlp-bench-http-{os.getpid()}"
    root.mkdir()
    try:
        recs = _http_records(n, _cgroups(root, containers, 10))
        seen = [0, 0]  # spans, spans with a resource (not kept: the agent encodes them)

        def count(spans: list) -> None:
            seen[0] += len(spans)
            seen[1] += sum(s.resource is not None for s in spans)

        out: dict[str, float] = {}
        on = Attributor("container", "node", WorkloadResolver())
        # on cold once (the 100 cgroups new); off and warm three times each,
        # interleaved, the best of each (this 2-core machine is shared)
        for label in ("off", "cold", *("warm", "off") * 3):
            cfg = AgentConfig(attribution="none" if label == "off" else "container")
            sig = HttpSignal(cfg, LocalExporter(cfg, on_spans=count))
            sig.attribution = Attributor("none") if label == "off" else on
            seen[:] = [0, 0]
            t = time.perf_counter()
            for lo in range(0, len(recs), 4096):  # ring batches
                sig.on_batch(recs[lo:lo + 4096])
            took = time.perf_counter() - t
            assert seen == [n, 0 if label == "off" else n], seen
            out[label] = min(out.get(label, took), took)
        on.close()
    finally:
        _rmtree(root)
    res.raw["http"] = out
    for label, what in (("cold", f"the {containers} cgroups new"),
                        ("warm", "the cgroups already resolved")):
        res.add(Figure.compare(
            f"HTTP ring callback, {n:,} exchanges of {containers} containers, {label}",
            out[label], "s", out["off"], "attribution off",
            note=f"{what}: {(out[label] - out['off']) / n * 1e6:.1f} us added per "
                 "connection"))


def run(quick: bool) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    n = 1000 if quick else 10_000
    resolve_cost(res, n)
    export_size(res, n)
    http_cost(res, n)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    res = run(ap.parse_args().quick)
    for f in res.figures:
        ratio = f" ratio {f.ratio:.2f} vs {f.baseline_name}" if f.ratio else ""
        print(f"{f.name}: {f.value:.4g} {f.unit}{ratio}  {f.note}")


if __name__ == "__main__":
    main()
