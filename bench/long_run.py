"""A long run against a real receiver, checked at the end against the kernel's own view
(not part of CI: ``sudo .venv/bin/python -m bench.long_run --minutes 30``).

For the whole run: TCP connections churn between namespaces a and b with more of them
open at once than the agent's socket table holds (``--tcp-max-sockets``), and UDP
datagrams to a closed port come from more distinct source ports than the
cardinality limit, so ``network.packet.drops`` has more series than the SDK keeps.
At the end the churn stops, every connection closes, and a last group opens (twice
as many per side as the table holds, so four times its size with both sides) and
stays open while the figures are read:

- ``network.tcp.connections.active`` per role must equal ``ss -tn state established``
  for the test port in each namespace (the client side in a, the server side in b),
  while more connections are open than the socket table holds: sock_ops keeps the
  gauge on each socket's own storage, so neither the churn through the table nor
  its size matters. The table really was too small:
  ``ebpf_otlp.tcp.dropped{reason=socket_map_full}`` must be above 0 (it now limits
  only the per-connection records: durations, bytes, spans, RTT), and
  ``{reason=socket_storage_failed}`` must be 0.
- ``network.tcp.connections.opened`` per role must equal the connections the client
  made (every one, not only those the table held).
- ``ebpf_otlp.metric.series.overflow{metric=network.packet.drops}`` must cover every
  one of our drop series the collector did not receive as a series of its own.

Prints one JSON line with the figures (``--save`` also writes it, with the time and
load, to ``bench/long_run.json``) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import PY, env, stop_process
from .lab import Agent, Topology

PORT = 18090
TABLE = 512  # the agent's socket table for this run: smaller than what is open at once
FINAL = 2 * TABLE  # connections per side held open while the figures are read
SAVE = Path(__file__).resolve().parent / "long_run.json"

SERVER = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
print("ready", flush=True)
def serve(c):
    while c.recv(4096): pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Keeps between `low` and `high` connections open, replacing random ones, for `secs`;
# then closes them all, opens `final` fresh ones and waits for a line on stdin.
CLIENT = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
import random, socket, sys, time
host, port, secs, low, high, final = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    *map(int, sys.argv[4:7])
open_ = []; made = 0; end = time.monotonic() + secs
while time.monotonic() < end:
    while len(open_) < high:
        open_.append(socket.create_connection((host, port))); made += 1
    for _ in range(random.randint(1, high - low)):
        open_.pop(random.randrange(len(open_))).close()
    time.sleep(0.05)
while open_:
    open_.pop().close()
time.sleep(2)
while len(open_) < final:
    open_.append(socket.create_connection((host, port))); made += 1
print(made, flush=True)
sys.stdin.readline()
for c in open_: c.close()
"""

DROPPER = r"""
import socket, sys, time
dst, port, first, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
for i in range(n):  # spread over the run: new series keep arriving
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", first + i))
    s.sendto(b"x", (dst, port)); s.close()
    time.sleep(secs / n)
"""


