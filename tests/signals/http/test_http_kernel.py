"""HTTP end to end: nginx and a Debian-python3 server in namespace b, curl and
Debian-python3 clients in namespace a, the agent (``--signals http``) exporting
to a real OTLP receiver.

The truth is what the clients did and saw: the requests they sent, the
status codes and the times curl and the python client measured. The
tracepoints are host-wide, so every assertion is filtered to our own
processes (client and server pids) and ports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import require
from http_env import HTTP_PORT, HTTPS_PORT, PY3, PY_PORT, Nginx, PyServer, curl, run_client
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"

# Debian python3 clients: http.client keep-alive, urllib, a pipelined burst.
PY_CLIENT = textwrap.dedent("""
    import http.client, json, socket, ssl, sys, time, urllib.request
    host, port, scheme = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctx = ssl._create_unverified_context()
    def conn():
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        return http.client.HTTPConnection(host, port, timeout=10)
    c = conn()
    for method, path, body in (("GET", "/ok.txt", None), ("POST", "/echo", b"x" * 3000),
                               ("GET", "/missing", None), ("HEAD", "/ok.txt", None),
                               ("GET", "/error", None)):
        t = time.monotonic()
        c.request(method, path, body=body)
        r = c.getresponse()
        r.read()
        print(json.dumps({"method": method, "path": path, "code": r.status,
                          "time": time.monotonic() - t}))
    c.close()
    t = time.monotonic()
    with urllib.request.urlopen(f"{scheme}://{host}:{port}/ok.txt?q=1", context=ctx) as r:
        r.read()
        print(json.dumps({"method": "GET", "path": "/ok.txt", "code": r.status,
                          "time": time.monotonic() - t}))
