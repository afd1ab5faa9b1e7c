"""Bad flags and missing interfaces: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (["run", "--iface", "no-such-if0"], "no such interface: no-such-if0"),
    (["run", "--signals", "flows,bogus", "--iface", "lo"], "unknown signal 'bogus'"),
    (["run", "--iface", "lo", "--dns-ports", "0"], "ports must be between 1 and 65535"),
    (["run", "--iface", "lo", "--dns-ports", "x"], "comma-separated list of port numbers"),
    (["run", "--iface", "lo", "--flow-hook", "tcx"], "'tcx' is not one of"),
    (["run", "--iface", "lo", "--attribution", "pod"], "'pod' is not one of"),
    (["run", "--iface", "lo", "--max-flows", "0"], "0 is not in the range"),
    (["run", "--iface", "lo", "--flow-attributes", "source.address,pod"], "unknown attributes"),
    (["run", "--iface", "lo", "--header", "novalue"], "bad header 'novalue'"),
    (["run", "--interval", "-1"], "-1"),
    (["run", "--signals", "flows"], "flows and dns need at least one --iface"),
    (["run", "--iface", "lo", "--tc-mode", "clsact"], "'clsact' is not one of"),
    (["run", "--signals", "drops", "--drop-reasons", "NO_SUCH_REASON", "--endpoint",
      "http://127.0.0.1:9"], "this kernel has no drop reason 'NO_SUCH_REASON'"),
    (["receive", "--listen", "127.0.0.1:notaport"], "expected HOST:PORT"),
    (["frobnicate"], "No such command"),
]


@pytest.mark.parametrize("args,message", CASES)
def test_bad_invocations_exit_2_with_one_clear_line(args: list[str], message: str) -> None:
    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_help_lists_commands() -> None:
    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("run", "doctor", "receive", "demo"):
        assert cmd in res.stdout


def test_missing_libbpf_names_the_package(tmp_path) -> None:
    (tmp_path / "libbpf.so.1").write_bytes(b"not a shared object")
    env = dict(__import__("os").environ, LD_LIBRARY_PATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", "run", "--iface", "lo"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1
    assert "apt-get install libbpf1" in res.stderr
    assert "Traceback" not in res.stderr
