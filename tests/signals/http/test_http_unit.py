"""HTTP decoding without a kernel: head parsing, pairing over byte counts and
copied heads, routes, traceparent, and the span encoding read back with
opentelemetry-proto.

The pairing tests build byte streams of known exchanges, cut them into
reads and writes the way the kernel reports them (a byte count and the
first ``head_bytes`` of each call), and compare what comes out with what was
built."""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ebpf_otlp.otlp.spans import SPAN_KIND_SERVER, SpanEncoder, SpanRecord
from ebpf_otlp.signals.http.conn import CLIENT, IN, OUT, SERVER, Conn, ConnTable, Counts
from ebpf_otlp.signals.http.parse import (
    REQUEST,
    RESPONSE,
    ParseError,
    parse_head,
    parse_traceparent,
)
from ebpf_otlp.signals.http.route import RouteTemplater


def test_parse_request_and_response_heads() -> None:
    h = parse_head(b"POST /a?b=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n"
                   b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01\r\n"
                   b"X-Req: v\r\n\r\nbody", REQUEST, frozenset({"x-req"}))
    assert (h.method, h.target, h.version, h.content_length, h.complete) == \
        ("POST", "/a?b=1", "1.1", 12, True)
    assert h.host == "h" and h.traceparent.startswith("00-111") and h.captured == {"x-req": "v"}
    r = parse_head(b"HTTP/1.0 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n", RESPONSE)
    assert (r.status, r.version, r.chunked, r.complete) == (404, "1.0", True, True)
    cut = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long: aaaa", REQUEST)
    assert (cut.method, cut.target, cut.complete) == ("GET", "/x", False)
    for bad in (b"\x16\x03\x01\x02\x00", b"GET /x HTTP/2.0\r\n\r\n", b"GET /x"):
        with pytest.raises(ParseError):
            parse_head(bad, REQUEST)


def test_head_length_points_past_the_blank_line() -> None:
    raw = b"GET / HTTP/1.1\r\nA: b\r\n\r\n"
    assert parse_head(raw + b"GET /next", REQUEST).length == len(raw)


# --- pairing over kernel-like records ----------------------------------------------


def _chunked(body: bytes, rnd: random.Random) -> bytes:
    out, i = b"", 0
    while i < len(body):
        n = rnd.randint(1, 700)
        out += b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
        i += n
    return out + b"0\r\n\r\n"


def make_exchange(rnd: random.Random, i: int) -> tuple[bytes, list[bytes], tuple]:
    """(request bytes, response messages (interim first), (method, path, status))."""
    method = rnd.choice(["GET", "GET", "HEAD", "POST", "PUT", "DELETE"])
    path = f"/p{i}/{rnd.randint(0, 99)}"
    hdrs = b"Host: t\r\nUser-Agent: fuzz\r\n" + b"X-Pad: " + b"p" * rnd.randint(0, 120) + b"\r\n"
    body = b""
    if method in ("POST", "PUT"):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 3000)))
        if rnd.random() < 0.5:
            hdrs += b"Transfer-Encoding: chunked\r\n"
            body = _chunked(data, rnd)
        else:
            hdrs += b"Content-Length: %d\r\n" % len(data)
            body = data
    req = f"{method} {path} HTTP/1.1\r\n".encode() + hdrs + b"\r\n" + body
    status = rnd.choice([200, 200, 201, 204, 304, 404, 500])
    responses = []
    if method in ("POST", "PUT") and rnd.random() < 0.3:
        responses.append(b"HTTP/1.1 100 Continue\r\n\r\n")
    rbody = b"" if status in (204, 304) else b"r" * rnd.randint(0, 5000)
    rh = b"HTTP/1.1 %d X\r\nServer: fuzz\r\n" % status
    if status not in (204, 304) and rnd.random() < 0.4:
        rh += b"Transfer-Encoding: chunked\r\n\r\n"
        wire_body = _chunked(rbody, rnd) if method != "HEAD" else b""
    else:
        rh += b"Content-Length: %d\r\n\r\n" % len(rbody)
        wire_body = rbody if method != "HEAD" else b""
    responses.append(rh + wire_body)
    return req, responses, (method, path, status)


