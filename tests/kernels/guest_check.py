"""The portability check: the project's real objects and signals on the
kernel this runs on.

It runs unchanged in two places: natively on the host (in a private network
namespace) and as the only program of the QEMU guest booted by guestvm.py.
Each result is one line ``@@EBPF_OTLP@@ {json}`` on stdout (the guest's
serial console), parsed by test_guest_kernel.py.

Three parts:
1. objects: every program of every packaged ``*.bpf.o`` is loaded on its own
   and attached to a real hook (loopback for TC/XDP, the cgroup v2 root for
   sock_ops, libc for uprobes). Optional fast-path variants (kprobe, fentry,
   ...) count as "unavailable" where the kernel refuses them, and of several
   programs for one tracepoint (struct flavours for older kernels) one must
   load (results.hook_groups). The self-test object's probes are also
   triggered and must count a hit.
2. signals: each signal runs through the project's own Agent, exporting over
   OTLP/HTTP to the project's own receiver on loopback, while a short
   scenario makes traffic whose truth the scenario knows (datagrams sent and
   received, connections accepted, queries answered, datagrams to a closed
   port). The exported metrics are compared with that truth.
3. extra objects (``--extra DIR``): test-only objects of the tier itself,
   e.g. one that reads a tracepoint field at a hard-coded offset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

PREFIX = "@@EBPF_OTLP@@ "
OPTIONAL_PREFIXES = ("kprobe", "kretprobe", "fentry", "fexit", "fmod_ret", "tp_btf", "lsm",
                     "ksyscall", "kretsyscall")
SIGNALS = ("flows", "tcp", "dns", "drops", "http")
LO = "127.0.0.1"


def emit(event: str, **fields: object) -> None:
    print(PREFIX + json.dumps({"event": event, "kernel": platform.release(), **fields},
                              default=str), flush=True)


def first_line(e: BaseException) -> str:
    """The error, plus the line of libbpf's log that says why (verifier or CO-RE)."""
    text = str(e).strip() or type(e).__name__
    lines = [ln.replace("libbpf: ", "").strip() for ln in text.splitlines()]
    why = ""
    for i, ln in enumerate(lines):
        if ln.startswith("processed ") and " insns " in ln and i > 0:
            why = lines[i - 1]  # the verifier's last word before its statistics
            break
        if "failed to resolve CO-RE" in ln or ("relo #" in ln and "failed" in ln):
            why = ln
            break
    return (lines[0] + (f" | {why}" if why else ""))[:400]


def log_tail(e: BaseException, n: int = 25) -> list[str]:
    return [ln for ln in getattr(e, "log", [])][-n:]


def bring_up_lo() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)


def cgroup2_path() -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "cgroup2":
            return parts[1]
    raise OSError(2, "no cgroup v2 mount")


# --- part 1: every program of every object ---------------------------------------------

# Self-test probes: the key each one adds to the `hits` map, and what fires it.
SELFTEST_FIRE: dict[str, tuple[int, Callable[[], None]]] = {
    "probe_tracepoint": (1, lambda: os.getppid()),
    "probe_raw_tracepoint": (2, lambda: os.getppid()),
    "probe_kprobe": (3, lambda: time.sleep(0.001)),   # nanosleep -> do_nanosleep
    "probe_fentry": (4, lambda: time.sleep(0.001)),
    "probe_uprobe": (5, lambda: _libc_getpid()),
    "probe_uretprobe": (6, lambda: _libc_getpid()),
    "probe_sockops": (7, lambda: _tcp_roundtrip()),
}


def _libc_getpid() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").getpid()


def _tcp_roundtrip() -> None:
    with socket.socket() as srv:
        srv.bind((LO, 0))
        srv.listen()
        with socket.create_connection(srv.getsockname(), timeout=5):
            conn, _ = srv.accept()
            conn.close()