def established(topo: Topology, ns: str) -> int:
    out = topo.run(ns, "ss", "-Htn", "state", "established", f"( sport = :{PORT} or "
                   f"dport = :{PORT} )").stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def last_by_attrs(records: list[dict], name: str, key: str, **only: object) -> dict[str, float]:
    """The newest value per series of ``name`` (with the ``only`` attributes), summed per
    ``key`` attribute."""
    last: dict[tuple, tuple[int, float, str]] = {}
    for r in records:
        if r.get("type") == "metric" and r["name"] == name and all(
                r["attributes"].get(k) == v for k, v in only.items()):
            series = tuple(sorted(r["attributes"].items()))
            if series not in last or r["time_ns"] >= last[series][0]:
                last[series] = (r["time_ns"], r["value"], str(r["attributes"].get(key)))
    out: dict[str, float] = {}
    for _, v, k in last.values():
        out[k] = out.get(k, 0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.long_run")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--series", type=int, default=3000, help="distinct drop series to make")
    ap.add_argument("--save", action="store_true", help=f"also write the result to {SAVE}")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    secs = args.minutes * 60
    drop_port = random.randrange(30000, 40000)
    first_sport = random.randrange(41000, 50000)
    work = Path(tempfile.mkdtemp(prefix="eo-longrun-"))
    out = work / "otlp.jsonl"
    with Topology() as topo:
        rx = topo.popen(topo.a, PY, "-m", "ebpf_otlp", "receive", "--listen", "127.0.0.1:4318",
                        "--output", str(out), stderr=subprocess.PIPE, text=True, env=env())
        assert "receiving" in rx.stderr.readline()
        try:
            with Agent(topo, topo.a, "--signals", "tcp,drops", "--tcp-max-sockets", str(TABLE),
                       "--max-flows", "256", "--interval", "10", "--endpoint",
                       "http://127.0.0.1:4318", log_name="long_run.log") as agent:
                # ~400 connections/s close client-first: each leaves a client port in
                # TIME_WAIT for 60 s, more than the default ephemeral range holds. Let
                # the client namespace (ours, not the host) reuse them.
                topo.run(topo.a, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                         "net.ipv4.ip_local_port_range=10000 65000")
                server = topo.popen(topo.b, PY, "-c", SERVER, str(PORT), stdout=subprocess.PIPE,
                                    text=True, env=env())
                assert server.stdout.readline().strip() == "ready"
                client = topo.popen(topo.a, PY, "-c", CLIENT, topo.b_ip4, str(PORT), str(secs),
                                    "600", str(TABLE + 300), str(FINAL), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env())
                dropper = topo.popen(topo.a, PY, "-c", DROPPER, topo.b_ip4, str(drop_port),
                                     str(first_sport), str(args.series), str(secs * 0.9),
                                     env=env())
                made = int(client.stdout.readline())
                dropper.wait(60)
                time.sleep(25)  # two more export intervals: the last changes are exported
                ss_client, ss_server = established(topo, topo.a), established(topo, topo.b)
                recs = [json.loads(ln) for ln in out.read_text().splitlines()
                        if ln.endswith("}")]
                active = last_by_attrs(recs, "network.tcp.connections.active",
                                       "network.tcp.handshake.role", **{"server.port": PORT})
                opened = last_by_attrs(recs, "network.tcp.connections.opened",
                                       "network.tcp.handshake.role", **{"server.port": PORT})
                folded = last_by_attrs(recs, "ebpf_otlp.metric.series.overflow", "metric")
                ours_seen = {r["attributes"].get("source.port") for r in recs
                             if r.get("type") == "metric" and r["name"] == "network.packet.drops"
                             and r["attributes"].get("destination.port") == drop_port}
                refused = last_by_attrs(recs, "ebpf_otlp.tcp.dropped", "reason")
                client.stdin.write("\n")
                client.stdin.flush()
                client.wait(60)
                stop_process(server, 5)
                agent_log = agent.log()
        finally:
            stop_process(rx, 5)
    ours_folded = args.series - len(ours_seen - {None})
    result = {"minutes": args.minutes, "connections_made": made,
              "ss_established": {"client": ss_client, "server": ss_server},
              "connections_active": active, "connections_opened": opened,
              "socket_table": TABLE, "held_open_per_side": FINAL,
              "socket_table_full": refused.get("socket_map_full", 0),
              "socket_storage_failed": refused.get("socket_storage_failed", 0),
              "drop_series_made": args.series, "our_series_received": len(ours_seen),
              "our_series_folded": ours_folded,
              "series_overflow_counter": folded.get("network.packet.drops", 0),
              "agent_errors_logged": agent_log.count("Traceback")}
    ok = (active.get("client") == ss_client == FINAL and active.get("server") == ss_server == FINAL
          and opened.get("client") == made and opened.get("server") == made
          and result["socket_table_full"] > 0 and result["socket_storage_failed"] == 0
          and result["series_overflow_counter"] >= ours_folded > 0)
    result["ok"] = ok
    print(json.dumps(result))
    if args.save:
        result = {"started": started, "loadavg_1min_before": load_before,
                  "command": "python -m bench.long_run " + " ".join(argv or sys.argv[1:]),
                  **result}
        SAVE.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
