"""Capabilities, tested by dropping them with setpriv (not by reasoning):
without them one message naming each missing capability and exit status 1;
with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN (+ CAP_DAC_READ_SEARCH as a non-root
user, for tracefs) and no CAP_SYS_ADMIN the agent runs and counts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import require
from otlp import metric_total

from ebpf_otlp.receiver import Receiver

pytestmark = pytest.mark.kernel


def _setpriv(*args: str) -> list[str]:
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    return ["setpriv", *args, "--", sys.executable, "-m", "ebpf_otlp"]


def test_without_capabilities_one_message_and_exit_1() -> None:
    cmd = _setpriv("--bounding-set=-bpf,-perfmon,-net_admin,-sys_admin", "--inh-caps=-all")
    res = subprocess.run([*cmd, "run", "--signals", "drops,flows", "--iface", "lo"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebpf-otlp: missing capabilities:"), lines
    for cap in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"):
        assert cap in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert "TC/XDP hooks on --iface (flows)" in lines[0]


def test_only_net_admin_missing_is_named_alone() -> None:
    cmd = _setpriv("--bounding-set=-net_admin", "--inh-caps=-all")
    res = subprocess.run([*cmd, "run", "--signals", "flows", "--iface", "lo"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "CAP_NET_ADMIN" in res.stderr and "CAP_BPF" not in res.stderr, res.stderr


def test_runs_as_non_root_without_sys_admin() -> None:
    """uid 65534 with ambient CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_DAC_READ_SEARCH:
    the drops signal counts exactly the datagrams sent to a closed port."""
    caps = "+bpf,+perfmon,+net_admin,+dac_read_search"
    cmd = _setpriv("--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
                   f"--ambient-caps={caps}")
    with socket.socket() as s:  # a port nobody listens on (UDP: NO_SOCKET drops)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logdir = Path(tempfile.mkdtemp(prefix="eo-caps-"))
    os.chmod(logdir, 0o777)
    log = logdir / "agent.log"
    with Receiver(port=0) as rx, open(log, "w") as logf:
        proc = subprocess.Popen([*cmd, "run", "--signals", "drops", "--interval", "0.5",
                                 "--bpf-stats",
                                 "--endpoint", f"http://127.0.0.1:{rx.port}"],
                                stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "ebpf-otlp running" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            n = 40
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                for _ in range(n):
                    u.sendto(b"x", ("127.0.0.1", port))

            def dropped() -> float:
                return metric_total([r for r in rx.records if r.get("name") ==
                                     "network.packet.drops" and r["attributes"].get(
                                         "destination.port") == port])
            deadline = time.monotonic() + 30
            while dropped() < n and time.monotonic() < deadline:
                time.sleep(0.2)
            assert dropped() == n, f"{dropped()} drops counted for {n} datagrams"
            # run-time statistics need CAP_SYS_ADMIN: said, and not exported as zeros
            assert "BPF run-time statistics off" in log.read_text()
            assert not [r for r in rx.records if r.get("name") == "ebpf_otlp.program.run_time"]
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
    assert rc == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    shutil.rmtree(logdir, ignore_errors=True)
