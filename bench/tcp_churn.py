"""TCP: connection churn with the agent's TCP signal attached versus not.

Short connections (connect, 100 bytes each way, close) between two
namespaces over veth, for a fixed time per trial; trials alternate without
and with the agent (``--signals tcp``, exporting every second to a local
receiver) so load drift hits both sides alike. Reported: connections per
second in each mode (median of trials), their ratio (target >= 0.95), and
the agent's CPU while attached (percent of one CPU and microseconds per
connection; every connection is seen twice, client and server side).

    sudo .venv/bin/python -m bench.tcp_churn [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from .common import PY, Figure, Result, command_for, env, median

NAME = "tcp_churn"
TITLE = "TCP: connection churn with the TCP signal attached vs not, and agent CPU"
TARGET_RATIO = 0.95
PORT = 18080

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096); c.sendall(b"r" * 100); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0; end = time.monotonic() + secs; t0 = time.monotonic()
while time.monotonic() < end:
    c = socket.create_connection((host, port))
    c.sendall(b"q" * 100)
    while c.recv(4096): pass
    c.close(); n += 1
print(json.dumps({"n": n, "secs": time.monotonic() - t0}))
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bpf_seconds(rx) -> float:
    from otlp import metric_total

    return metric_total(rx.metrics("ebpf_otlp.program.run_time", signal="tcp"))


def _churn(topo, secs: float) -> float:
    out = topo.run(topo.a, PY, "-c", CLIENT, topo.b_ip4, str(PORT), str(secs),
                   timeout=secs + 60)
    r = json.loads(out.stdout)
    return r["n"] / r["secs"]


def run(quick: bool = False) -> Result:
    from netns import Topology
    from otlp import AgentProc, ReceiverProc

    res = Result(NAME, TITLE, command_for(NAME, quick))
    trials, secs = (2, 2.0) if quick else (5, 5.0)
    base, attached, cpu_pct, cpu_us, bpf_ns = [], [], [], [], []
    os.environ.update(env())
    with Topology() as topo, ReceiverProc(topo, topo.a) as rx:
        # Many short connections: let the client reuse its TIME_WAIT ports.
        topo.run(topo.a, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                 "net.ipv4.ip_local_port_range=10000 65000")
        server = topo.popen(topo.b, PY, "-c", SERVER, str(PORT), stdout=subprocess.PIPE,
                            text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            _churn(topo, 1.0)  # warm up
            for _ in range(trials):
                base.append(_churn(topo, secs))
                k0 = _bpf_seconds(rx)
                with AgentProc(topo, topo.a, rx, "--signals", "tcp") as agent:
                    time.sleep(1.0)  # let start-up work settle
                    c0, t0 = _cpu_seconds(agent.proc.pid), time.monotonic()
                    rate = _churn(topo, secs)
                    c1, t1 = _cpu_seconds(agent.proc.pid), time.monotonic()
                # run time of the TCP programs over the agent's life (includes
                # other traffic on the host, so an upper bound)
                bpf_ns.append(1e9 * (_bpf_seconds(rx) - k0) / max(1.0, rate * (t1 - t0)))
                attached.append(rate)
                cpu_pct.append(100 * (c1 - c0) / (t1 - t0))
                cpu_us.append(1e6 * (c1 - c0) / max(1.0, rate * (t1 - t0)))
        finally:
            server.kill()
            server.wait()
    b, a = median(base), median(attached)
    res.add(Figure.compare("connections/s with agent", a, "conn/s", b, "without agent",
                           target=TARGET_RATIO,
                           note="short connections over veth between two namespaces"))
    res.add(Figure("agent CPU while attached", median(cpu_pct), "% of one CPU"))
    res.add(Figure("agent CPU per connection", median(cpu_us), "us/conn",
                   note="both ends of each connection are observed"))
    res.add(Figure("kernel time in the TCP programs per connection", median(bpf_ns), "ns/conn",
                   note="BPF run time (both ends, all tracepoints and sock_ops), upper bound"))
    res.raw.update(base=base, attached=attached, cpu_pct=cpu_pct, cpu_us=cpu_us, bpf_ns=bpf_ns)
    res.note(f"{trials} alternating trials of {secs:g} s; medians")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    r = run(args.quick)
    for f in r.figures:
        print(f"{f.name}: {f.value:.1f} {f.unit}"
              + (f" (baseline {f.baseline:.1f}, ratio {f.ratio:.3f})" if f.ratio else ""))
    for n in r.notes:
        print(n)


if __name__ == "__main__":
    main()
