"""TCX through the binding, and living beside other tools' TC programs.

Each case runs tests/tc_driver.py in namespace a: our packet program (flows)
and another tool's program (tests/bpf/other_tc.bpf.c, which drops UDP to one
port) on veth-a's ingress, in a given order, through TCX links or clsact
filters. Truths: the datagrams the sender sent, what a receiver socket got,
the other program's own counters, and the kernel's list of TCX programs
(BPF_PROG_QUERY)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import require
from otlp import PY

from ebpf_otlp.platform import tcx

ROOT = Path(__file__).parent.parent.parent
DRIVER = str(Path(__file__).parent / "tc_driver.py")
SHOT, PASS = 7101, 7102
N_SHOT, N_PASS = 40, 60

pytestmark = pytest.mark.kernel

RECEIVER = """
import socket, sys, time
a, port, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((a, port)); s.settimeout(5)
print("ready", flush=True)
n = 0
try:
    while n < want:
        s.recv(2048); n += 1
except socket.timeout:
    pass
print(n, flush=True)
"""

SENDER = """
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(b"x" * 64, (dst, port))
"""


@pytest.fixture(scope="module")
def other_obj():
    clang = shutil.which("clang-19") or shutil.which("clang")
    require(clang is not None, "clang is needed to compile the other tool's program")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "other_tc.bpf.o")
        subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86",
                        "-I", str(ROOT / "bpf"), "-I", str(ROOT / "vmlinux/x86"), "-c",
                        str(ROOT / "tests/bpf/other_tc.bpf.c"), "-o", str(out)], check=True)
        yield str(out)


def _require_tcx() -> None:
    require(tcx.kernel_has_tcx(), "kernel without TCX (before 6.6)")


def _start_driver(topo, *args: str) -> subprocess.Popen:
    p = topo.popen(topo.a, PY, DRIVER, "--iface", topo.a_if, *args, stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise AssertionError(f"driver did not start: {line!r} {p.stderr.read()}")
    return p


def _tcx_progs(topo) -> list[int]:
    out = topo.run(topo.a, PY, "-c", "import socket; from ebpf_otlp.platform import tcx; "
                   f"print(tcx.query(socket.if_nametoindex('{topo.a_if}'), 'ingress'))").stdout
    return json.loads(out)


def _traffic(topo) -> int:
    """N_SHOT datagrams to SHOT and N_PASS to PASS from b; returns what PASS received."""
    rx = topo.popen(topo.a, PY, "-c", RECEIVER, topo.a_ip4, str(PASS), str(N_PASS),
                    stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    topo.run(topo.b, PY, "-c", SENDER, topo.a_ip4, str(SHOT), str(N_SHOT))
    topo.run(topo.b, PY, "-c", SENDER, topo.a_ip4, str(PASS), str(N_PASS))
    return int(rx.communicate(timeout=30)[0].strip())


def _dump(p: subprocess.Popen) -> dict:
    out, err = p.communicate("dump\n", timeout=30)
    assert p.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    res["ours"] = {int(k): v for k, v in res["ours"].items()}
    return res


# (ours, other, other first) -> does the other program run before ours?
CASES = [
    ("tcx", "tcx", True), ("tcx", "tcx", False),
    ("tcx", "tc", False),   # TCX programs always run before clsact filters
    ("tc", "tcx", True),    # ... so another tool's TCX program runs before our filter
    ("tc", "tc", True), ("tc", "tc", False),
]


@pytest.mark.parametrize("ours,other,other_first", CASES)
def test_coexistence(topo, other_obj, ours: str, other: str, other_first: bool) -> None:
    if "tcx" in (ours, other):
        _require_tcx()
    args = ["--ours", ours, "--other", other, "--other-obj", other_obj, "--shot", str(SHOT),
            "--pass-port", str(PASS)] + (["--other-first"] if other_first else [])
    p = _start_driver(topo, *args)
    try:
        got_pass = _traffic(topo)
        res = _dump(p)
    finally:
        if p.poll() is None:
            p.kill()
    before = other_first or (ours == "tc" and other == "tcx")
    # the packet's fate is the other program's: SHOT dropped, the rest delivered
    assert got_pass == N_PASS, "datagrams to the passed port were lost"
    assert res["other"] == {"shot": N_SHOT, "pass": N_PASS}, "the other program missed packets"
    # our counts are exact for what reaches us
    assert res["ours"].get(PASS, 0) == N_PASS
    assert res["ours"].get(SHOT, 0) == (0 if before else N_SHOT), res
    if "tcx" in (ours, other):
        assert _tcx_progs(topo) == [], "a TCX program stayed attached after its owner exited"


def test_tcx_link_gone_when_owner_is_sigkilled(topo) -> None:
    _require_tcx()
    p = _start_driver(topo, "--ours", "tcx", "--hold")
    try:
        assert len(_tcx_progs(topo)) == 1
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    # the link's fd closed with the process: the kernel detaches it (release is
    # asynchronous after the last reference, so allow it a moment)
    deadline = time.monotonic() + 10
    while _tcx_progs(topo) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tcx_progs(topo) == [], "TCX program still attached after SIGKILL"


def test_tc_mode_resolution() -> None:
    assert tcx.resolve("tc") == "tc"
    assert tcx.resolve("auto") == ("tcx" if tcx.kernel_has_tcx() else "tc")
    with pytest.raises(ValueError):
        tcx.resolve("clsact")