def cut_calls(msg: bytes, rnd: random.Random, head_bytes: int) -> list[bytes]:
    """The calls one message is written or read with: the head in pieces that each
    fit the copied head (a server may read it in several), the body anyhow."""
    end = msg.index(b"\r\n\r\n") + 4
    calls, pos = [], 0
    while pos < end:
        n = rnd.randint(8, head_bytes) if rnd.random() < 0.3 else end - pos
        calls.append(msg[pos:min(pos + n, end)])
        pos += len(calls[-1])
    if rnd.random() < 0.5 and calls and len(calls[-1]) + min(len(msg) - end, 4000) < 1 << 20:
        calls[-1] += msg[end:]  # head and body in one call, as writev/sendfile users do
        return calls
    while pos < len(msg):
        n = rnd.randint(1, 9000)
        calls.append(msg[pos:pos + n])
        pos += n
    return calls


def feed_calls(conn: Conn, direction: int, calls: list[bytes], head_bytes: int, counts: Counts,
               out: list, t: list[int]) -> None:
    for c in calls:
        t[0] += 1000
        conn.feed(direction, c[:head_bytes], len(c), t[0], t[0] + 10, counts, frozenset(), out)


@pytest.mark.parametrize("seed", range(40))
def test_pairing_matches_the_exchanges_built(seed: int) -> None:
    rnd = random.Random(seed)
    head_bytes = rnd.choice([256, 512, 1024])
    role = rnd.choice([SERVER, CLIENT])
    req_dir, resp_dir = (IN, OUT) if role == SERVER else (OUT, IN)
    counts, out, t = Counts(), [], [0]
    conn = Conn((1, 2), (4, "10.0.0.1", 80, "10.0.0.2", 5555, "x"), False)
    truth = []
    i = 0
    while i < 25:
        depth = rnd.choice([1, 1, 1, 2, 3])  # pipelined requests sent before any response
        batch = [make_exchange(rnd, i + k) for k in range(depth)]
        i += depth
        if depth > 1 and all(len(r) < head_bytes // depth for r, _, _ in batch):
            feed_calls(conn, req_dir, [b"".join(r for r, _, _ in batch)], head_bytes, counts,
                       out, t)
        else:
            for req, _, _ in batch:
                feed_calls(conn, req_dir, cut_calls(req, rnd, head_bytes), head_bytes, counts,
                           out, t)
        for _, responses, what in batch:
            for resp in responses:
                feed_calls(conn, resp_dir, cut_calls(resp, rnd, head_bytes), head_bytes,
                           counts, out, t)
            truth.append(what)
    got = [(e.request.method, e.request.target, e.response.status) for e in out]
    assert got == truth
    assert conn.role == role
    assert all(e.resp_ns >= e.req_ns for e in out)
    assert counts.unmatched == 0 and not counts.malformed


def test_close_ends_waiting_requests_and_table_bounds() -> None:
    counts, out = Counts(), []
    conn = Conn((1, 2), (4, "a", 1, "b", 2, "c"), False)
    conn.feed(OUT, b"GET /a HTTP/1.1\r\n\r\n", 19, 5, 6, counts, frozenset(), out)
    conn.close(99, out)
    assert [(e.request.target, e.response, e.error, e.resp_ns) for e in out] == \
        [("/a", None, "connection_closed", 99)]
    table = ConnTable(max_conns=2, idle_ns=100, counts=counts)
    for k in range(3):
        c = table.add(Conn((k, k), (), False), now_ns=k)
        c.pending.append((None, 0))
    assert len(table) == 2 and counts.conns_evicted == 1 and counts.unanswered["evicted"] == 1
    assert table.expire(now_ns=1000) == 2 and counts.unanswered["expired"] == 2


def test_garbage_never_raises_and_is_counted() -> None:
    rnd = random.Random(7)
    counts, out = Counts(), []
    conn = Conn((1, 2), (), False)
    for _ in range(2000):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 300)))
        if rnd.random() < 0.2:
            data = rnd.choice([b"GET ", b"HTTP/1.1 ", b"POST /x HTTP/1.1\r\n"]) + data
        conn.feed(rnd.choice([IN, OUT]), data, len(data) + rnd.randint(0, 50), 1, 2, counts,
                  frozenset(), out)
    assert counts.bytes_unparsed > 0
    assert sum(counts.malformed.values()) > 0


