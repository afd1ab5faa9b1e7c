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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from guest_check import HTTP_SERVER  # noqa: E402  (a plain HTTP/1.1 server script)

pytestmark = pytest.mark.kernel


def _setpriv(*args: str) -> list[str]:
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    return ["setpriv", *args, "--", sys.executable, "-m", "ebpf_otlp"]


def _wait_running(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until the agent logs that it runs; fails with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while "ebpf-otlp running" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


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
            _wait_running(proc, log)
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


READ_NS = "import os,sys\ntry:\n    print(os.readlink(f'/proc/{sys.argv[1]}/ns/net'))\n" \
          "except OSError as e:\n    print('errno', e.errno)"


def test_without_sys_ptrace_doctor_and_start_name_what_goes_unseen() -> None:
    """CAP_SYS_PTRACE: the kernel gives /proc/PID/ns/net of another user's process
    (what workload attribution reads) only with it, even to uid 0 and even with
    CAP_DAC_READ_SEARCH (checked here first, as the truth). Without it, doctor
    says so on its CAP_SYS_PTRACE line and the agent starts with one warning
    line naming the capability and what goes unattributed."""
    other = subprocess.Popen(_setpriv("--reuid=65534", "--regid=65534", "--clear-groups")[:-3]
                             + ["sleep", "60"])
    try:
        no_ptrace = "--bounding-set=-sys_ptrace"
        read = [sys.executable, "-c", READ_NS, str(other.pid)]
        deadline = time.monotonic() + 10
        while not subprocess.run(read, capture_output=True, text=True).stdout.startswith("net:"):
            assert time.monotonic() < deadline, "the other user's process never appeared"
            time.sleep(0.1)
        denied = subprocess.run(["setpriv", no_ptrace, "--inh-caps=-all", "--", *read],
                                capture_output=True, text=True).stdout.strip()
        assert denied == "errno 13", f"read without CAP_SYS_PTRACE: {denied}"
        denied = subprocess.run(["setpriv", f"{no_ptrace},-dac_override", "--inh-caps=-all",
                                 "--", *read], capture_output=True, text=True).stdout.strip()
        assert denied == "errno 13", denied  # CAP_DAC_READ_SEARCH (still held) is no help
    finally:
        other.kill()
        other.wait()

    def doctor_line(*priv: str) -> str:
        res = subprocess.run(_setpriv(*priv, "--inh-caps=-all") + ["doctor"],
                             capture_output=True, text=True, timeout=120)
        lines = [x for x in res.stdout.splitlines() if x.startswith("capability  CAP_SYS_PTRACE")]
        assert len(lines) == 1, res.stdout + res.stderr
        return lines[0]

    line = doctor_line(no_ptrace)
    assert " no: " in line and "workload attribution" in line and "TLS" in line, line
    assert " yes: " in doctor_line("--bounding-set=+sys_ptrace"), doctor_line()

    with Receiver(port=0) as rx:
        logdir = Path(tempfile.mkdtemp(prefix="eo-caps-"))
        log = logdir / "agent.log"
        with open(log, "w") as logf:
            proc = subprocess.Popen(_setpriv(no_ptrace, "--inh-caps=-all") + [
                "run", "--signals", "drops", "--interval", "0.5", "--attribution", "container",
                "--endpoint", f"http://127.0.0.1:{rx.port}"], stdout=logf,
                stderr=subprocess.STDOUT)
            try:
                _wait_running(proc, log)
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(30)
    text = log.read_text()
    shutil.rmtree(logdir, ignore_errors=True)
    assert rc == 0, text
    warned = [x for x in text.splitlines() if "CAP_SYS_PTRACE missing" in x]
    assert len(warned) == 1 and "workload attribution" in warned[0], text
    assert "Traceback" not in text


def test_http_runs_as_non_root_without_tracefs_access() -> None:
    """uid 65534 with only CAP_BPF and CAP_PERFMON (no CAP_DAC_READ_SEARCH, so
    tracefs is closed to it): http starts, and a plaintext request gets its
    SERVER and CLIENT spans (the raw tracepoint needs no tracefs)."""
    caps = "+bpf,+perfmon"
    cmd = _setpriv("--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
                   f"--ambient-caps={caps}")
    logdir = Path(tempfile.mkdtemp(prefix="eo-caps-"))
    os.chmod(logdir, 0o777)
    log = logdir / "agent.log"
    server = subprocess.Popen([sys.executable, "-c", HTTP_SERVER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        with Receiver(port=0) as rx, open(log, "w") as logf:
            proc = subprocess.Popen([*cmd, "run", "--signals", "http", "--no-http-tls",
                                     "--interval", "0.5",
                                     "--endpoint", f"http://127.0.0.1:{rx.port}"],
                                    stdout=logf, stderr=subprocess.STDOUT)
            try:
                _wait_running(proc, log)
                import urllib.request

                path = f"/caps-{port}"
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    assert r.read() == b"ok"

                def kinds() -> set[str]:
                    return {r["kind"] for r in list(rx.records) if r.get("type") == "span"
                            and r["attributes"].get("url.path") == path}
                deadline = time.monotonic() + 30
                while kinds() != {"SERVER", "CLIENT"} and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert kinds() == {"SERVER", "CLIENT"}, (kinds(), log.read_text()[-2000:])
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(30)
        assert rc == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(logdir, ignore_errors=True)
