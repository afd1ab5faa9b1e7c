"""One server-streaming gRPC call over a small HTTP/2 client of our own.

Why not grpcio's client: it hands every message from its own threads to the
caller's (about 6 context switches per message here), which cost ~110 us of
CPU per flow against 3 us to decode one (bench/hubble_bridge.py). Hubble
sends each flow as its own message, so that cost decides the bridge's
ceiling. This client reads the socket in large chunks and cuts frames and
gRPC messages out of the buffer itself: one system call carries hundreds of
flows.

It implements what a client of one streaming call needs from RFC 9113:
connection preface and SETTINGS (acknowledged), PING (answered), flow
control (windows opened wide, WINDOW_UPDATE sent as data is consumed),
HEADERS/CONTINUATION with HPACK (the ``hpack`` package), padded DATA,
RST_STREAM and GOAWAY; gRPC's length-prefixed messages and its status in the
trailers. TLS (with ALPN ``h2``) comes from Python's ``ssl``.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Iterator

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
WINDOW = 1 << 24  # 16 MiB: a burst of ~150,000 flows in flight before the server waits
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE left at its default: larger frames are errors
MAX_MESSAGE = 16 << 20  # a gRPC message larger than this is not a flow (grpcio's limit: 4 MiB)
MAX_HEADER_BLOCK = 1 << 20
STREAM = 1
GRPC_STATUS = {0: "ok", 1: "cancelled", 2: "unknown", 3: "invalid_argument",
               4: "deadline_exceeded", 5: "not_found", 6: "already_exists",
               7: "permission_denied", 8: "resource_exhausted", 9: "failed_precondition",
               10: "aborted", 11: "out_of_range", 12: "unimplemented", 13: "internal",
               14: "unavailable", 15: "data_loss", 16: "unauthenticated"}
_HDR = struct.Struct(">I")


class StreamError(Exception):
    """The call ended with an error; ``reason`` is a short name for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload))[1:] + bytes((ftype, flags)) + _HDR.pack(stream) + payload


def connect(target: str, tls_context: ssl.SSLContext | None, server_name: str | None,
            timeout_s: float) -> socket.socket:
    """A connected (and TLS-wrapped) socket for ``host:port`` or ``unix:PATH``."""
    if target.startswith("unix:"):
        path = target[len("unix://"):] if target.startswith("unix://") else target[5:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(path)
        host = "localhost"
    else:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that vanished without a FIN is noticed within about a minute.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, v in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), v)
    if tls_context is not None:
        sock = tls_context.wrap_socket(sock, server_hostname=server_name or host)
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            raise StreamError("unavailable", "server did not agree to HTTP/2 (ALPN)")
    return sock


