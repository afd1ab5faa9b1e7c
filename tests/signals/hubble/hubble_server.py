"""A Hubble server for the tests: ``Observer.GetFlows`` implemented from the same
generated protos, serving a script; and a writer of Hubble export files."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc
from google.protobuf import json_format

from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb
from ebpf_otlp.signals.hubble._proto.observer import observer_pb2_grpc as ogrpc


class ScriptedObserver(ogrpc.ObserverServicer):
    """First call: ``events[:cut]``, then the connection breaks (UNAVAILABLE).
    Later calls: every event at or after the request's ``since`` (so the one
    at the boundary comes again), then the stream stays open (``follow``)."""

    def __init__(self, events: Sequence[opb.GetFlowsResponse], cut: int | None = None,
                 raw: Sequence[bytes] = ()):
        self.events = list(events)
        self.cut = cut
        self.raw = list(raw)  # sent as-is at the start of the first call (garbage tests)
        self.requests: list[opb.GetFlowsRequest] = []
        self.done = threading.Event()
        self._closing = threading.Event()

    def GetFlows(self, request, context):  # noqa: N802 (gRPC's naming)
        self.requests.append(request)
        first = len(self.requests) == 1
        if first and self.cut is not None:
            yield from self.events[:self.cut]
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted disconnect")
        if request.HasField("since"):
            since = request.since.ToNanoseconds()
            todo = [e for e in self.events if e.time.ToNanoseconds() >= since]
        else:
            todo = self.events
        yield from todo
        self.done.set()
        while context.is_active() and not self._closing.wait(0.1):
            pass

    def close(self) -> None:
        self._closing.set()


def _raw_handler(observer: ScriptedObserver) -> grpc.GenericRpcHandler:
    """The same method, but the server sends bytes as they are (to send garbage)."""

    def get_flows(request, context):
        observer.requests.append(request)
        yield from observer.raw
        for e in observer.events:
            yield e.SerializeToString()
        observer.done.set()
        while context.is_active() and not observer._closing.wait(0.1):
            pass

    return grpc.method_handlers_generic_handler("observer.Observer", {
        "GetFlows": grpc.unary_stream_rpc_method_handler(
            get_flows, request_deserializer=opb.GetFlowsRequest.FromString,
            response_serializer=None)})


class HubbleServer:
    """``with HubbleServer(observer) as srv: srv.address``; TLS with ``credentials``."""

    def __init__(self, observer: ScriptedObserver, raw: bool = False,
                 credentials: grpc.ServerCredentials | None = None, bind: str = "127.0.0.1:0"):
        self.observer = observer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if raw:
            self.server.add_generic_rpc_handlers((_raw_handler(observer),))
        else:
            ogrpc.add_ObserverServicer_to_server(observer, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, credentials)
        self.address = bind if bind.startswith("unix:") else f"127.0.0.1:{self.port}"

    def __enter__(self) -> HubbleServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.observer.close()
        self.server.stop(grace=None).wait(5)


def export_line(ev: opb.GetFlowsResponse) -> bytes:
    """One export-file line, as Cilium's exporter writes it (protojson, proto names)."""
    e = opb.ExportEvent()
    e.ParseFromString(ev.SerializeToString())  # same field numbers for the shared members
    return json_format.MessageToJson(e, preserving_proto_field_name=True,
                                     indent=None).encode() + b"\n"


def append(path: Path, lines: Sequence[bytes]) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(lines))
        f.flush()


def wait_until(pred, what: str, timeout: float = 20.0) -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Running:
    """Runs ``follower.run`` on a thread for a ``with`` block; stops and joins it."""

    def __init__(self, follower):
        self.follower = follower
        self.mapper = follower.mapper
        self.thread = threading.Thread(target=follower.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.follower.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "follower did not stop"
