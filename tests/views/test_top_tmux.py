"""``ebpf-otlp top`` in a real terminal (tmux) at 80x24 and 200x50 while two UDP
flows run at rates the test sets and measures: the captured screen shows the
busier flow first with a rate within 20 % of what the generator sent, and `q`
exits 0 leaving no program loaded and no TC filter behind."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import require
from viewproc import PY, held_programs, loaded_programs, wait_until

pytestmark = pytest.mark.kernel

FRAME_OVERHEAD = 14 + 20 + 8  # Ethernet, IPv4, UDP: the flow counts whole frames
PAYLOAD = 1000

GENERATOR = """
import json, socket, sys, time
dst, port, pps, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data = b"x" * {payload}
t0 = time.monotonic(); n = 0; last = 0.0
with open(log, "w") as f:
    while True:
        for _ in range(10):
            s.sendto(data, (dst, port))
        n += 10
        now = time.monotonic()
        if now - last >= 0.25:
            f.write(json.dumps([time.time(), n]) + "\\n"); f.flush(); last = now
        wait = t0 + n / pps - now
        if wait > 0:
            time.sleep(wait)
"""

SINK = """
import socket, sys
socks = []
for p in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(p)))
    s.setblocking(False); socks.append(s)
import select
while True:
    for s in select.select(socks, [], [])[0]:
        try:
            while True:
                s.recv(65536)
        except BlockingIOError:
            pass
"""

RATE = re.compile(r"([\d.]+) (B|kB|MB|GB)/s")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


class Tmux:
    """A tmux server of our own (its own socket), one session of a given size."""

    def __init__(self, width: int, height: int, cmd: list[str]):
        self.sock = f"eo17-{os.getpid()}-{random.randrange(10**6)}"
        self.width, self.height, self.cmd = width, height, cmd

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def __enter__(self) -> Tmux:
        self.tmux("new-session", "-d", "-s", "top", "-x", str(self.width), "-y",
                  str(self.height), " ".join(self.cmd))
        self.tmux("set-option", "-t", "top", "remain-on-exit", "on")
        return self

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def pane(self, fmt: str) -> str:
        return self.tmux("display", "-p", "-t", "top", fmt).strip()

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True,
                       timeout=30)


def generated_rate(log: Path, seconds: float = 3.0) -> float:
    """Frame bytes per second the generator sent over its last ``seconds`` (top's
    rate is over its last three one-second intervals)."""
    pts = [json.loads(x) for x in log.read_text().splitlines() if x.endswith("]")]
    end = pts[-1]
    start = next(p for p in pts if p[0] >= end[0] - seconds)
    return (end[1] - start[1]) * (PAYLOAD + FRAME_OVERHEAD) / (end[0] - start[0])


@pytest.mark.parametrize("width,height", [(80, 24), (200, 50)])
def test_top_shows_the_busiest_flow_first_at_its_rate_and_q_exits_clean(topo, width,
                                                                         height) -> None:
    require(shutil.which("tmux") is not None, "tmux not installed (Debian tmux)")
    require(shutil.which("bpftool") is not None, "bpftool not installed")
    t = topo
    big, small = random.randrange(10000, 20000), random.randrange(20000, 30000)
    tmp = Path(tempfile.mkdtemp(prefix="eo-top-"))
    procs = [t.popen(t.b, PY, "-c", SINK, str(big), str(small))]
    before = loaded_programs()
    try:
        procs.append(t.popen(t.a, PY, "-c", GENERATOR.format(payload=PAYLOAD), t.b_ip4,
                             str(big), "2000", str(tmp / "big.log")))
        procs.append(t.popen(t.a, PY, "-c", GENERATOR.format(payload=PAYLOAD), t.b_ip4,
                             str(small), "300", str(tmp / "small.log")))
        # The exit status through a shell: tmux does not always reap its pane's
        # process promptly (seen here: a zombie for many seconds after exit).
        status_file = tmp / "status"
        cmd = ["sh", "-c", f"'ip netns exec {t.a} {PY} -m ebpf_otlp top --iface veth-a; "
               f"echo $? > {status_file}'"]
        with Tmux(width, height, cmd) as tm:
            row = re.compile(rf"10\.201\.0\.1:\d+\s+10\.201\.0\.2:{big}\b")

            def first_row() -> str | None:
                lines = tm.screen().splitlines()
                heads = [i for i, ln in enumerate(lines) if "RATE" in ln and "SOURCE" in ln]
                if not heads or heads[0] + 1 >= len(lines):
                    return None
                return lines[heads[0] + 1]

            wait_until(lambda: (r := first_row()) and row.search(r), 90,
                       "the busy flow on top's screen")
            time.sleep(3.5)  # the rate's window (three intervals) all inside the traffic
            screen = tm.screen()
            sh_pid = tm.pane("#{pane_pid}")
            pid = int(subprocess.run(["pgrep", "-P", sh_pid], capture_output=True, text=True,
                                     check=True).stdout.split()[0])
            held = held_programs(pid)
            lines = screen.splitlines()
            assert all(len(ln) <= width for ln in lines), screen
            assert len(lines) <= height, screen
            first = first_row()
            assert first and row.search(first), screen
            m = RATE.search(first)
            assert m, screen
            shown = float(m.group(1)) * UNITS[m.group(2)]
            sent = generated_rate(tmp / "big.log")
            assert abs(shown - sent) <= 0.2 * sent, (shown, sent, screen)
            # The smaller flow is shown below it.
            assert re.search(rf"10\.201\.0\.2:{small}\b", screen), screen
            assert screen.index(f":{big}") < screen.index(f":{small}")
            assert held, "top holds its programs while it runs"

            # Keys: 2 shows the TCP peers, s sorts by its next numeric column.
            tm.tmux("send-keys", "-t", "top", "2")
            wait_until(lambda: "TCP peers" in tm.screen() and "sort CONNS" in tm.screen(),
                       10, "the TCP view")
            tm.tmux("send-keys", "-t", "top", "s")
            wait_until(lambda: "sort FAILED" in tm.screen(), 10, "the next sort column")
            tm.tmux("send-keys", "-t", "top", "q")
            wait_until(status_file.exists, 30, "top to exit on q")
            wait_until(lambda: status_file.read_text().strip(), 5, "the exit status")
            assert status_file.read_text().strip() == "0", tm.screen()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not (loaded_programs() - before) & held, "programs of top still loaded"
    tcs = t.run(t.a, "tc", "filter", "show", "dev", "veth-a", "ingress").stdout \
        + t.run(t.a, "tc", "filter", "show", "dev", "veth-a", "egress").stdout
    assert "0xeb0f" not in tcs, tcs


def test_top_prints_plain_tables_when_not_a_terminal(topo) -> None:
    t = topo
    port = random.randrange(10000, 30000)
    tmp = Path(tempfile.mkdtemp(prefix="eo-top-"))
    sink = t.popen(t.b, PY, "-c", SINK, str(port))
    gen = t.popen(t.a, PY, "-c", GENERATOR.format(payload=PAYLOAD), t.b_ip4, str(port), "500",
                  str(tmp / "gen.log"))
    try:
        res = t.run(t.a, PY, "-m", "ebpf_otlp", "top", "--iface", "veth-a", "--duration", "4",
                    timeout=120)
    finally:
        for p in (gen, sink):
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    out = res.stdout
    assert "\x1b" not in out, "no escape sequences when the output is not a terminal"
    assert out.count("--- ebpf-otlp top") >= 2, out
    for title in ("Top flows", "TCP peers", "DNS names", "Drops by reason"):
        assert title in out, out
    assert re.search(rf"10\.201\.0\.2:{port}\b", out), out
