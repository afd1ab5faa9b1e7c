"""Hostile input never stops the bridge: servers that are not gRPC or send broken
HTTP/2, random export-file lines, random protobuf bytes."""

from __future__ import annotations

import json
import socket
import threading
import time

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb
from ebpf_otlp.signals.hubble.h2stream import _frame
from ebpf_otlp.signals.hubble.mapping import Mapper
from ebpf_otlp.signals.hubble.source_file import parse_line
from ebpf_otlp.signals.hubble.source_grpc import Backoff, GrpcFollower


class _Junk:
    """Accepts connections and answers each with ``reply`` bytes, then closes."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(self.reply)
                    time.sleep(0.05)
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


REPLIES = {
    "http1": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "random": bytes(range(256)) * 4,
    "status_503": (_frame(4, 0, 0) + _frame(1, 0x4 | 0x1, 1, b"\x8d")),  # :status 503 (static)
    "bad_hpack": _frame(4, 0, 0) + _frame(1, 0x4, 1, b"\xff\xff\xff\xff"),
    "huge_frame": b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    "huge_message": (_frame(4, 0, 0) + _frame(1, 0x4, 1, b"\x88")
                     + _frame(0, 0, 1, b"\x00\x7f\xff\xff\xff" + b"\0" * 100)),
    "rst": _frame(4, 0, 0) + _frame(3, 0, 1, b"\x00\x00\x00\x02"),
    "goaway": _frame(4, 0, 0) + _frame(7, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x02"),
    "grpc_garbage": (_frame(4, 0, 0) + _frame(1, 0x4, 1, b"\x88")  # :status 200
                     + _frame(0, 0, 1, b"\x00\x00\x00\x00\x03\xff\xff\xff")
                     + _frame(0, 0x8, 1, b"\x05" + b"\x00\x00\x00\x00\x00" + b"\0" * 5)),
}


def test_servers_that_are_not_hubble_are_counted_not_fatal():
    for name, reply in REPLIES.items():
        with _Junk(reply) as junk:
            m = Mapper()
            f = GrpcFollower(junk.address, m, backoff=Backoff(0.02, 0.05))
            t = threading.Thread(target=f.run, daemon=True)
            t.start()
            deadline = time.monotonic() + 10
            while junk.accepted < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            f.stop()
            t.join(5)
            assert not t.is_alive(), name
            assert junk.accepted >= 3, f"{name}: the follower stopped reconnecting"
            sums = m.drain().sums
            assert sum(n for (k, _), n in sums.items() if k == "ebpf_otlp.hubble.reconnects") \
                >= 2, (name, sums)
            if name == "grpc_garbage":  # one undecodable message, one empty padded one
                assert sums[("ebpf_otlp.hubble.malformed", (("reason", "decode"),))] >= 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["flow", "lost_events", "time", "node_name", "IP", "l4", "TCP",
                         "source", "verdict", "uuid", "l7", "http", "dns", "workloads",
                         "event_type", "is_reply", "num_events_lost", "x"]) | st.text(max_size=5),
        inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_lines_never_raise(value):
    counted = []
    ev = parse_line(json.dumps(value).encode(), lambda *a: counted.append(a))
    assert ev is not None or counted
    if ev is not None:
        Mapper().feed([ev])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_protobuf_bytes_never_raise(data):
    m = Mapper()
    try:
        msg = opb.GetFlowsResponse.FromString(data)
    except Exception:
        return  # the follower counts this as malformed{decode}
    m.feed([msg])
    m.drain()