""")

PIPELINE = textwrap.dedent("""
    import json, socket, sys, time
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port))
    reqs = b"".join(b"GET /ok.txt?i=%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % i for i in range(n))
    t = time.monotonic()
    s.sendall(reqs)
    buf = b""
    while buf.count(b"HTTP/1.1 200") < n or not buf.endswith(b"hello\\n"):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    for i in range(n):
        print(json.dumps({"method": "GET", "path": "/ok.txt", "code": 200,
                          "time": time.monotonic() - t}))
""")


# Pipelined responses that one read returns together are seen as far as the
# copied head reaches: the scripted set (3 pipelined) runs with 1024 bytes.
# Both plaintext capture modes: socket tracepoints (auto on this kernel) and
# the syscall exit that kernels before 6.3 get.
@pytest.fixture(params=[("--http-head-bytes", "1024"),
                        ("--http-head-bytes", "1024", "--http-capture", "syscall")],
                ids=["socket", "syscall"])
def web(topo, request):
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("curl") is not None, "curl not installed")
    require(shutil.which("openssl") is not None, "openssl not installed")
    require(Path("/usr/bin/python3").exists(), "Debian python3 not installed")
    with Nginx(topo, topo.b, topo.b_ip4, topo.b_ip6) as ngx, \
            PyServer(topo, topo.b, topo.b_ip4) as py, \
            ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "-v", "--signals", "http", *request.param) as agent:
        mode = "syscall" if "syscall" in request.param else "socket tracepoints"
        assert f"plaintext from the {mode}" in agent.log(), agent.log()
        yield topo, ngx, py, rx, agent


def ours(rx, pids: set[int], port: int) -> list[dict]:
    return [s for s in rx.spans() if s["attributes"].get("process.pid") in pids
            and s["attributes"].get("server.port") == port]


def settle(topo, rx, port: int) -> None:
    """Send a marker request and wait for its two spans: records are handled in
    order, so everything before it has been exported by then."""
    pid, res = curl(topo, topo.a, [f"http://{topo.b_ip4}:{port}/marker-{port}"]
                    if port != HTTPS_PORT else [f"https://{topo.b_ip4}:{port}/marker-{port}"])
    assert res, "marker request failed"
    rx.wait_for(lambda: [s for s in rx.spans(**{"url.path": f"/marker-{port}"})
                         if s["attributes"]["process.pid"] == pid], timeout=30,
                what=f"marker spans on port {port}")
    rx.wait_for(lambda: len([s for s in rx.spans(**{"url.path": f"/marker-{port}"})]) >= 2,
                timeout=30, what="marker SERVER span")


def triples(spans: list[dict]) -> list[tuple]:
    return sorted((s["attributes"]["http.request.method"], s["attributes"]["url.path"],
                   s["attributes"].get("http.response.status_code", 0)) for s in spans)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_scripted_requests_one_span_per_side(web, scheme: str) -> None:
    topo, ngx, _py, rx, agent = web
    port = HTTP_PORT if scheme == "http" else HTTPS_PORT
    base = f"{scheme}://{topo.b_ip4}:{port}"
    # curl: keep-alive over one connection, HEAD, POST, chunked upload, traceparent.
    # big.bin's body goes by sendfile (plaintext): the request after it on the same
    # connection is found only if those bytes are counted.
    c1, r1 = curl(topo, topo.a, [f"{base}/ok.txt", f"{base}/missing", f"{base}/error",
                                 f"{base}/big.bin", f"{base}/ok.txt"])
    c2, r2 = curl(topo, topo.a, [f"{base}/ok.txt"], "-I")
    c3, r3 = curl(topo, topo.a, [f"{base}/echo"], "-d", "a=1")
    c4, r4 = curl(topo, topo.a, [f"{base}/echo"], "-H", "Transfer-Encoding: chunked",
                  "--data-binary", "x" * 5000)
    c5, r5 = curl(topo, topo.a, [f"{base}/ok.txt"], "-H",
                  f"traceparent: 00-{TRACE_ID}-{PARENT_ID}-01")
    p1, rp = run_client(topo, topo.a, PY_CLIENT, topo.b_ip4, str(port), scheme)
    pids = {c1, c2, c3, c4, c5, p1}
    expected = [("GET", "/ok.txt", 200), ("GET", "/missing", 404), ("GET", "/error", 500),
                ("GET", "/big.bin", 200), ("GET", "/ok.txt", 200), ("HEAD", "/ok.txt", 200),
                ("POST", "/echo", 200),
                ("POST", "/echo", 200), ("GET", "/ok.txt", 200)]
    seen = [r["code"] for r in r1 + r2 + r3 + r4 + r5]
    assert seen == [e[2] for e in expected], f"curl saw {seen}"
    expected += [(r["method"], r["path"], r["code"]) for r in rp]
    if scheme == "http":
        p2, rpl = run_client(topo, topo.a, PIPELINE, topo.b_ip4, str(port), "3")
        pids.add(p2)
        expected += [(r["method"], r["path"], r["code"]) for r in rpl]
    settle(topo, rx, port)

    client = [s for s in ours(rx, pids, port) if s["kind"] == "CLIENT"]
    server = [s for s in ours(rx, {ngx.pid}, port) if s["kind"] == "SERVER"
              and not s["attributes"]["url.path"].startswith("/marker")]
    assert triples(client) == sorted(expected), f"CLIENT spans {triples(client)} {sorted(expected)}"
    assert triples(server) == sorted(expected), f"SERVER spans {triples(server)} {sorted(expected)}"
    for s in client + server:
        a = s["attributes"]
        assert a["url.scheme"] == scheme
        assert a["server.address"] == topo.b_ip4 and a["server.port"] == port
        assert a["client.address"] == topo.a_ip4
        assert a["network.protocol.version"] == "1.1"
        assert s["name"] == f'{a["http.request.method"]} {a["http.route"]}'
        assert "url.query" not in a, "query exported without --http-capture-query"
        code = a["http.response.status_code"]
        bad = code >= 500 or (s["kind"] == "CLIENT" and code >= 400)
        assert (s["status"] == "ERROR") == bad, s
        assert (a.get("error.type") == str(code)) if bad else "error.type" not in a, s
    assert {s["attributes"]["process.executable.name"] for s in server} == {"nginx"}

    # traceparent: both sides join the caller's trace, as children of its span.
    tp = [s for s in client + server if s["trace_id"] == TRACE_ID]
    assert sorted(s["kind"] for s in tp) == ["CLIENT", "SERVER"], tp
    assert all(s["parent_span_id"] == PARENT_ID for s in tp)
    assert [s for s in client if s["attributes"]["process.pid"] == c5][0]["trace_id"] == TRACE_ID

    # Durations: within what each client measured itself (curl's time_total covers
    # connect and TLS too, so it is an upper bound of the request's own time).
    by_pid_path = {}
    for pid, results in ((c1, r1), (c2, r2), (c3, r3), (c4, r4), (c5, r5)):
        for r in results:
            path = "/" + r["url"].split("/", 3)[3]
            key = (pid, path)  # a path asked twice: the longer time bounds both
            by_pid_path[key] = max(by_pid_path.get(key, 0.0), r["time"])
    for s in client:
        a = s["attributes"]
        dur = (s["end_ns"] - s["start_ns"]) / 1e9
        assert dur > 0
        limit = by_pid_path.get((a["process.pid"], a["url.path"]))
        if limit is not None:
            assert dur <= limit + 0.002, f"{s['name']}: span {dur:.6f}s > curl {limit:.6f}s"
    for r in rp:
        assert r["time"] > 0
    for name in ("http.server.request.duration", "http.client.request.duration"):
        pts = rx.wait_for(lambda name=name: [m for m in rx.metrics(name)
                                             if m["attributes"].get("server.port") == port],
                          what=name)
        keys = set().union(*(p["attributes"] for p in pts))
        assert {"http.request.method", "http.response.status_code", "http.route",
                "url.scheme", "server.address", "server.port"} <= keys, keys
        assert not keys & {"client.address", "url.path", "network.peer.port"}, keys
    # The agent's own OTLP requests are HTTP too: never traced.
    assert not [s for s in rx.spans() if s["attributes"].get("process.pid") == agent.proc.pid]
    assert agent.proc.poll() is None, agent.log()


def test_ipv6(web) -> None:
    """Addresses and ports read from an IPv6 socket."""
    topo, ngx, _py, rx, _agent = web
    pid, res = curl(topo, topo.a, [f"http://[{topo.b_ip6}]:{HTTP_PORT}/ok.txt"], "-g")
    assert [r["code"] for r in res] == [200], res
    spans = rx.wait_for(lambda: len([s for s in ours(rx, {pid, ngx.pid}, HTTP_PORT)
                                     if s["attributes"]["server.address"] == topo.b_ip6]) >= 2
                        and [s for s in ours(rx, {pid, ngx.pid}, HTTP_PORT)
                             if s["attributes"]["server.address"] == topo.b_ip6],
                        what="IPv6 spans")
    assert sorted(s["kind"] for s in spans) == ["CLIENT", "SERVER"]
    for s in spans:
        a = s["attributes"]
        assert a["client.address"] == topo.a_ip6 and a["server.port"] == HTTP_PORT
        assert a["network.peer.address"] == (topo.b_ip6 if s["kind"] == "CLIENT"
                                             else topo.a_ip6)


def test_server_sleep_and_chunked(web) -> None:
    """A server that sleeps a known time: SERVER spans within 10 % of it; a chunked
    response followed by another request on the same connection."""
    topo, _ngx, py, rx, _agent = web
    base = f"http://{topo.b_ip4}:{PY_PORT}"
    sleep_ms = 400
    # /spliced sends its body with splice(): unless those bytes are counted, the
    # next response on the connection would be taken for the rest of that body.
    c1, r1 = curl(topo, topo.a, [f"{base}/sleep/{sleep_ms}"] * 3 + [
        f"{base}/chunked", f"{base}/spliced", f"{base}/after"])
    assert [r["code"] for r in r1] == [200] * 6, r1
    settle(topo, rx, HTTP_PORT)
    server = [s for s in ours(rx, {py.pid}, PY_PORT) if s["kind"] == "SERVER"]
    client = ours(rx, {c1}, PY_PORT)
    want = sorted([("GET", f"/sleep/{sleep_ms}", 200)] * 3 + [
        ("GET", "/chunked", 200), ("GET", "/spliced", 200), ("GET", "/after", 200)])
    assert triples(server) == want and triples(client) == want
    # The server's own clock says how long each sleep really took (a loaded machine
    # wakes it late); the span covers that sleep and must be within 10 % of it.
    slept = [float(py.proc.stdout.readline().split()[1]) for _ in range(3)]  # in order
    durs = [(s["end_ns"] - s["start_ns"]) / 1e9 for s in sorted(server, key=lambda s:
                                                                 s["start_ns"])
            if s["attributes"]["url.path"].startswith("/sleep/")]
    assert len(durs) == 3
    for dur, real in zip(durs, slept):
        assert real >= sleep_ms / 1000 and real <= dur <= real * 1.1, (durs, slept)
    assert {s["attributes"]["http.route"] for s in server} >= {"/sleep/*"}


ROBUST = textwrap.dedent("""
    import json, socket, sys, time
    host, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if what == "garbage":
        s.sendall(b"\\x16\\x03\\x01garbage that is not http\\r\\n\\r\\n")
    elif what == "split":
        for part in (b"GET /split HTTP/1.1\\r\\n", b"Host: x\\r\\n", b"X-A: 1\\r\\n",
                     b"X-B: 2\\r\\n", b"\\r\\n"):
            s.sendall(part)
            time.sleep(0.05)
    elif what == "huge":
        s.sendall(b"GET /huge HTTP/1.1\\r\\nHost: x\\r\\nX-Big: " + b"a" * 65536
                  + b"\\r\\n\\r\\n")
    elif what == "cut":
        s.sendall(b"POST /echo HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 100000\\r\\n\\r\\npart")
        s.close()
        print(json.dumps({"port": 0}))
        sys.exit(0)
    port_used = s.getsockname()[1]
    data = b""
    s.settimeout(10)
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
        if b"\\r\\n\\r\\n" in data and what == "split":
            break
    s.close()
    print(json.dumps({"port": port_used, "status": data[:12].decode(errors="replace")}))
""")


def counter(rx, name: str) -> float:
    return metric_total(rx.metrics(name))


def test_garbage_split_huge_cut(web) -> None:
    """Bad and odd input: no crash; spans where there is a request, counted where not."""
    topo, ngx, _py, rx, agent = web
    host, port = topo.b_ip4, str(HTTP_PORT)
    gp, g = run_client(topo, topo.a, ROBUST, host, port, "garbage")
    sp, sres = run_client(topo, topo.a, ROBUST, host, port, "split")
    hp, h = run_client(topo, topo.a, ROBUST, host, port, "huge")
    cp, _ = run_client(topo, topo.a, ROBUST, host, port, "cut")
    assert g[0]["status"].startswith("HTTP/1.1 400"), g
    assert sres[0]["status"].startswith("HTTP/1.1 404"), sres
    assert h[0]["status"].startswith("HTTP/1.1 400"), h
    settle(topo, rx, HTTP_PORT)

    def spans_of(pid: int, path: str) -> list[dict]:
        return [s for s in ours(rx, {pid}, HTTP_PORT) if s["attributes"]["url.path"] == path]

    def server_for(client_port: int) -> list[dict]:
        return [s for s in ours(rx, {ngx.pid}, HTTP_PORT)
                if s["attributes"]["network.peer.port"] == client_port]

    # Garbage: no request, so no span on either side; nginx's 400 is counted unmatched.
    assert not ours(rx, {gp}, HTTP_PORT) and not server_for(g[0]["port"])
    rx.wait_for(lambda: counter(rx, "ebpf_otlp.http.responses.unmatched") >= 2,
                what="unmatched responses counted")
    # A head written in five pieces: one span per side, the right path and status.
    assert triples(spans_of(sp, "/split")) == [("GET", "/split", 404)]
    assert triples(server_for(sres[0]["port"])) == [("GET", "/split", 404)]
    # A 64 KB header: the request line is known, the rest was not copied.
    assert triples(spans_of(hp, "/huge")) == [("GET", "/huge", 400)]
    assert triples(server_for(h[0]["port"])) == [("GET", "/huge", 400)]
    assert counter(rx, "ebpf_otlp.http.bytes.unparsed") >= 65536
    # Cut mid-request: the client never read a response.
    cut = spans_of(cp, "/echo")
    assert len(cut) == 1 and cut[0]["attributes"].get("error.type") == "connection_closed", cut
    assert "http.response.status_code" not in cut[0]["attributes"]
    assert agent.proc.poll() is None, agent.log()


MMSG = textwrap.dedent("""
    import ctypes, json, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class Msg(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(Iov)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class MMsg(ctypes.Structure):
        _fields_ = [("hdr", Msg), ("len", ctypes.c_uint)]
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"GET /ok.txt HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
    buf = ctypes.create_string_buffer(4096)
    iov = Iov(ctypes.cast(buf, ctypes.c_void_p), 4096)
    m = MMsg()
    m.hdr.iov, m.hdr.iovlen = ctypes.pointer(iov), 1
    n = libc.recvmmsg(s.fileno(), ctypes.byref(m), 1, 0, None)
    assert n == 1, ctypes.get_errno()
    print(json.dumps({"status": buf.raw[:12].decode(), "port": s.getsockname()[1]}))
    s.close()
""")


@pytest.mark.parametrize("web", [("--http-head-bytes", "1024")], indirect=True, ids=["socket"])
def test_recvmmsg_on_an_http_connection_is_counted_not_read(web) -> None:
    """Socket mode reads buffers from a read/write-family syscall's registers; a
    response received by recvmmsg is counted as untracked, not misread."""
    topo, ngx, _py, rx, agent = web
    pid, out = run_client(topo, topo.a, MMSG, topo.b_ip4, str(HTTP_PORT))
    assert out[0]["status"] == "HTTP/1.1 200", out
    rx.wait_for(lambda: metric_total(rx.metrics("ebpf_otlp.http.kernel.untracked",
                                                reason="calls_untracked")) >= 1,
                what="the recvmmsg counted as calls_untracked")
    settle(topo, rx, HTTP_PORT)
    server = [sp for sp in ours(rx, {ngx.pid}, HTTP_PORT)
              if sp["attributes"]["network.peer.port"] == out[0]["port"]]
    assert triples(server) == [("GET", "/ok.txt", 200)], server  # nginx's side is whole
    client = ours(rx, {pid}, HTTP_PORT)
    assert len(client) == 1 and "http.response.status_code" not in client[0]["attributes"], \
        client  # the response went by unseen: the request ends unanswered
    assert agent.proc.poll() is None, agent.log()


CONTAINED = textwrap.dedent("""
    import http.client, json, ssl, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    libs = [l.split()[-1] for l in open("/proc/self/maps") if "libssl.so" in l]
    print(json.dumps({"ready": True, "libs": sorted(set(libs))}), flush=True)
    sys.stdin.readline()  # the test says when the agent has found our libssl copy
    c = http.client.HTTPSConnection(host, port, context=ssl._create_unverified_context())
    for path in ("/ok.txt", "/missing"):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        print(json.dumps({"path": path, "code": r.status}), flush=True)
""")


def test_tls_in_own_mount_namespace_with_own_libssl(web, tmp_path) -> None:
    """A container-like process: its own mount namespace, where libssl.so.3 is a
    copy the test made (another inode). The agent finds it through /proc/PID/maps
    and /proc/PID/root while running, and traces that process's HTTPS."""
    topo, _ngx, _py, rx, agent = web
    require(shutil.which("unshare") is not None, "unshare not installed (util-linux)")
    lib = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    require(lib.exists(), "Debian libssl3 not installed")
    copy = tmp_path / "libssl.so.3"
    shutil.copy2(lib, copy)
    assert copy.stat().st_ino != lib.stat().st_ino

    shell = f'mount --bind {copy} {lib} && exec {PY3} -c "$0" "$@"'
    p = topo.popen(topo.a, "unshare", "-m", "--propagation", "private", "sh", "-c", shell,
                   CONTAINED, topo.b_ip4, str(HTTPS_PORT), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(p.stdout.readline() or "{}")
        assert first.get("ready"), p.stderr.read() if p.poll() is not None else first
        assert first["libs"] == [str(lib)], first
        st = os.stat(f"/proc/{p.pid}/root{lib}")
        assert st.st_ino == copy.stat().st_ino, "the process does not map the copy"
        # The agent logs each file it attaches to, by the first path that opened it.
        rx.wait_for(lambda: f"TLS uprobes on /proc/{p.pid}/root{lib}" in agent.log(),
                    timeout=30, what="the agent attaching to the libssl copy")
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = [json.loads(line) for line in out.splitlines()]
    assert [r["code"] for r in res] == [200, 404], (res, err)
    spans = rx.wait_for(lambda: len(ours(rx, {p.pid}, HTTPS_PORT)) >= 2 and
                        ours(rx, {p.pid}, HTTPS_PORT), what="spans of the contained process")
    assert triples(spans) == [("GET", "/missing", 404), ("GET", "/ok.txt", 200)]
    assert {s["attributes"]["url.scheme"] for s in spans} == {"https"}


@pytest.fixture
def capture_env(topo):
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("curl") is not None, "curl not installed")
    with Nginx(topo, topo.b, topo.b_ip4) as ngx, ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "http", "--http-capture-query",
                      "--http-capture-header", "X-Req-Id", "--http-route-pattern",
                      "item-[a-z]+", "--http-attributes",
                      "server.address,server.port,client.address") as agent:
        yield topo, ngx, rx, agent


def test_capture_flags_route_pattern_and_privacy(capture_env) -> None:
    """What leaves the host is what the flags name: the query, one header; the
    Authorization header's value never does."""
    topo, ngx, rx, _agent = capture_env
    url = f"http://{topo.b_ip4}:{HTTP_PORT}/items/item-abc/ok.txt?color=red"
    pid, res = curl(topo, topo.a, [url], "-H", "X-Req-Id: r42", "-H",
                    "Authorization: Bearer secret-token")
    assert [r["code"] for r in res] == [404]
    spans = rx.wait_for(lambda: len(ours(rx, {pid, ngx.pid}, HTTP_PORT)) >= 2 and
                        ours(rx, {pid, ngx.pid}, HTTP_PORT), what="both spans")
    for s in spans:
        a = s["attributes"]
        assert a["url.query"] == "color=red"
        assert a["http.request.header.x-req-id"] == "r42"
        assert a["http.route"] == "/items/*/ok.txt" and s["name"] == "GET /items/*/ok.txt"
        assert "secret-token" not in json.dumps(s)
    pts = rx.wait_for(lambda: [m for m in rx.metrics("http.client.request.duration")
                               if m["attributes"].get("server.port") == HTTP_PORT],
                      what="client histogram")
    assert pts[0]["attributes"]["client.address"] == topo.a_ip4


@pytest.fixture
def static_client(topo, tmp_path):
    require(shutil.which("gcc") is not None, "gcc not installed")
    require(Path("/usr/lib/x86_64-linux-gnu/libssl.a").exists(),
            "static OpenSSL not installed (Debian libssl-dev)")
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    exe = tmp_path / "static-tls-client"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(exe),
                    str(Path(__file__).parent / "static_tls_client.c"), "-lssl", "-lcrypto",
                    "-lpthread"], check=True, capture_output=True)
    with Nginx(topo, topo.b, topo.b_ip4) as ngx, ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "http", "--tls-lib", str(exe)) as agent:
        yield topo, ngx, rx, agent, exe


