"""Hubble bridge: flows per second sustained with nothing lost, CPU per 1,000 flows.

A paced stand-in for a Hubble server (bench/hubble_server.py: raw HTTP/2,
one DATA frame per flow, flow control honoured) serves L3/L4 trace events at
a fixed rate; ``ebpf-otlp hubble --server`` follows it and exports to an
OTLP receiver in this process. A rate is sustained when the sender never fell
more than 0.5 s behind its schedule (a real Hubble does not wait for a slow
client: what its buffer cannot hold is lost) and the exported
``network.flow.packets`` add up to every flow sent. The bridge's CPU
(user+system, /proc) is measured over each run. Baseline in the same run:
the same bridge with grpcio's client (``--hubble-client grpcio``), at the
rates it can take.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import PY, Figure, Result, command_for, env, stop_process, wait_until

NAME = "hubble_bridge"
TITLE = "Hubble bridge: flows/s sustained with no loss, CPU per 1,000 flows"
NEEDS_ROOT = False
TARGET = 40_000
MAX_LAG_S = 0.5


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Counter:
    def __init__(self) -> None:
        self.packets = 0.0
        self.lock = threading.Lock()

    def sink(self, r: dict) -> None:
        if r.get("type") == "metric" and r["name"] == "network.flow.packets":
            with self.lock:
                self.packets += r["value"]


def one_rate(rate: float, seconds: float, client: str, workdir: Path) -> dict:
    from ebpf_otlp.receiver import Receiver

    counter = _Counter()
    portfile = workdir / f"port-{client}-{int(rate)}"
    server = subprocess.Popen([PY, "-m", "bench.hubble_server", str(portfile), str(rate),
                               str(seconds)], stdout=subprocess.PIPE, text=True, env=env(),
                              cwd=str(Path(__file__).resolve().parent.parent))
    try:
        if not wait_until(portfile.exists, 120):
            raise RuntimeError("bench Hubble server did not start")
        port = portfile.read_text().strip()
        with Receiver("127.0.0.1", 0, sink=counter.sink) as rx:
            e = dict(env(), OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta")
            log_path = workdir / f"bridge-{client}-{int(rate)}.log"
            log = open(log_path, "w")  # noqa: SIM115
            bridge = subprocess.Popen(
                [PY, "-m", "ebpf_otlp", "hubble", "--server", f"127.0.0.1:{port}",
                 "--hubble-client", client, "--endpoint", f"http://127.0.0.1:{rx.port}",
                 "--interval", "1"], stdout=log, stderr=log, env=e)
            # Start-up (imports) is not per-flow cost: CPU counts from the "running" line.
            if not wait_until(lambda: "hubble running" in log_path.read_text(), 60):
                raise RuntimeError(f"bridge did not start: {log_path.read_text()}")
            cpu0 = _cpu_s(bridge.pid)
            line = server.stdout.readline()  # the server's summary, when all was sent
            sent = json.loads(line) if line.strip() else {"sent": 0, "lag_max_s": None}
            n = sent["sent"]
            wait_until(lambda: counter.packets >= n, 30 + n / 5000)
            cpu = _cpu_s(bridge.pid) - cpu0
            stop_process(bridge)
            log.close()
            time.sleep(0.2)
    finally:
        stop_process(server, 5)
    return {"rate": rate, "client": client, "sent": n, "exported": counter.packets,
            "lag_max_s": sent["lag_max_s"], "send_seconds": sent.get("seconds"),
            "cpu_s": cpu, "cpu_s_per_1000": cpu / n * 1000 if n else None,
            "ok": bool(n) and counter.packets == n and sent["lag_max_s"] < MAX_LAG_S}


def file_rate(n: int, workdir: Path) -> dict:
    """``ebpf-otlp hubble --file`` over an export file of ``n`` flows written in advance:
    how fast it reads, decodes and maps them, and its CPU per 1,000 lines."""
    from google.protobuf import json_format

    from ebpf_otlp.receiver import Receiver
    from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb

    from .hubble_server import flow_messages

    path = workdir / "events.log"
    with open(path, "wb") as f:
        for raw in flow_messages(n):
            ev = opb.ExportEvent.FromString(raw)
            f.write(json_format.MessageToJson(ev, preserving_proto_field_name=True,
                                              indent=None).encode() + b"\n")
    counter = _Counter()
    with Receiver("127.0.0.1", 0, sink=counter.sink) as rx:
        e = dict(env(), OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta")
        log_path = workdir / "bridge-file.log"
        log = open(log_path, "w")  # noqa: SIM115
        bridge = subprocess.Popen([PY, "-m", "ebpf_otlp", "hubble", "--file", str(path),
                                   "--endpoint", f"http://127.0.0.1:{rx.port}",
                                   "--interval", "0.5"], stdout=log, stderr=log, env=e)
        wait_until(lambda: "hubble running" in log_path.read_text(), 60)
        cpu0, t0 = _cpu_s(bridge.pid), time.monotonic()
        wait_until(lambda: counter.packets >= n, 60 + n / 2000, interval=0.01)
        # The last export can be up to one interval after the last line was mapped.
        elapsed = time.monotonic() - t0
        cpu = _cpu_s(bridge.pid) - cpu0
        stop_process(bridge)
        log.close()
    return {"lines": n, "exported": counter.packets, "seconds": elapsed, "cpu_s": cpu,
            "cpu_s_per_1000": cpu / n * 1000, "lines_per_s": n / elapsed}


def json_decode_cost(n: int = 20_000) -> tuple[float, float]:
    """CPU s per 1,000 export lines decoded in this process: ours (json + jsonpb.merge)
    and protobuf's own ``json_format.Parse``, on the same lines."""
    from google.protobuf import json_format

    from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb
    from ebpf_otlp.signals.hubble.source_file import parse_line

    from .hubble_server import flow_messages

    lines = [json_format.MessageToJson(opb.ExportEvent.FromString(r),
                                       preserving_proto_field_name=True, indent=None).encode()
             for r in flow_messages(n)]
    t = time.process_time()
    for line in lines:
        parse_line(line, None)
    ours = time.process_time() - t
    t = time.process_time()
    for line in lines:
        json_format.Parse(line, opb.ExportEvent())
    theirs = time.process_time() - t
    return ours / n * 1000, theirs / n * 1000


