"""The configuration file (--config, YAML) and `ebpf-otlp config print`: one
schema with the flags, unknown keys and bad values refused in one line (exit
status 2), and the source of every effective value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "ebpf_otlp", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


BAD = [
    ("max-flow: 4096\n", "unknown key 'max-flow'; did you mean 'max-flows'?"),
    ("max-flows: 0\n", "key 'max-flows': bad value 0: 0 is not in the range"),
    ("flow-hook: tcx\n", "key 'flow-hook': bad value 'tcx'"),
    ("tcp-spans: maybe\n", "key 'tcp-spans': expected true or false, not 'maybe'"),
    ("dns-ports: [53, 70000]\n", "key 'dns-ports': bad value [53, 70000]: ports must be"),
    ("signals: [flows, bogus]\niface: [lo]\n", "key 'signals': unknown signal 'bogus'"),
    ("interval: -2\n", "key 'interval': bad value -2"),
    ("header: [novalue]\n", "key 'header': bad header 'novalue'"),
    ("health-listen: nowhere\n", "key 'health-listen': bad value 'nowhere': expected HOST:PORT"),
    ("max-flows: [1\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
]


@pytest.mark.parametrize("text,message", BAD)
@pytest.mark.parametrize("command", [["run"], ["config", "print"]])
def test_bad_config_file_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str,
                                                command: list[str]) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    res = cli(*command, "--config", str(f))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"ebpf-otlp: config {f}"), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    res = cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr, res.stderr


def _printed(res: subprocess.CompletedProcess) -> dict[str, tuple[object, str]]:
    assert res.returncode == 0, res.stderr
    out = {}
    for line in res.stdout.splitlines():
        value, _, source = line.partition("  # ")
        out.update({k: (v, source) for k, v in yaml.safe_load(value).items()})
    return out


def test_config_print_shows_each_value_and_its_source(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("iface: lo\nmax-flows: 4096\ninterval: 7\nservice-name: from-file\n"
                 "header: {authorization: Bearer secret}\ndns-ports: 53,5353\n")
    res = cli("config", "print", "--config", str(f), "--interval", "3",
              env={"OTEL_SERVICE_NAME": "from-env", "OTEL_EXPORTER_OTLP_ENDPOINT":
                   "http://collector:4318"})
    got = _printed(res)
    assert got["iface"] == (["lo"], f"file {f}")
    assert got["max-flows"] == (4096, f"file {f}")
    assert got["interval"] == (3.0, "flag --interval")  # a flag beats the file
    assert got["service-name"] == ("from-file", f"file {f}")  # the file beats the env
    assert got["endpoint"] == ("http://collector:4318", "env OTEL_EXPORTER_OTLP_ENDPOINT")
    assert got["dns-ports"] == ([53, 5353], f"file {f}")
    assert got["header"] == ({"authorization": "<redacted>"}, f"file {f}")
    assert "secret" not in res.stdout
    assert got["flow-hook"] == ("tc", "default")
    # every key of the schema is printed, and the output is itself a valid config file
    out = tmp_path / "printed.yaml"
    out.write_text(res.stdout.replace("<redacted>", "x"))
    again = _printed(cli("config", "print", "--config", str(out)))
    assert {k: v for k, (v, _) in again.items()} == {
        k: ({"authorization": "<redacted>"} if k == "header" else v) for k, (v, _) in got.items()}


def test_env_interval_and_default_sources() -> None:
    got = _printed(cli("config", "print", env={"OTEL_METRIC_EXPORT_INTERVAL": "2500"}))
    assert got["interval"] == (2.5, "env OTEL_METRIC_EXPORT_INTERVAL")
    assert got["max-flows"] == (65536, "default")
    assert got["signals"][0] == ["tcp", "drops"]  # no interface: flows and dns off
