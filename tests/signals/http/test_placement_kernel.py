"""The relocated SSL probes (signals/http/placement.py) on the real kernel.

The HTTP object is loaded here and its TLS probes attached to Debian's
libssl twice: on the internal functions the placement picks (emulated
breakpoints), and at the exported symbols' offset 0 (the old placement).
Each time curl (SSL_read/SSL_write) and Debian's python3 (SSL_read_ex/
SSL_write_ex) fetch a page from nginx over TLS, and the plaintext the probes
copied must equal what the clients themselves sent and received (the python
client's request bytes and its received bytes, curl's `-i` output), on both
sides (nginx's read = the client's write), and the programs must keep
working (status 200, body intact)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from http_env import HTTPS_PORT, PY3, Nginx

from ebpf_otlp.platform.bpfobj import BpfObject
from ebpf_otlp.platform.ringbuf import RingBuffer
from ebpf_otlp.signals.http.signal import event_dtype
from ebpf_otlp.signals.http.tls import PROGRAMS, TlsAttacher, system_tls_library

pytestmark = pytest.mark.kernel

OP_READ, OP_WRITE, OP_CLOSE = 1, 2, 5
HEAD = 1024

PY_CLIENT = textwrap.dedent("""
    import socket, ssl, sys
    host, port, req = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    s = ssl._create_unverified_context().wrap_socket(socket.create_connection((host, port)))
    s.sendall(req)
    buf = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    sys.stdout.write(buf.hex())