def ladder(client: str, rates: list[float], seconds: float, workdir: Path) -> list[dict]:
    out = []
    for rate in rates:
        r = one_rate(rate, seconds, client, workdir)
        out.append(r)
        print(f"  {client:6s} {rate:8.0f}/s: sent {r['sent']}, exported {r['exported']:.0f}, "
              f"lag {r['lag_max_s']:.3f}s, {r['cpu_s_per_1000'] or 0:.4f} CPU s/1000 "
              f"{'ok' if r['ok'] else 'LOST/BEHIND'}", flush=True)
        if not r["ok"]:
            break
    return out


def run(quick: bool) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    seconds = 1.0 if quick else 8.0
    ours_rates = [5_000.0] if quick else [10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0,
                                          60_000.0, 80_000.0]
    base_rates = [2_000.0] if quick else [2_500.0, 5_000.0, 10_000.0, 20_000.0]
    with tempfile.TemporaryDirectory(prefix="eo-hubble-") as d:
        ours = ladder("h2", ours_rates, seconds, Path(d))
        base = ladder("grpcio", base_rates, seconds, Path(d))
        fr = file_rate(5_000 if quick else 200_000, Path(d))
    res.raw["h2"], res.raw["grpcio"], res.raw["file"] = ours, base, fr
    print(f"  file   {fr['lines']} lines in {fr['seconds']:.2f}s, "
          f"{fr['cpu_s_per_1000']:.4f} CPU s/1000", flush=True)

    def best(rows: list[dict]) -> dict | None:
        good = [r for r in rows if r["ok"]]
        return max(good, key=lambda r: r["rate"]) if good else None

    b_ours, b_base = best(ours), best(base)
    res.add(Figure.compare(
        "flows/s sustained, nothing lost (our HTTP/2 reader)",
        b_ours["rate"] if b_ours else None, "flows/s",
        b_base["rate"] if b_base else None, "same bridge with grpcio's client",
        note=f"target {TARGET:,}/s on one core; ladder stops at the first rate that fails"))
    if b_ours:
        res.add(Figure("target 40,000 flows/s", b_ours["rate"], "flows/s",
                       target=f">= {TARGET}", met=b_ours["rate"] >= TARGET))
    c_ours = b_ours["cpu_s_per_1000"] if b_ours else None
    c_base = b_base["cpu_s_per_1000"] if b_base else None
    res.add(Figure.compare("bridge CPU per 1,000 flows (at the highest sustained rate)",
                           c_ours, "CPU s", c_base, "grpcio's client", higher_is_better=False))
    if c_ours:
        res.add(Figure("flows per CPU-second (1 / CPU per flow)", 1.0 / c_ours * 1000,
                       "flows/CPU-s"))
    res.add(Figure("export file: lines/s read, decoded, mapped and exported (--file)",
                   fr["lines_per_s"], "lines/s",
                   note=f"{fr['lines']:,} lines written in advance; exported "
                   f"{fr['exported']:.0f}; includes up to one 0.5 s interval of waiting"))
    res.add(Figure("export file: bridge CPU per 1,000 lines", fr["cpu_s_per_1000"], "CPU s"))
    ours_j, pb_j = json_decode_cost(2_000 if quick else 20_000)
    res.add(Figure.compare("export-file JSON decode, CPU per 1,000 lines (jsonpb.merge)", ours_j,
                           "CPU s", pb_j, "protobuf's json_format.Parse",
                           higher_is_better=False))
    res.note(f"Each rate runs for {seconds:g}s; 'nothing lost' = every flow sent came out as "
             f"network.flow.packets and the sender was never more than {MAX_LAG_S:g}s behind "
             "schedule. The stand-in server, the receiver and the bridge share this machine's "
             "cores.")
    if not b_ours:
        res.status = "partial"
    return res
