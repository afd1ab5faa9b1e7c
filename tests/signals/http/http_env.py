"""Servers and clients for the HTTP tests: nginx from Debian (plaintext and
HTTPS with a certificate made here), a small Debian-python3 server that sleeps
or answers chunked, and a Debian-python3 client that reports what it saw."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

NGINX = "/usr/sbin/nginx"
PY3 = "/usr/bin/python3"  # Debian's own python3 (links Debian's libssl)
HERE = Path(__file__).parent
HTTP_PORT, HTTPS_PORT, PY_PORT = 8080, 8443, 9090


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_cert(d: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=eo-test", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)


class Nginx:
    """nginx in namespace ``ns`` on ``ip``: :8080 plaintext, :8443 TLS; one process."""

    def __init__(self, topo, ns: str, ip: str, ip6: str | None = None):
        self.topo, self.ns, self.ip, self.ip6 = topo, ns, ip, ip6
        self.dir = Path(tempfile.mkdtemp(prefix="eo-nginx-"))
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Nginx:
        d = self.dir
        make_cert(d)
        (d / "www").mkdir()
        (d / "www" / "ok.txt").write_text("hello\n")
        (d / "www" / "big.bin").write_bytes(b"x" * 200_000)
        (d / "nginx.conf").write_text(textwrap.dedent(f"""
            daemon off;
            master_process off;
            worker_processes 1;
            pid {d}/nginx.pid;
            error_log {d}/error.log;
            events {{ worker_connections 512; }}
            http {{
                access_log off;
                client_body_temp_path {d}/cbt;
                proxy_temp_path {d}/pt;
                fastcgi_temp_path {d}/ft;
                uwsgi_temp_path {d}/ut;
                scgi_temp_path {d}/st;
                keepalive_requests 10000;
                sendfile on;  # as Debian's default configuration: file bodies by sendfile
                server {{
                    listen {self.ip}:{HTTP_PORT};
                    listen {self.ip}:{HTTPS_PORT} ssl;
                    {f"listen [{self.ip6}]:{HTTP_PORT};" if self.ip6 else ""}
                    ssl_certificate {d}/cert.pem;
                    ssl_certificate_key {d}/key.pem;
                    root {d}/www;
                    location = /error {{ return 500 "boom\\n"; }}
                    location = /echo {{ return 200 "posted\\n"; }}
                }}
            }}
        """))
        self.proc = self.topo.popen(self.ns, NGINX, "-c", str(d / "nginx.conf"), "-p", str(d),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = self.topo.run(self.ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://{self.ip}:{HTTP_PORT}/ok.txt", check=False)
            if r.stdout == "200":
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (d / "error.log").read_text() if (d / "error.log").exists() else ""
        self.__exit__()
        raise RuntimeError(f"nginx did not start: {log}")

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


PY_SERVER = textwrap.dedent("""
    import os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith("/sleep/"):
                t = time.monotonic()
                time.sleep(int(self.path.split("/")[2]) / 1000)
                print("slept %.6f" % (time.monotonic() - t), flush=True)
            if self.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (b"first", b"second" * 100, b"third"):
                    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\\r\\n\\r\\n")
                return
            if self.path == "/spliced":  # the body by splice(), from a pipe
                body = b"s" * 5000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                r, w = os.pipe()
                os.write(w, body)
                left = len(body)
                while left:
                    left -= os.splice(r, self.connection.fileno(), left)
                os.close(r)
                os.close(w)
                return
            body = b"ok\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
    print("ready", flush=True)
    srv.serve_forever()
""")


class PyServer:
    """Debian python3's http.server: /sleep/<ms>, /chunked, /spliced (body by splice),
    else 200."""

    def __init__(self, topo, ns: str, ip: str, port: int = PY_PORT):
        self.topo, self.ns, self.ip, self.port = topo, ns, ip, port
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> PyServer:
        self.proc = self.topo.popen(self.ns, PY3, "-c", PY_SERVER, self.ip, str(self.port),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.__exit__()
            raise RuntimeError("python test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()


def run_client(topo, ns: str, script: str, *args: str, timeout: float = 60,
               prefix: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    """Run a Debian-python3 client script in ``ns``; (its pid, the JSON lines it printed)."""
    p = topo.popen(ns, *prefix, PY3, "-c", script, *args, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"client failed ({p.returncode}): {err}")
    return p.pid, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def curl(topo, ns: str, urls: list[str], *opts: str) -> tuple[int, list[dict]]:
    """One curl process for ``urls`` (one connection where it can), one JSON line per
    transfer (code, time_total); (its pid, those lines)."""
    fmt = '{"code": %{http_code}, "time": %{time_total}, "url": "%{url_effective}"}\\n'
    args = [a for u in urls for a in ("-o", "/dev/null", u)]
    p = topo.popen(ns, "curl", "-sk", "-w", fmt, *opts, *args,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    return p.pid, [json.loads(line) for line in out.splitlines() if line.startswith("{")]
