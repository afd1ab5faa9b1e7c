"""Rendering of results: a terminal table and bench/RESULTS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        v = float(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:,.2f} M"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def _rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if not r["figures"]:
            rows.append([r["name"], f"({r['status']}) " + "; ".join(r["notes"])[:100],
                         "", "", "", "", ""])
        for f in r["figures"]:
            rows.append([r["name"], f["name"], f"{fmt(f['value'])} {f['unit']}".strip(),
                         fmt(f["baseline"]), fmt(f["ratio"]), f["target"],
                         "" if f["met"] is None else fmt(f["met"])])
    return rows


def print_table(results: list[dict]) -> None:
    head = ["bench", "figure", "value", "baseline", "ratio", "target", "met"]
    rows = _rows(results)
    width = [min(70, max(len(str(x[i])) for x in [head, *rows])) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, width))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c)[:w].ljust(w) for c, w in zip(row, width)), flush=True)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, doc: dict) -> None:
    m = doc["machine"]
    out = ["# ebpf-otlp benchmark results", "",
           "Written by `make bench` (`.venv/bin/python -m bench`); do not edit by hand. "
           "Every figure is an absolute number and, where a baseline exists, the ratio to "
           "that baseline measured in the same run: the machines are shared and noisy, so "
           "the ratios are what carry over. Raw trials are in `bench/results.json`.", "",
           "## Machine", "",
           f"- Last run: {m['date_utc']} (each benchmark's own time is in its section)",
           f"- CPU: {m['cpu_model']}, {m['cpus']} CPUs"
           f"{' (virtual machine)' if m.get('hypervisor') else ''}, {m['cpu_mhz']} MHz, "
           f"{m['mem_gib']} GiB RAM, clocksource {m['clocksource']}",
           f"- Kernel: `{m['uname']}`",
           f"- Load average at the last run's start: {' '.join(m['loadavg_at_start'])} (other "
           "sessions share the machine)",
           f"- Python {m['python']}, libbpf {m['libbpf']}, OpenTelemetry SDK "
           f"{m['opentelemetry_sdk']}, {m['iperf3']}, {m['bpftrace']}", "",
           "## Summary", "",
           "| benchmark | figure | value | baseline | ratio | target | met |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in _rows(list(doc["benchmarks"].values())):
        out.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    out.append("")
    for r in doc["benchmarks"].values():
        out += [f"## {r['title']} (`{r['name']}`)", "",
                f"Status: **{r['status']}**; measured {r['raw'].get('measured_at', '?')}"
                f"{' in --quick mode' if r['raw'].get('quick') else ''}, "
                f"{r['seconds']} s; 1-minute load average before: "
                f"{r['raw'].get('loadavg_1min_before', '?')}.", "",
                f"Command: `{r['command']}`", ""]
        if r["figures"]:
            out += ["| figure | value | baseline (what) | ratio | target | met | notes |",
                    "| --- | --- | --- | --- | --- | --- | --- |"]
            for f in r["figures"]:
                base = "-" if f["baseline"] is None else \
                    f"{fmt(f['baseline'])} ({f['baseline_name']})"
                out.append("| " + " | ".join(_md_escape(x) for x in [
                    f["name"], f"{fmt(f['value'])} {f['unit']}", base, fmt(f["ratio"]),
                    f["target"] or "-", "-" if f["met"] is None else fmt(f["met"]),
                    f["note"] or ""]) + " |")
            out.append("")
        for n in r["notes"]:
            out.append(f"- {n}")
        if r["notes"]:
            out.append("")
    path.write_text("\n".join(out) + "\n")
