"""The deployment files (deploy/): the Dockerfile parsed and every file it
copies present; every manifest parsed, and every argument, configuration key
and environment variable they hand the agent accepted by the CLI itself
(`ebpf-otlp config print` exits 0 on them); the systemd unit passes
`systemd-analyze verify`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require

from ebpf_otlp.configfile import ENV_VARS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CAPS_ALLOWED = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}


def accepted(args: list[str], env: dict[str, str], files: dict[str, Path]) -> None:
    """``ebpf-otlp run ARGS`` as far as configuration goes: ``config print`` with the
    same arguments must exit 0. ``files`` maps in-image paths to repository files."""
    assert args and args[0] == "run", args
    rest = [str(files.get(a, a)) for a in args[1:]]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", "config", "print", *rest],
                         capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert res.returncode == 0, f"{args} with {env}: {res.stderr}"
    return res.stdout


def test_dockerfile_parses_and_copies_only_existing_files() -> None:
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    stages = [i for i in df.structure if i["instruction"] == "FROM"]
    assert [s["value"].split()[0] for s in stages] == ["debian:12-slim", "debian:12-slim"]
    copies = [i["value"].split() for i in df.structure if i["instruction"] == "COPY"]
    assert copies
    for parts in copies:
        if any(p.startswith("--from") for p in parts):
            continue
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    assert "libbpf1" in runs and "pip wheel" in runs and "pip install" in runs
    assert "--privileged" not in df.content
    assert [i["value"] for i in df.structure if i["instruction"] == "USER"] == ["0:0"]
    entry = yaml.safe_load(df.structure[[i["instruction"] for i in df.structure]
                                        .index("ENTRYPOINT")]["value"])
    cmd = yaml.safe_load(next(i["value"] for i in df.structure if i["instruction"] == "CMD"))
    assert entry == ["/opt/ebpf-otlp/bin/ebpf-otlp"]
    files = {"/etc/ebpf-otlp/agent.yaml": DEPLOY / "agent.yaml"}
    accepted(cmd, {}, files)


def _manifests() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.parent.name == "kubernetes":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_daemonset_passes_only_what_the_cli_accepts(tmp_path: Path) -> None:
    docs = _manifests()
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc.get("privileged") is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"]["add"]) <= CAPS_ALLOWED
        # every variable is one the agent (or the SDK) reads, or feeds one by $(NAME)
        env = c.get("env", [])
        names = {e["name"] for e in env}
        refs = {m for e in env for m in re.findall(r"\$\((\w+)\)", e.get("value", ""))}
        assert names - refs <= ENV_VARS, f"unknown variables {sorted(names - refs - ENV_VARS)}"
        assert refs <= names
        node = next(e for e in env if e["name"] == "K8S_NODE_NAME")
        assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        values = {e["name"]: re.sub(r"\$\((\w+)\)", "node-1", e["value"])
                  for e in env if "value" in e}
        assert values["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
        # mounted ConfigMap files take the place of in-image paths
        files = {}
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
            cm = volumes[m["name"]].get("configMap")
            if cm:
                for key, text in cms[cm["name"]]["data"].items():
                    (tmp_path / key).write_text(text)
                    files[f"{m['mountPath']}/{key}"] = tmp_path / key
        out = accepted(c["args"], values, files)
        health = yaml.safe_load(next(x for x in out.splitlines()
                                     if x.startswith("health-listen:")).split("  #")[0])
        host, port = health["health-listen"].rsplit(":", 1)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert (get["host"], str(get["port"]), get["path"]) == (host, port, path)
        assert c["resources"]["limits"]["memory"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/sys/kernel/tracing", "/sys/fs/cgroup"} <= mounts


def test_example_config_file_is_valid() -> None:
    accepted(["run", "--config", str(DEPLOY / "agent.yaml")], {}, {})


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "ebpf-otlp.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_unit_verifies_and_its_command_is_accepted(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    unit = _unit()
    exec_start = unit["ExecStart"][0].split()
    assert exec_start[0] == "/opt/ebpf-otlp/bin/ebpf-otlp"
    accepted(exec_start[1:], {}, {"/etc/ebpf-otlp/agent.yaml": DEPLOY / "agent.yaml"})
    caps = set(unit["AmbientCapabilities"][0].split())
    assert caps == set(unit["CapabilityBoundingSet"][0].split())
    assert "CAP_SYS_ADMIN" not in caps and {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"} <= caps
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    # verify needs the binary to exist: the same unit with this tree's entry point
    exe = Path(sys.executable).parent / "ebpf-otlp"
    require(exe.exists(), "the ebpf-otlp entry point is not installed (pip install -e .)")
    text = (DEPLOY / "ebpf-otlp.service").read_text().replace(
        "/opt/ebpf-otlp/bin/ebpf-otlp", str(exe))
    copy = tmp_path / "ebpf-otlp.service"
    copy.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True, timeout=60)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines()
                if "ebpf-otlp.service" in ln]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


@pytest.mark.parametrize("path", sorted(p.name for p in DEPLOY.rglob("*.yaml")))
def test_every_yaml_file_parses(path: str) -> None:
    for p in DEPLOY.rglob(path):
        assert list(yaml.safe_load_all(p.read_text()))


def _mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", q)
    assert m, f"memory quantity {q!r}: expected Ki, Mi or Gi"
    return float(m.group(1)) * units[m.group(2)]


def test_resources_agree_with_the_soak() -> None:
    """The DaemonSet's memory request and limit and the unit's MemoryMax against
    the last soak (bench/results.json): the request covers the largest agent's
    peak, the limit and MemoryMax the sum of the four agents' peaks (one agent
    running all four signals shares one Python runtime, so it needs less)."""
    import json

    soak = json.loads((REPO / "bench/results.json").read_text())["benchmarks"]["soak"]
    notes = {f["name"]: f["note"] for f in soak["figures"]}
    peaks = {s: float(re.search(r"peak (\d+(?:\.\d+)?) MiB",
                                notes[f"{s}: RSS growth after warm-up"]).group(1))
             for s in ("flows", "tcp", "dns", "drops")}
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes/ebpf-otlp.yaml").read_text()))
    ds = next(d for d in docs if d and d["kind"] == "DaemonSet")
    res = ds["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert _mib(res["requests"]["memory"]) >= max(peaks.values()), (res, peaks)
    assert _mib(res["limits"]["memory"]) >= sum(peaks.values()), (res, peaks)
    (mem_max,) = _unit()["MemoryMax"]
    assert mem_max.endswith("M") and int(mem_max[:-1]) >= sum(peaks.values()), (mem_max, peaks)