""")


class Capture:
    """The HTTP object with every program attached, TLS probes placed as asked;
    the ring's records collected."""

    def __init__(self, relocate: bool):
        self.obj = BpfObject.open_packaged("http")
        self.obj.rodata["self_tgid"] = os.getpid()
        self.obj.rodata["head_bytes"] = HEAD
        self.obj.load()
        for p in self.obj.programs.values():
            if p.name not in PROGRAMS:
                p.attach()
        self.tls = TlsAttacher(self.obj, relocate=relocate)
        self.lib = system_tls_library()
        assert self.tls.attach_path(self.lib, required=True)
        self.rows: list[np.ndarray] = []
        self.ring = RingBuffer(self.obj.maps["http_events"], event_dtype(HEAD),
                               on_batch=self.rows.append,
                               lost_map=self.obj.maps["http_events_lost"])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                self.ring.drain()

    def records(self, pid: int) -> list[tuple[int, int, bytes]]:
        """(op, len, head) of pid's TLS reads and writes, in order."""
        out = []
        for batch in self.snapshot():
            for r in batch[(batch["pid"] == pid) & (batch["tls"] == 1)]:
                if r["op"] in (OP_READ, OP_WRITE):
                    out.append((int(r["op"]), int(r["len"]),
                                bytes(r["head"][:r["head_len"]])))
        return out

    def snapshot(self) -> list[np.ndarray]:
        """Every batch so far, the ring drained first."""
        with self._lock:
            self.ring.drain()
            return list(self.rows)

    def wait(self, pid: int, want, timeout: float = 20) -> list:
        deadline = time.monotonic() + timeout
        while True:
            got = self.records(pid)
            if want(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.ring.close()
        self.obj.close()


def joined(recs: list, op: int) -> bytes:
    parts = [h for o, n, h in recs if o == op]
    assert all(len(h) == n for o, n, h in recs if o == op), "head shorter than the call"
    return b"".join(parts)


@pytest.mark.parametrize("relocate", [True, False], ids=["internal", "symbol-offset-0"])
def test_relocated_probes_copy_the_exact_plaintext(topo, relocate: bool) -> None:
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("curl") is not None, "curl not installed")
    require(Path(PY3).exists(), "Debian python3 not installed")
    require(system_tls_library() is not None, "no libssl on this host")
    with Nginx(topo, topo.b, topo.b_ip4) as ngx:
        cap = Capture(relocate)
        try:
            probes = cap.tls.probes[cap.lib]
            if relocate:
                assert [(p.symbol, p.emulated) for p in probes if p.ret] == \
                    [(None, True)] * 2, [p.describe() for p in probes]
            else:
                assert all(p.offset == 0 and not p.emulated for p in probes), \
                    [p.describe() for p in probes]

            # Debian python3: SSL_write_ex / SSL_read_ex.
            req = (f"GET /ok.txt?placement={int(relocate)} HTTP/1.1\r\nHost: x\r\n"
                   "Connection: close\r\n\r\n").encode()
            p = topo.popen(topo.a, PY3, "-c", PY_CLIENT, topo.b_ip4, str(HTTPS_PORT),
                           req.hex(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            got = bytes.fromhex(out)
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nhello\n"), got
            recs = cap.wait(p.pid, lambda r: joined(r, OP_READ) == got)
            assert joined(recs, OP_WRITE) == req, recs
            assert joined(recs, OP_READ) == got, recs
            server = cap.wait(ngx.pid, lambda r: req in [h for _, _, h in r])
            assert req in [h for o, _, h in server if o == OP_READ], server
            assert got in [h for o, _, h in server if o == OP_WRITE], server

            # curl: SSL_write / SSL_read; -i prints the response as received.
            c = topo.popen(topo.a, "curl", "-sk", "-i", "-H", "Connection: close",
                           f"https://{topo.b_ip4}:{HTTPS_PORT}/ok.txt?curl={int(relocate)}",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            cout, cerr = c.communicate(timeout=30)
            assert c.returncode == 0 and cout.startswith(b"HTTP/1.1 200 "), (cout, cerr)
            recs = cap.wait(c.pid, lambda r: joined(r, OP_READ) == cout)
            assert joined(recs, OP_READ) == cout, recs
            sent = joined(recs, OP_WRITE)
            assert sent.startswith(f"GET /ok.txt?curl={int(relocate)} HTTP/1.1\r\n".encode())
            assert sent.endswith(b"\r\n\r\n"), sent
            server = cap.wait(ngx.pid, lambda r: sent in [h for _, _, h in r])
            assert sent in [h for o, _, h in server if o == OP_READ], server
            assert cout in [h for o, _, h in server if o == OP_WRITE], server
        finally:
            cap.close()
        assert ngx.proc.poll() is None, "nginx exited while probed"


def _misplaced(recs: list, req_op: int) -> int:
    """Records that break request, response, request, ... within one connection
    (a CLOSE record starts the next connection on the same socket address)."""
    bad, want = 0, "req"
    for op, head in recs:
        if op == OP_CLOSE:
            want = "req"
            continue
        kind = ("req" if op == req_op and head.startswith(b"GET ") else
                "resp" if op != req_op and head.startswith(b"HTTP/1.1 ") else "other")
        if kind != want:
            bad += 1
        want = "resp" if kind == "req" else "req"
    return bad


def test_ssl_set_fd_ties_reused_ssl_objects_to_their_new_socket(topo) -> None:
    """wrk with a new TLS connection per request: nginx and wrk free and reuse SSL
    objects, and nginx often serves a request from OpenSSL's buffer without a
    syscall. Every request must still land on its own connection: per socket,
    nginx reads a request then writes its response, wrk the reverse, and nginx
    read as many requests as wrk says it completed (plus those in flight)."""
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("wrk") is not None, "wrk not installed (Debian wrk)")
    require(system_tls_library() is not None, "no libssl on this host")
    with Nginx(topo, topo.b, topo.b_ip4) as ngx:
        cap = Capture(True)
        try:
            assert "SSL_set_fd" in [p.symbol for p in cap.tls.probes[cap.lib]]
            p = topo.popen(topo.a, "wrk", "-t1", "-c4", "-d2s", "-H", "Connection: close",
                           f"https://{topo.b_ip4}:{HTTPS_PORT}/ok.txt",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = p.communicate(timeout=60)
            m = re.search(r"(\d+) requests in", out)
            assert p.returncode == 0 and m, (out, err)
            done = int(m.group(1))
            assert done >= 20, out
            cap.wait(ngx.pid, lambda r: sum(1 for o, _, h in r if o == OP_READ) >= done)
            by_sock: dict[tuple, list] = {}
            for batch in cap.snapshot():
                for r in batch[np.isin(batch["pid"], [ngx.pid, p.pid])]:
                    if r["op"] in (OP_READ, OP_WRITE, OP_CLOSE):
                        by_sock.setdefault((int(r["pid"]), int(r["conn"])), []).append(
                            (int(r["op"]), bytes(r["head"][:r["head_len"]])))
            ngx_reqs = sum(1 for (pid, _), recs in by_sock.items() if pid == ngx.pid
                           for o, h in recs if o == OP_READ and h.startswith(b"GET "))
            assert cap.ring.lost() == 0, "ring buffer overflowed: the test lost records"
            assert done <= ngx_reqs <= done + 8, (done, ngx_reqs)
            bad = {k: _misplaced(v, OP_READ if k[0] == ngx.pid else OP_WRITE)
                   for k, v in by_sock.items()}
            assert sum(bad.values()) == 0, {k: v for k, v in bad.items() if v}
        finally:
            cap.close()