def test_routes() -> None:
    r = RouteTemplater([r"v\d+"])
    assert r("/users/123/orders/9f86d081884c7d65") == "/users/*/orders/*"
    assert r("/a/123e4567-e89b-12d3-a456-426614174000/b") == "/a/*/b"
    assert r("/static/app.js") == "/static/app.js"
    assert r("/api/v2/items") == "/api/*/items"
    assert r("") == "/"


def test_traceparent() -> None:
    tid, pid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert parse_traceparent(f"00-{tid}-{pid}-01") == (bytes.fromhex(tid), bytes.fromhex(pid))
    for bad in ("", "00-xyz", f"ff-{tid}-{pid}-01", f"00-{'0' * 32}-{pid}-01",
                f"00-{tid}-{'0' * 16}-01", f"00-{tid[:-1]}g-{pid}-01"):
        assert parse_traceparent(bad) is None


def test_span_records_as_the_signal_makes_them_read_back() -> None:
    enc = SpanEncoder({"service.name": "t"}, "scope")
    tid, pid = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("00f067aa0ba902b7")
    items = [SpanRecord(10, 20, "GET /a", (("http.request.method", "GET"),
                                           ("http.response.status_code", 503)), "503",
                        SPAN_KIND_SERVER, tid, pid),
             SpanRecord(30, 40, "GET /b", (("url.path", "/b"),), None, 3, None, None)]
    req = ExportTraceServiceRequest.FromString(enc.request(items))
    spans = req.resource_spans[0].scope_spans[0].spans
    assert spans[0].kind == 2 and spans[0].trace_id == tid and spans[0].parent_span_id == pid
    assert spans[0].status.code == 2
    assert {a.key for a in spans[0].attributes} == {"http.request.method",
                                                    "http.response.status_code", "error.type"}
    assert spans[1].kind == 3 and spans[1].parent_span_id == b"" and len(spans[1].trace_id) == 16
    assert (spans[1].start_time_unix_nano, spans[1].end_time_unix_nano) == (30, 40)


def test_batch_connection_keys() -> None:
    """signal._connections: one key per distinct (pid, socket) of a batch and each
    record's index of it, when sockets are distinct per process and when one
    socket address appears under several processes (fork, address reused)."""
    import numpy as np

    from ebpf_otlp.signals.http.signal import _connections

    rng = np.random.default_rng(7)
    for shared in (False, True):
        for _ in range(20):
            n = int(rng.integers(1, 400))
            conn = rng.integers(0, 30, n).astype(np.uint64) + np.uint64(0xffff888000000000)
            pid = (conn % np.uint64(5)).astype(np.uint32) + 100
            if shared:
                pid = rng.integers(100, 104, n).astype(np.uint32)
            keys, inv = _connections(pid, conn)
            assert len(keys) == len(set(keys)) == len(set(zip(pid.tolist(), conn.tolist())))
            assert [keys[j] for j in inv.tolist()] == list(zip(pid.tolist(), conn.tolist()))


