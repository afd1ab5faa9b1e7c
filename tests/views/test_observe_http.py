"""HTTP requests in ``observe`` (``--signal http``): nginx in one namespace, curl
in the other; each request is seen from both sides, once each, with the method,
path and status curl asked for and got."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from conftest import require
from viewproc import ObserveProc, wait_until

pytestmark = pytest.mark.kernel

_spec = importlib.util.spec_from_file_location(
    "http_env", Path(__file__).parents[1] / "signals" / "http" / "http_env.py")
http_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_env)

PATHS = [("/ok.txt", 200), ("/error", 500), ("/missing", 404)]


def test_observe_shows_each_http_request_from_both_sides(topo) -> None:
    require(Path(http_env.NGINX).exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("curl") is not None, "curl not installed")
    t = topo
    with http_env.Nginx(t, t.b, t.b_ip4) as nginx:
        obs = ObserveProc(t, t.a, "--signal", "http", "--port", str(http_env.HTTP_PORT)).start()
        try:
            obs.wait_ready()
            codes = []
            for path, _ in PATHS:
                r = t.run(t.a, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://{t.b_ip4}:{http_env.HTTP_PORT}{path}")
                codes.append(int(r.stdout))
            assert codes == [c for _, c in PATHS]

            def ours() -> list[dict]:
                return [e for e in obs.events() if e.get("server.address") == t.b_ip4
                        and e.get("url.path") in {p for p, _ in PATHS}]

            wait_until(lambda: len(ours()) >= 2 * len(PATHS), 30, "both sides of each request")
            assert obs.stop() == 0, obs.err.read_text()
            events = ours()
        finally:
            obs.close()
    got = sorted((e["http.side"], e["http.request.method"], e["url.path"],
                  e["http.response.status_code"]) for e in events)
    assert got == sorted((side, "GET", p, c) for p, c in PATHS for side in ("client", "server"))
    for e in events:
        assert e["signal"] == "http" and e["event"] == "request"
        assert e["server.port"] == http_env.HTTP_PORT
        d = e[f"http.{e['http.side']}.request.duration"]
        assert 0 <= d < 5
        exe = "nginx" if e["http.side"] == "server" else "curl"
        assert e["process.executable.name"] == exe, e
    assert all(e["process.pid"] == nginx.pid for e in events if e["http.side"] == "server")
