"""What a test run may leave behind in the host's own network namespace and
tracefs: qdiscs, clsact filters and XDP programs of its interfaces, the
interfaces themselves, named network namespaces and uprobe_events lines.
conftest.py snapshots it at session start and compares at the end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return res.stdout if res.returncode == 0 else ""


def _uprobe_events() -> set[str]:
    for base in TRACEFS:
        p = Path(base, "uprobe_events")
        if p.exists():
            try:
                return {ln for ln in p.read_text().splitlines() if ln.strip()}
            except OSError:
                return set()
    return set()


def snapshot() -> dict[str, set[str]]:
    """The host namespace's state, as sets of readable lines per kind."""
    links = json.loads(_run("ip", "-j", "link", "show") or "[]")
    qdiscs = json.loads(_run("tc", "-j", "qdisc", "show") or "[]")
    out: dict[str, set[str]] = {
        "interface": {ln["ifname"] for ln in links},
        "qdisc": {f"dev {q.get('dev')}: {q['kind']} {q.get('handle', '')} "
                  f"{'root' if q.get('root') else 'parent ' + str(q.get('parent'))}"
                  for q in qdiscs},
        "xdp program": {f"dev {ln['ifname']}: {json.dumps(ln['xdp'], sort_keys=True)}"
                        for ln in links if ln.get("xdp")},
        "tc filter": set(),
        "network namespace": set(os.listdir("/run/netns")) if Path("/run/netns").is_dir()
        else set(),
        "uprobe_events line": _uprobe_events(),
    }
    for dev in sorted({q.get("dev") for q in qdiscs if q["kind"] == "clsact"}):
        for d in ("ingress", "egress"):
            for line in _run("tc", "filter", "show", "dev", dev, d).splitlines():
                if line.strip():
                    out["tc filter"].add(f"dev {dev} {d}: {line.strip()}")
    return out


def _dev(item: str) -> str:
    return item[4:].split(":", 1)[0].split(" ", 1)[0]  # "dev lo ingress: ..." -> "lo"


def left_behind(before: dict[str, set[str]], after: dict[str, set[str]]) -> list[str]:
    """Readable lines for what ``after`` has and ``before`` had not, and for what
    was removed from an interface that is still there (its qdiscs, filters, XDP)."""
    out = [f"{kind}: {item}" for kind in after
           for item in sorted(after[kind] - before.get(kind, set()))]
    for kind in ("qdisc", "tc filter", "xdp program"):
        out += [f"removed {kind}: {item}"
                for item in sorted(before.get(kind, set()) - after[kind])
                if _dev(item) in after["interface"]]
    return out