def attach_generic(prog: object, ifindex: int) -> str:
    """Attach one program to a real hook chosen from its section name."""
    sec = prog.section
    kind = sec.split("/")[0]
    if kind in ("tc", "classifier", "tcx", "action"):
        direction = "egress" if "egress" in prog.name or "egress" in sec else "ingress"
        prog.attach_tc(ifindex, direction)
        return f"tc {direction} lo"
    if kind == "xdp":
        prog.attach_xdp(ifindex)
        return "xdp lo"
    if kind in ("sockops", "cgroup_skb", "cgroup"):
        path = cgroup2_path()
        prog.attach_cgroup(path)
        return f"cgroup {path}"
    if kind in ("uprobe", "uretprobe") and sec in ("uprobe", "uretprobe"):
        prog.attach_uprobe("libc.so.6", "getpid", retprobe=kind == "uretprobe")
        return f"{kind} libc:getpid"
    prog.attach()
    return sec


def check_objects(objdir: Path, ifindex: int) -> None:
    from ebpf_otlp.platform.bpfobj import BpfObject

    for path in sorted(objdir.glob("*.bpf.o")):
        name = path.name.split(".")[0]
        try:
            progs = list(BpfObject.open_file(path, name).programs.values())
            progs = [(p.name, p.section) for p in progs]
        except Exception as e:
            emit("program", object=name, program="*", section="", optional=False,
                 loaded=False, attached=False, error=first_line(e))
            continue
        for pname, section in progs:
            res: dict[str, object] = {
                "object": name, "program": pname, "section": section,
                "optional": section.split("/")[0] in OPTIONAL_PREFIXES,
                "loaded": False, "attached": False}
            try:
                with BpfObject.open_file(path, name) as obj:
                    obj.only_programs([pname])
                    t0 = time.monotonic()
                    obj.load()
                    res["load_s"] = round(time.monotonic() - t0, 3)
                    res["loaded"] = True
                    prog = obj.programs[pname]
                    res["hook"] = attach_generic(prog, ifindex)
                    res["attached"] = True
                    if name == "selftest" and pname in SELFTEST_FIRE:
                        key, fire = SELFTEST_FIRE[pname]
                        for _ in range(3):
                            fire()
                        raw = obj.maps["hits"].lookup(key)
                        res["fired"] = int.from_bytes(raw[:8], "little") if raw else 0
            except Exception as e:
                res["error"] = first_line(e)
                res["log"] = log_tail(e)
            emit("program", **res)


# --- part 2: each signal through the agent ------------------------------------------------

def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def scenario_flows() -> dict:
    """Seven 100-byte datagrams between two bound UDP sockets."""
    n, size = 7, 100
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind((LO, 0))
        tx.bind((LO, 0))
        rx.settimeout(5)
        for _ in range(n):
            tx.sendto(b"f" * size, rx.getsockname())
        got = sum(1 for _ in range(n) if len(rx.recv(2048)) == size)
        return {"sent": n, "received": got, "size": size,
                "sport": tx.getsockname()[1], "dport": rx.getsockname()[1]}


