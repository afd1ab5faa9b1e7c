"""A fast, paced stand-in for a Hubble server, for bench/hubble_bridge.py.

Python's grpcio server tops out near 10,000 messages/s here, below what the
bridge must take, so this one speaks just enough HTTP/2 over a raw socket to
serve one ``GetFlows`` call: it answers the client's SETTINGS and PINGs,
honours its flow-control windows, and sends pre-encoded flows (one DATA
frame per message, as Hubble's Go server does) at a fixed rate in 2 ms
ticks. When the client does not keep up, the windows close and the sender
falls behind its schedule: the largest lag is reported, so "no loss" means
Hubble (which drops what its clients do not take) would have lost nothing.

    python -m bench.hubble_server PORTFILE RATE SECONDS   # prints a JSON line when done
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import hpack

_HDR = struct.Struct(">I")
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 4, 6, 8


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload))[1:] + bytes((ftype, flags)) + _HDR.pack(stream) + payload


def flow_messages(n: int) -> list[bytes]:
    """``n`` serialised ``GetFlowsResponse`` trace events over 64 distinct flows."""
    from ebpf_otlp.signals.hubble._proto.flow import flow_pb2 as fpb
    from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb

    base = time.time_ns()
    out = []
    for i in range(n):
        r = opb.GetFlowsResponse(node_name="bench-node")
        t = base + i * 1000
        r.time.FromNanoseconds(t)
        f = r.flow
        f.time.FromNanoseconds(t)
        f.uuid = f"bench-{i:09d}"
        f.node_name = "bench-node"
        f.verdict = fpb.FORWARDED
        f.event_type.type = 4
        f.traffic_direction = fpb.EGRESS
        f.is_reply.value = bool(i & 1)
        f.Type = fpb.L3_L4
        f.IP.source, f.IP.destination, f.IP.ipVersion = "10.0.1.10", f"10.0.2.{i % 64}", fpb.IPv4
        f.l4.TCP.source_port, f.l4.TCP.destination_port = 40000 + i % 64, 8080
        f.l4.TCP.flags.ACK = True
        for ep, ns, pod, wl in ((f.source, "shop", "client-7d9f", "client"),
                                (f.destination, "shop", "web-5c4b", "web")):
            ep.identity, ep.namespace, ep.pod_name = 1234, ns, pod
            ep.labels.extend([f"k8s:app={wl}", "k8s:io.kubernetes.pod.namespace=shop"])
            ep.workloads.add(kind="Deployment", name=wl)
        f.trace_observation_point = fpb.TO_STACK
        f.interface.index, f.interface.name = 7, "lxc1234"
        f.Summary = "TCP Flags: ACK"
        out.append(r.SerializeToString())
    return out


class Peer:
    """The client side's windows and pending control frames, from what it sent."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.conn_window = 65535
        self.stream_window = 65535
        self.initial = 65535
        self.request_done = False

    def pump(self, block: bool) -> None:
        self.sock.setblocking(block)
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        finally:
            self.sock.setblocking(True)
        if not chunk:
            raise ConnectionError("client went away")
        self.buf += chunk
        if self.buf.startswith(b"PRI * HTTP/2.0"):
            self.buf = self.buf[24:]
        out = b""
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            ftype, flags = self.buf[3], self.buf[4]
            sid = _HDR.unpack_from(self.buf, 5)[0] & 0x7FFFFFFF
            payload = self.buf[9:9 + length]
            self.buf = self.buf[9 + length:]
            if ftype == SETTINGS and not flags & 1:
                for off in range(0, len(payload), 6):
                    ident, value = struct.unpack_from(">HI", payload, off)
                    if ident == 4:
                        self.stream_window += value - self.initial
                        self.initial = value
                out += _frame(SETTINGS, 1, 0)
            elif ftype == PING and not flags & 1:
                out += _frame(PING, 1, 0, payload)
            elif ftype == WINDOW_UPDATE:
                inc = _HDR.unpack(payload)[0] & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                else:
                    self.stream_window += inc
            elif ftype == DATA and flags & 1:
                self.request_done = True
        if out:
            self.sock.sendall(out)


def serve(portfile: str, rate: float, seconds: float) -> dict:
    n = int(rate * seconds)
    frames = [_frame(DATA, 0, 1, b"\0" + _HDR.pack(len(m)) + m) for m in flow_messages(n)]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(lsock.getsockname()[1]))
    import os

    os.rename(portfile + ".tmp", portfile)
    sock, _ = lsock.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer = Peer(sock)
    sock.sendall(_frame(SETTINGS, 0, 0))
    while not peer.request_done:
        peer.pump(block=True)
    enc = hpack.Encoder()
    sock.sendall(_frame(HEADERS, 4, 1, enc.encode([(":status", "200"),
                                                    ("content-type", "application/grpc")])))
    sent, lag_max, tick = 0, 0.0, 0.002
    t0 = time.monotonic()
    while sent < n:
        now = time.monotonic()
        due = min(n, int((now - t0) * rate) + 1)
        lag_max = max(lag_max, (now - t0) - sent / rate)
        while sent < due:
            peer.pump(block=False)
            budget = min(peer.conn_window, peer.stream_window)
            take, size = 0, 0
            while sent + take < due and size + len(frames[sent + take]) - 9 <= budget:
                size += len(frames[sent + take]) - 9
                take += 1
            if take == 0:
                peer.pump(block=True)  # windows closed: the client is behind
                continue
            sock.sendall(b"".join(frames[sent:sent + take]))
            peer.conn_window -= size
            peer.stream_window -= size
            sent += take
        time.sleep(max(0.0, tick - (time.monotonic() - now)))
    elapsed = time.monotonic() - t0
    # Follow mode: the stream stays open; the bench stops the bridge when it has everything.
    result = {"sent": sent, "seconds": elapsed, "lag_max_s": lag_max}
    print(json.dumps(result), flush=True)
    try:
        sock.settimeout(120)
        while True:
            peer.pump(block=True)
    except (OSError, ConnectionError):
        pass
    return result


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