def tls_context(ca_cert_files: tuple[str, ...], client_cert_file: str | None,
                client_key_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_cert_files:
        ctx.load_verify_locations(cadata="".join(Path(p).read_text() for p in ca_cert_files))
    if client_cert_file:
        ctx.load_cert_chain(client_cert_file, client_key_file)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class GrpcStreamCall:
    """``messages()`` yields lists of raw response messages as they arrive."""

    def __init__(self, sock: socket.socket, authority: str, path: str, request: bytes,
                 scheme: str):
        self.sock = sock
        self._closed = threading.Event()
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 16
        headers = [(":method", "POST"), (":scheme", scheme), (":path", path),
                   (":authority", authority), ("content-type", "application/grpc"),
                   ("te", "trailers"), ("user-agent", "ebpf-otlp-hubble")]
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE,
                               WINDOW)
        body = b"\x00" + _HDR.pack(len(request)) + request
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, settings)
                     + _frame(WINDOW_UPDATE, 0, 0, _HDR.pack(WINDOW - 65535))
                     + _frame(HEADERS, END_HEADERS, STREAM, self._encoder.encode(headers))
                     + _frame(DATA, END_STREAM, STREAM, body))
        sock.settimeout(None)
        self._unacked = 0
        self._hblock = b""
        self._hflags = 0
        self._got_headers = False

    def close(self) -> None:
        """Cancel from any thread: the reader sees the socket close."""
        if not self._closed.is_set():
            self._closed.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def messages(self) -> Iterator[list[bytes]]:
        """Raw gRPC messages, a list per read; returns at the end of the stream
        with status OK, raises :class:`StreamError` otherwise."""
        buf = b""    # unparsed HTTP/2 bytes
        data = b""   # stream bytes not yet a whole gRPC message
        recv = self.sock.recv
        try:
            while True:
                try:
                    chunk = recv(1 << 18)
                except OSError as e:
                    raise StreamError("cancelled" if self._closed.is_set() else "unavailable",
                                      str(e)) from None
                if not chunk:
                    raise StreamError("cancelled" if self._closed.is_set() else "unavailable",
                                      "connection closed")
                buf += chunk
                off, n = 0, len(buf)
                parts = []
                end = False
                ending: Exception | None = None
                while n - off >= 9:
                    length = int.from_bytes(buf[off:off + 3], "big")
                    if length > MAX_FRAME:
                        raise StreamError("internal", f"frame of {length} bytes")
                    if n - off - 9 < length:
                        break
                    ftype, flags = buf[off + 3], buf[off + 4]
                    sid = _HDR.unpack_from(buf, off + 5)[0] & 0x7FFFFFFF
                    payload = buf[off + 9:off + 9 + length]
                    off += 9 + length
                    if ftype == DATA:
                        if flags & PADDED:
                            payload = payload[1:len(payload) - payload[0]]
                        parts.append(payload)
                        self._unacked += length
                        end = end or bool(flags & END_STREAM)
                    else:
                        try:
                            end = self._control(ftype, flags, sid, payload) or end
                        except (StreamError, _Done) as e:
                            ending = e  # messages before it in this read still count
                            break
                buf = buf[off:]
                if parts:
                    data += b"".join(parts)
                    msgs, data = self._split(data)
                    if msgs:
                        yield msgs
                if ending is not None:
                    raise ending
                if self._unacked >= WINDOW // 4:
                    inc = _HDR.pack(self._unacked)
                    self.sock.sendall(_frame(WINDOW_UPDATE, 0, 0, inc)
                                      + _frame(WINDOW_UPDATE, 0, STREAM, inc))
                    self._unacked = 0
                if end:
                    raise StreamError("eof", "stream ended without a gRPC status")
        except _Done:
            return
        finally:
            self.close()
            self.sock.close()

    @staticmethod
    def _split(data: bytes) -> tuple[list[bytes], bytes]:
        msgs = []
        off, n = 0, len(data)
        while n - off >= 5:
            length = _HDR.unpack_from(data, off + 1)[0]
            if length > MAX_MESSAGE:
                raise StreamError("resource_exhausted", f"gRPC message of {length} bytes")
            if n - off - 5 < length:
                break
            if data[off]:  # compressed: we announced no grpc-accept-encoding
                msgs.append(b"\xff")  # undecodable on purpose: counted as malformed
            else:
                msgs.append(data[off + 5:off + 5 + length])
            off += 5 + length
        return msgs, data[off:]

    def _control(self, ftype: int, flags: int, sid: int, payload: bytes) -> bool:
        """Handles a non-DATA frame; returns True when the stream ended."""
        if ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self._hblock, self._hflags = payload, flags
            else:
                self._hblock += payload
                self._hflags |= flags & END_HEADERS
                if len(self._hblock) > MAX_HEADER_BLOCK:
                    raise StreamError("internal", "header block too large")
            if not self._hflags & END_HEADERS:
                return False
            try:
                hdrs = {k.decode() if isinstance(k, bytes) else k:
                        v.decode() if isinstance(v, bytes) else v
                        for k, v in self._decoder.decode(self._hblock, raw=True)}
            except Exception as e:  # hpack errors: the connection state is lost
                raise StreamError("internal", f"HPACK: {e}") from None
            self._hblock = b""
            return self._headers(hdrs, bool(self._hflags & END_STREAM))
        if ftype == SETTINGS:
            if not flags & ACK:
                self.sock.sendall(_frame(SETTINGS, ACK, 0))
        elif ftype == PING:
            if not flags & ACK:
                self.sock.sendall(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM and sid == STREAM:
            code = _HDR.unpack(payload[:4])[0] if len(payload) >= 4 else -1
            raise StreamError("cancelled" if code == 8 else "unavailable",
                              f"stream reset (HTTP/2 error {code})")
        elif ftype == GOAWAY:
            last = (_HDR.unpack(payload[:4])[0] & 0x7FFFFFFF) if len(payload) >= 8 else 0
            code = _HDR.unpack(payload[4:8])[0] if len(payload) >= 8 else -1
            if last < STREAM or code != 0:
                raise StreamError("unavailable", f"server went away (HTTP/2 error {code})")
        elif ftype == PUSH_PROMISE:
            raise StreamError("internal", "push promise although disabled")
        return False  # PRIORITY, WINDOW_UPDATE, unknown types: nothing to do

    def _headers(self, hdrs: dict, end_stream: bool) -> bool:
        if not self._got_headers:
            self._got_headers = True
            status = hdrs.get(":status", "")
            if status != "200":
                raise StreamError("unavailable", f"HTTP status {status}")
            if "grpc-status" not in hdrs:  # not a trailers-only response
                if end_stream:
                    raise StreamError("eof", "stream ended without a gRPC status")
                return False
        code = hdrs.get("grpc-status")
        if code is None:
            raise StreamError("internal", "trailers without grpc-status")
        try:
            num = int(code)
        except ValueError:
            raise StreamError("internal", f"grpc-status {code!r}") from None
        if num == 0:
            raise _Done()
        raise StreamError(GRPC_STATUS.get(num, f"status_{num}"), hdrs.get("grpc-message", ""))


class _Done(Exception):
    pass
