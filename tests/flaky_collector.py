"""A collector that misbehaves on a script, in front of the real receiver.

    python flaky_collector.py --listen 127.0.0.1:P --upstream http://127.0.0.1:Q \\
        --log FILE STEP [STEP ...]

Each STEP is ``CODE[xN][:retry-after=S]`` (answer the next N requests with
HTTP CODE, reading their bodies), ``hang:S`` (for S seconds accept
connections and never answer) or ``pass`` (forward every later request to
the upstream receiver and return its status). One JSON line per request goes
to FILE: ``{"t": time, "path": ..., "status": ..., "bytes": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_steps(steps: list[str]) -> list[tuple[str, float, float | None]]:
    out: list[tuple[str, float, float | None]] = []
    for st in steps:
        if st == "pass":
            out.append(("pass", 0, None))
        elif st.startswith("hang:"):
            out.append(("hang", float(st[5:]), None))
        else:
            head, _, opt = st.partition(":")
            code, _, n = head.partition("x")
            after = float(opt.split("=", 1)[1]) if opt.startswith("retry-after=") else None
            out.append((code, float(n or 1), after))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("steps", nargs="+")
    args = ap.parse_args()
    steps = parse_steps(args.steps)
    lock = threading.Lock()
    state = {"i": 0, "left": steps[0][1], "hang_until": None}
    logf = open(args.log, "a", buffering=1)  # noqa: SIM115

    def record(path: str, status: object, n: int) -> None:
        with lock:
            logf.write(json.dumps({"t": time.time(), "path": path, "status": status,
                                   "bytes": n}) + "\n")

    def next_action() -> tuple[str, float | None]:
        with lock:
            while True:
                kind, n, after = steps[state["i"]]
                if kind == "pass":
                    return kind, None
                if kind == "hang":
                    if state["hang_until"] is None:
                        state["hang_until"] = time.monotonic() + n
                    if time.monotonic() < state["hang_until"]:
                        return "hang", state["hang_until"]
                elif state["left"] > 0:
                    state["left"] -= 1
                    return kind, after
                state["i"] += 1
                state["left"] = steps[state["i"]][1]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_a: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            kind, arg = next_action()
            if kind == "hang":  # never answer: hold the connection until the hang ends
                record(self.path, "hang", 0)
                time.sleep(max(0.0, arg - time.monotonic()) + 3600)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if kind == "pass":
                req = urllib.request.Request(args.upstream + self.path, data=body,
                                             method="POST", headers={
                                                 k: v for k, v in self.headers.items()
                                                 if k.lower() in ("content-type",
                                                                  "content-encoding")})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        code, out = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, out = e.code, e.read()
            else:
                code, out = int(kind), b"scripted failure"
            record(self.path, code, len(body))
            self.send_response(code)
            if arg is not None and kind != "pass":
                self.send_header("Retry-After", f"{arg:g}")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    host, _, port = args.listen.rpartition(":")
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    print("flaky collector listening", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
