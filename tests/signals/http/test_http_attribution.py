"""HTTP records to spans and histogram points per ``--attribution`` level, without a
kernel: crafted ring records (``struct http_event`` as the built object lays it out)
of one server exchange, carrying a cgroup id and namespace a fake resolver knows.
Spans keep the process and sit on the workload's resource; histogram points carry
the workload as resource attributes (moved onto a resource of their own when the
request is built) and the process only at ``process``."""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics, ScopeMetrics

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp.resources import split_metrics
from ebpf_otlp.platform.containers import Workload
from ebpf_otlp.platform.workloads import HOST, Attribution
from ebpf_otlp.signals.attribution import Attributor
from ebpf_otlp.signals.http.signal import OP_READ, OP_WRITE, HttpSignal, event_dtype
from ebpf_otlp.views.session import LocalExporter

CID = "cd" * 32
UID = "22222222-3333-4444-8555-666666666666"
CGROUP, NETNS = 4242, 4026532777
POD = Attribution(Workload(CID, "containerd", UID), "10.9.0.2", NETNS)
PID = 3131


class FakeResolver:
    def by_netns(self, inode: int) -> Attribution:
        return POD if inode == NETNS else HOST

    def by_cgroup(self, cgid: int) -> Workload:
        return POD.workload if cgid == CGROUP else Workload()

    def close(self) -> None:
        pass


def records(cgroup: int, netns: int, conn: int, pid: int = PID, comm: bytes = b"server",
            ids: int = 1) -> np.ndarray:
    """A server's read of one request and write of its response."""
    dt = event_dtype(256)
    r = np.zeros(2, dt)
    for i, (op, data) in enumerate(((OP_READ, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
                                    (OP_WRITE, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))):
        r[i]["start_ns"], r[i]["end_ns"] = 1000 + 10 * i, 1005 + 10 * i
        r[i]["conn"], r[i]["pid"], r[i]["tid"], r[i]["fd"] = conn, pid, pid, 5
        r[i]["len"], r[i]["head_len"], r[i]["op"] = len(data), len(data), op
        r[i]["family"], r[i]["lport"], r[i]["rport"] = 4, 8080, 40000
        r[i]["laddr"][10:] = [255, 255, 10, 9, 0, 2]
        r[i]["raddr"][10:] = [255, 255, 10, 9, 1, 2]
        if ids:  # else the kernel left them out: told on an earlier record
            r[i]["comm"][:len(comm)] = np.frombuffer(comm, np.uint8)
            r[i]["cgroup_id"], r[i]["ids"] = cgroup, 1
        r[i]["netns"] = netns
        r[i]["head"][:len(data)] = np.frombuffer(data, np.uint8)
    return r


def resources_of(sig: HttpSignal) -> list[tuple[dict, dict]]:
    """(resource attributes, point attributes) of each exported server histogram point."""
    metric, _ = sig.server_duration.metric()
    req = split_metrics(ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
        scope_metrics=[ScopeMetrics(metrics=[metric])])]))
    return [({kv.key: kv.value.string_value for kv in rm.resource.attributes},
             {kv.key: kv.value for kv in p.attributes})
            for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in m.histogram.data_points]


@pytest.mark.parametrize("level", ["none", "namespace", "container", "process"])
def test_spans_and_histograms_per_level(level: str) -> None:
    spans = []
    cfg = AgentConfig(attribution=level)
    sig = HttpSignal(cfg, LocalExporter(cfg, on_spans=spans.extend))
    sig.attribution = Attributor(level, "n1", None if level == "none" else FakeResolver())
    sig.on_batch(records(CGROUP, NETNS, conn=1))  # a pod's server
    sig.on_batch(records(0, 0, conn=2))  # the host's (no workload ids)

    want = Attribution(POD.workload, POD.pod_ip, NETNS).resource(level, "n1")
    assert len(spans) == 2
    pod_span, host_span = spans
    for s in spans:  # spans always keep the process
        a = dict(s.attributes)
        assert a["process.pid"] == PID and a["process.executable.name"] == "server", a
        assert a["http.route"] == "/x" and a["http.response.status_code"] == 200, a
    assert dict(pod_span.resource or ()) == want
    assert host_span.resource is None

    points = resources_of(sig)
    assert len(points) == (1 if level == "none" else 2), points
    for res, attrs in points:
        assert res in (want, {}), res
        assert not {"k8s.pod.uid", "container.id"} & set(attrs), attrs  # moved to the resource
        per_pid = {"process.pid", "process.executable.name"} & set(attrs)
        assert per_pid == ({"process.pid", "process.executable.name"}
                           if level == "process" else set()), attrs
    if level != "none":
        assert sorted(len(r) for r, _ in points) == [0, len(want)]


def test_kernel_flags_zero_what_a_level_does_not_use() -> None:
    flags = {lvl: Attributor(lvl, "", None if lvl == "none" else FakeResolver()).kernel_flags()
             for lvl in ("none", "namespace", "container", "process")}
    assert flags == {"none": {"keep_cgroup": 0, "keep_netns": 0},
                     "namespace": {"keep_cgroup": 0, "keep_netns": 1},
                     "container": {"keep_cgroup": 1, "keep_netns": 1},
                     "process": {"keep_cgroup": 1, "keep_netns": 1}}


def test_a_process_name_and_cgroup_come_on_its_first_record_only() -> None:
    """The kernel sends a process's name and cgroup on its first record per
    connection only (``ids``). A new connection whose records lack them (the
    kernel told an agent before a restart, or another thread of the process
    raced ahead) takes its process's from an earlier batch, else from a later
    record of the batch, else from /proc."""
    import os

    spans = []
    cfg = AgentConfig(attribution="container")
    sig = HttpSignal(cfg, LocalExporter(cfg, on_spans=spans.extend))
    sig.attribution = Attributor("container", "n1", FakeResolver())
    sig.on_batch(records(CGROUP, NETNS, conn=1))
    sig.on_batch(records(CGROUP, NETNS, conn=2, ids=0))  # same process, told before
    other = PID + 1
    sig.on_batch(np.concatenate([records(CGROUP, NETNS, conn=3, pid=other, ids=0),
                                 records(CGROUP, NETNS, conn=4, pid=other, comm=b"other")]))
    me = os.getpid()
    sig.on_batch(records(0, 0, conn=5, pid=me, ids=0))  # nothing known: /proc
    want = Attribution(POD.workload, POD.pod_ip, NETNS).resource("container", "n1")
    got = {dict(s.attributes)["process.pid"]: [] for s in spans}
    for s in spans:
        a = dict(s.attributes)
        got[a["process.pid"]].append((a["process.executable.name"], dict(s.resource or ())))
    assert got[PID] == [("server", want)] * 2, got[PID]
    assert got[other] == [("other", want)] * 2, got[other]
    with open("/proc/self/comm") as f:
        assert got[me] == [(f.read().strip(), {})], got[me]
    assert sig.counts.ids_from_proc == 1