def scenario_tcp() -> dict:
    """Three connections that exchange data and close, and one refused connect."""
    n = 3
    accepted = 0
    with socket.socket() as srv:
        srv.bind((LO, 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        for _ in range(n):
            with socket.create_connection((LO, port), timeout=5) as c:
                conn, _ = srv.accept()
                with conn:
                    c.sendall(b"x" * 1000)
                    got = 0
                    while got < 1000:
                        got += len(conn.recv(4096))
                    accepted += 1
    closed = _free_port(socket.SOCK_STREAM)
    refused = 0
    try:
        socket.create_connection((LO, closed), timeout=5).close()
    except ConnectionRefusedError:
        refused = 1
    time.sleep(0.2)  # let TIME_WAIT/close transitions reach the tracepoints
    return {"connections": accepted, "port": port, "refused": refused, "refused_port": closed}


def scenario_dns() -> dict:
    """Two A queries answered by a small responder on 127.0.0.1:53."""
    import dns.message
    import dns.query
    import dns.rrset

    stop = threading.Event()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((LO, 53))
    srv.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = srv.recvfrom(2048)
            except TimeoutError:
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
            srv.sendto(r.to_wire(), peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    answered = 0
    name = "portability.ebpf-otlp.test"
    try:
        for _ in range(2):
            resp = dns.query.udp(dns.message.make_query(name, "A"), LO, port=53, timeout=5)
            answered += bool(resp.answer)
    finally:
        stop.set()
        t.join()
        srv.close()
    return {"queries": 2, "answered": answered, "name": name}


def scenario_drops() -> dict:
    """Five datagrams to a UDP port nobody listens on: the kernel drops them."""
    port = _free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(5):
            tx.sendto(b"d" * 32, (LO, port))
            time.sleep(0.01)
    return {"sent": 5, "port": port}


# argv: [address [port]] (127.0.0.1, any free port); prints the port it listens on.
HTTP_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
a = sys.argv[1:] + ["127.0.0.1", "0"][len(sys.argv) - 1:]
s = http.server.HTTPServer((a[0], int(a[1])), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""
HTTP_CLIENT = """
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
for i in range(int(sys.argv[2])):
    c.request("GET", f"/guest-{sys.argv[1]}-{i}")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"ok"
print("done", flush=True)
"""


def scenario_http() -> dict:
    """Three keep-alive GETs between two other processes (the agent skips its own)."""
    n = 3
    server = subprocess.Popen([sys.executable, "-c", HTTP_SERVER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        out = subprocess.run([sys.executable, "-c", HTTP_CLIENT, str(port), str(n)],
                             capture_output=True, text=True, timeout=30)
        answered = n if out.stdout.strip() == "done" else 0
    finally:
        server.kill()
        server.wait()
    return {"requests": n, "answered": answered, "port": port}


SCENARIOS: dict[str, Callable[[], dict]] = {
    "flows": scenario_flows, "tcp": scenario_tcp, "dns": scenario_dns, "drops": scenario_drops,
    "http": scenario_http}


def _points(records: list[dict], name: str, **attrs: object) -> list[dict]:
    return [r for r in records if r.get("type") == "metric" and r.get("name") == name
            and all(str(r["attributes"].get(k)) == str(v) for k, v in attrs.items())]


def _total(points: list[dict], field: str = "value") -> float:
    """Sum over series: deltas add up, a cumulative series counts its latest point."""
    latest: dict[str, dict] = {}
    total = 0.0
    for p in points:
        if p.get("temporality") == "cumulative":
            key = json.dumps(p["attributes"], sort_keys=True)
            if key not in latest or p["time_ns"] >= latest[key]["time_ns"]:
                latest[key] = p
        else:
            total += p.get(field, 0)
    return total + sum(p.get(field, 0) for p in latest.values())


def verdict_flows(rec: list[dict], t: dict) -> tuple[bool, str]:
    key = {"network.transport": "udp", "source.address": LO, "source.port": t["sport"],
           "destination.address": LO, "destination.port": t["dport"]}
    tx = _total(_points(rec, "network.flow.packets", **key, **{"network.io.direction": "transmit"}))
    rx = _total(_points(rec, "network.flow.packets", **key, **{"network.io.direction": "receive"}))
    nbytes = _total(_points(rec, "network.flow.bytes", **key,
                            **{"network.io.direction": "transmit"}))
    # Bytes as the kernel counts them: IP+UDP (28) or, on loopback's fake
    # Ethernet, 14 more; either is right, anything else is not.
    ok_bytes = nbytes in (t["sent"] * (t["size"] + 28), t["sent"] * (t["size"] + 42))
    ok = t["received"] == t["sent"] and tx == t["sent"] and rx == t["sent"] and ok_bytes
    return ok, f"sent {t['sent']} received {t['received']}; exported tx {tx:g} rx {rx:g} " \
               f"packets, tx {nbytes:g} bytes"


def verdict_tcp(rec: list[dict], t: dict) -> tuple[bool, str]:
    # Tracepoints see every namespace: the address and port single out ours.
    opened = _points(rec, "network.tcp.connections.opened",
                     **{"server.address": LO, "server.port": t["port"]})
    roles = {str(p["attributes"].get("network.tcp.handshake.role")) for p in opened}
    by_role = {r: _total([p for p in opened
                          if str(p["attributes"].get("network.tcp.handshake.role")) == r])
               for r in roles}
    failed = _total(_points(rec, "network.tcp.connections.failed",
                            **{"server.address": LO, "server.port": t["refused_port"]}))
    # All closed: each role's active series exists (its +1 was counted) and is
    # back to 0 (so was its -1).
    active = _points(rec, "network.tcp.connections.active",
                     **{"server.address": LO, "server.port": t["port"]})
    act = {r: _total([p for p in active
                      if str(p["attributes"].get("network.tcp.handshake.role")) == r])
           for r in {str(p["attributes"].get("network.tcp.handshake.role")) for p in active}}
    ok = (t["connections"] == 3 and by_role.get("client") == t["connections"]
          and by_role.get("server") == t["connections"] and failed >= t["refused"]
          and act == {"client": 0, "server": 0})
    return ok, f"{t['connections']} accepted, {t['refused']} refused; exported opened " \
               f"{by_role}, active after close {act}, failed {failed:g}"


def verdict_dns(rec: list[dict], t: dict) -> tuple[bool, str]:
    hist = _points(rec, "dns.lookup.duration")
    count = _total(hist, "count")
    spans = [r for r in rec if r.get("type") == "span"
             and str(r["attributes"].get("dns.question.name", "")).rstrip(".") == t["name"]]
    ok = t["answered"] == t["queries"] and count == t["queries"] and len(spans) == t["queries"]
    return ok, f"{t['answered']}/{t['queries']} answered; exported {count:g} durations, " \
               f"{len(spans)} spans"


def verdict_drops(rec: list[dict], t: dict) -> tuple[bool, str]:
    pts = [p for p in _points(rec, "network.packet.drops")
           if "NO_SOCKET" in str(p["attributes"].get("network.drop.reason", ""))]
    ours = [p for p in pts if str(p["attributes"].get("destination.port")) == str(t["port"])
            and p["attributes"].get("destination.address") == LO]
    n = _total(ours)
    reasons = sorted({str(p["attributes"].get("network.drop.reason"))
                      for p in _points(rec, "network.packet.drops")})
    return n == t["sent"], f"{t['sent']} sent to closed port; exported {n:g} NO_SOCKET " \
                           f"drops for it (reasons seen: {reasons[:6]})"


def verdict_http(rec: list[dict], t: dict) -> tuple[bool, str]:
    paths = {f"/guest-{t['port']}-{i}" for i in range(t["requests"])}
    spans = [r for r in rec if r.get("type") == "span"
             and r["attributes"].get("url.path") in paths]
    got = sorted((r["kind"], r["attributes"].get("url.path"),
                  r["attributes"].get("http.response.status_code")) for r in spans)
    want = sorted((k, p, 200) for k in ("CLIENT", "SERVER") for p in paths)
    ok = t["answered"] == t["requests"] and got == want
    return ok, f"{t['answered']}/{t['requests']} answered; exported {len(spans)} spans " \
               f"({sum(1 for g in got if g[0] == 'SERVER')} SERVER)"


VERDICTS = {"flows": verdict_flows, "tcp": verdict_tcp, "dns": verdict_dns,
            "drops": verdict_drops, "http": verdict_http}


def check_signal(name: str) -> None:
    from ebpf_otlp import signals as sigs

    if name not in sigs.available():
        emit("signal", signal=name, status="absent", detail="not in the signal registry")
        return
    try:
        sigs.load(name)
    except Exception as e:  # a registered signal whose module does not import is broken
        emit("signal", signal=name, status="broken", started=False, records_ok=False,
             error=f"{type(e).__name__}: {first_line(e)}")
        return
    from ebpf_otlp.agent import Agent
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.receiver import Receiver

    res: dict[str, object] = {"signal": name, "started": False, "records_ok": False}
    rx = Receiver(LO, 0).start()
    agent = None
    try:
        cfg = AgentConfig(ifaces=["lo"], signals=(name,), endpoint=f"http://{LO}:{rx.port}",
                          interval_s=3600, ringbuf_wakeup_bytes=0, poll_interval_ms=20,
                          tcp_spans=False, dns_timeout_s=2.0, http_tls=False)
        agent = Agent(cfg, strict=True)
        t0 = time.monotonic()
        agent.start()
        res["start_s"] = round(time.monotonic() - t0, 2)
        res["started"] = True
        res["programs"] = [f"{p.name}:{p.section}" for s in agent.signals for p in s.programs()]
        truth = SCENARIOS[name]()
        time.sleep(0.5)  # the poller drains rings every 20 ms; let it catch up
        agent.close()  # final drain, collect and flush to the receiver
        agent = None
        # close() flushed synchronously; a short grace for the receiver's threads.
        deadline = time.monotonic() + 2
        ok, detail = VERDICTS[name](rx.records, truth)
        while not ok and time.monotonic() < deadline:
            time.sleep(0.2)
            ok, detail = VERDICTS[name](rx.records, truth)
        res["records_ok"], res["detail"] = ok, detail
    except Exception as e:
        res["error"] = first_line(e)
        res["trace"] = traceback.format_exc()[-1500:]
    finally:
        if agent is not None:
            try:
                agent.close(flush_timeout_s=1)
            except Exception:
                pass
        rx.stop()
    emit("signal", **res)


def check_http_capture() -> None:
    """What ``--http-capture`` resolves to on this kernel, and what asking for
    socket mode says where the kernel cannot do it."""
    from ebpf_otlp.config import ConfigError
    from ebpf_otlp.signals.http.capture import capture_mode

    try:
        forced = capture_mode("socket")
    except ConfigError as e:
        forced = f"error: {e}"
    emit("http_capture", auto=capture_mode("auto"), socket=forced)


# --- part 3: test-only objects of the tier itself -------------------------------------------

def check_reason_object(path: Path) -> None:
    """``nonportable.bpf.o``: two kfree_skb programs that record the drop reason,
    one through CO-RE, one at the offset the build host's tracepoint has."""
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.btf import kernel_enum

    no_socket = next(v for v, n in kernel_enum("skb_drop_reason").items()
                     if n.endswith("NO_SOCKET"))
    with BpfObject.open_file(path, "nonportable") as obj:
        obj.load()
        for p in obj.programs.values():
            p.attach()
        t = scenario_drops()
        time.sleep(0.1)
        for pname, mapname in (("reason_core", "seen_core"), ("reason_fixed", "seen_fixed")):
            seen = {int.from_bytes(k[:4], "little"): int.from_bytes(v[:8], "little")
                    for k, v in obj.maps[mapname].items()}
            emit("extra", object="nonportable", program=pname, no_socket=no_socket,
                 seen=seen, records_ok=seen.get(no_socket, 0) >= t["sent"])


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", default=None, help="directory of *.bpf.o [the package's]")
    ap.add_argument("--extra", default=None, help="directory of test-only objects")
    ap.add_argument("--signals", default=",".join(SIGNALS))
    ap.add_argument("--no-doctor", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    emit("start", python=sys.version.split()[0])
    bring_up_lo()
    import ebpf_otlp
    from ebpf_otlp.platform.mounts import ensure_tracefs

    ensure_tracefs()
    objdir = Path(args.objects) if args.objects else Path(ebpf_otlp.__file__).parent / "bpf"
    ifindex = socket.if_nametoindex("lo")
    if not args.no_doctor:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "ebpf_otlp", "doctor", "--json"],
                           capture_output=True, text=True, timeout=300)
        try:
            report = json.loads(r.stdout)
            emit("doctor", hooks=report.get("hooks", {}), rc=r.returncode,
                 http_capture=report.get("http_capture"),
                 seconds=round(time.monotonic() - t0, 1))
        except json.JSONDecodeError:
            emit("doctor", hooks={}, rc=r.returncode, error=(r.stdout + r.stderr)[-800:])
    t0 = time.monotonic()
    check_objects(objdir, ifindex)
    emit("phase", name="objects", seconds=round(time.monotonic() - t0, 1))
    check_http_capture()
    for name in filter(None, args.signals.split(",")):
        t0 = time.monotonic()
        check_signal(name)
        emit("phase", name=f"signal {name}", seconds=round(time.monotonic() - t0, 1))
    if args.extra:
        for path in sorted(Path(args.extra).glob("nonportable*.bpf.o")):
            try:
                check_reason_object(path)
            except Exception as e:
                emit("extra", object=path.name, program="*", records_ok=False,
                     error=first_line(e))
    emit("done", seconds=round(time.monotonic() - t_start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