def test_tls_lib_flag_traces_a_statically_linked_binary(static_client) -> None:
    """OpenSSL linked into the binary (no libssl.so in its maps): --tls-lib names it."""
    topo, ngx, rx, _agent, exe = static_client
    p = topo.popen(topo.a, str(exe), topo.b_ip4, str(HTTPS_PORT), "/missing",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.startswith("HTTP/1.1 404"), (p.returncode, out, err)
    spans = rx.wait_for(lambda: ours(rx, {p.pid}, HTTPS_PORT), what="the static client's span")
    assert triples(spans) == [("GET", "/missing", 404)]
    assert spans[0]["kind"] == "CLIENT" and spans[0]["attributes"]["url.scheme"] == "https"
    server = rx.wait_for(lambda: [s for s in ours(rx, {ngx.pid}, HTTPS_PORT)
                                  if s["attributes"]["url.path"] == "/missing"],
                         what="nginx's span")
    assert triples(server) == [("GET", "/missing", 404)]


def test_no_http_tls_leaves_tls_alone(topo) -> None:
    """--no-http-tls: no SSL uprobes, plaintext still traced."""
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    with Nginx(topo, topo.b, topo.b_ip4) as ngx, ReceiverProc(topo, topo.a) as rx, \
            AgentProc(topo, topo.a, rx, "--signals", "http", "--no-http-tls"):
        c1, r1 = curl(topo, topo.a, [f"https://{topo.b_ip4}:{HTTPS_PORT}/ok.txt"])
        assert [r["code"] for r in r1] == [200]
        settle(topo, rx, HTTP_PORT)
        assert not ours(rx, {c1, ngx.pid}, HTTPS_PORT)
        pts = rx.wait_for(lambda: rx.metrics("ebpf_otlp.http.tls.libraries"),
                          what="TLS library gauge")
        assert {p["value"] for p in pts} == {0}