def test_whole_heads_cache() -> None:
    """parse.WholeHeads: the same answers as whole_head (heads, and None for what
    is not one whole head), remembered by the exact bytes, bounded, and a head
    longer than CACHE_HEAD_MAX parsed but not held."""
    from ebpf_otlp.signals.http.parse import CACHE_HEAD_MAX, WholeHeads, whole_head

    cache = WholeHeads(frozenset({"x-a"}), size=3)
    req = b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
    resp = b"HTTP/1.1 204 No Content\r\nServer: s\r\n\r\n"
    bad = b"HTTP/9.9 200 OK\r\n\r\n"
    for data, kind in ((req, REQUEST), (resp, RESPONSE), (bad, RESPONSE)):
        want = whole_head(data, kind, frozenset({"x-a"}))
        assert cache.parse(data) == want
        assert cache.known[data] == want  # remembered, None too
    assert cache.known[req].captured == {"x-a": "1"} and cache.known[resp].status == 204
    assert cache.known[bad] is None
    cache.parse(b"GET /b HTTP/1.1\r\n\r\n")
    assert len(cache.known) <= 3  # bounded: cleared when full
    assert cache.known[b"GET /b HTTP/1.1\r\n\r\n"].target == "/b"
    big = b"GET /c HTTP/1.1\r\nX-B: " + b"b" * CACHE_HEAD_MAX + b"\r\n\r\n"
    cache.parse(big)
    assert big not in cache.known


def test_conn_kinds_cache() -> None:
    """kinds.ConnKinds: records that differ only in their ports share one kind
    (addresses as text, process name, cgroup and netns), records that differ in
    any kind field do not; unknown family gives empty addresses; bounded."""
    import numpy as np

    from ebpf_otlp.otlp.semconv import AddressCache
    from ebpf_otlp.signals.http.kinds import ConnKinds
    from ebpf_otlp.signals.http.signal import event_dtype

    dt = event_dtype(64)
    recs = np.zeros(5, dt)
    mapped = bytes(10) + b"\xff\xff"
    recs["family"] = 4
    recs["laddr"] = np.frombuffer(mapped + bytes([10, 0, 0, 1]), np.uint8)
    recs["raddr"] = np.frombuffer(mapped + bytes([10, 0, 0, 2]), np.uint8)
    recs["comm"] = np.frombuffer(b"wrk".ljust(16, b"\0"), np.uint8)
    recs["cgroup_id"], recs["netns"] = 77, 4026531840
    recs["lport"] = [40000, 40001, 40002, 40003, 40004]
    recs["rport"] = 8080
    recs["comm"][2] = np.frombuffer(b"curl".ljust(16, b"\0"), np.uint8)
    recs["netns"][3] = 5
    recs["family"][4] = 0
    kinds = ConnKinds(dt, AddressCache(), size=3)
    kb, w = kinds.columns(recs), kinds.width
    got = [kinds.kind(kb[w * i:w * i + w]) for i in range(5)]
    assert got[0] == (4, "10.0.0.1", "10.0.0.2", "wrk", (77, 4026531840))
    assert got[1] is got[0]  # ports are not part of the kind
    assert got[2] == (4, "10.0.0.1", "10.0.0.2", "curl", (77, 4026531840))
    assert got[3][4] == (77, 5)
    assert got[4] == (0, "", "", "wrk", (77, 4026531840))
    assert len(kinds.known) <= 3  # four kinds seen: cleared once when full
    assert kinds.kind(kb[:w]) == got[0]  # made again after the clear, the same


def test_whole_heads_by_copied_bytes() -> None:
    """parse.WholeHeads.copied: a record's copied bytes (a head, then body bytes)
    give the head they start with, the same as by the head's own bytes; no blank
    line (a head cut short) gives None; remembered by the copied bytes, bounded."""
    from ebpf_otlp.signals.http.parse import WholeHeads, whole_head

    cache = WholeHeads(size=2)
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    h = cache.copied(resp + b"ok\n")
    assert h == whole_head(resp, RESPONSE) and h.content_length == 3 and h.length == len(resp)
    assert cache.by_copy[resp + b"ok\n"] is h and cache.known[resp] is h
    assert cache.copied(resp + b"no\n") is h  # another body: the head from `known`
    assert cache.copied(b"GET /a HTTP/1.1\r\nHost: x") is None  # cut: no blank line
    assert cache.by_copy[b"GET /a HTTP/1.1\r\nHost: x"] is None
    assert len(cache.by_copy) <= 2 and len(cache.known) <= 2
