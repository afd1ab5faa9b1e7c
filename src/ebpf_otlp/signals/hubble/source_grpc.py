"""Follows ``Observer.GetFlows`` on Hubble Relay or a node's Hubble server.

The stream is read as raw bytes and decoded here, so a message that does not
decode is counted (``ebpf_otlp.hubble.malformed{reason=decode}``) instead of
breaking the stream inside gRPC. When the stream ends or fails, the follower
reconnects with exponential back-off (with jitter, capped), counts it
(``ebpf_otlp.hubble.reconnects{reason}``), and asks for flows ``since`` the
newest timestamp it saw, so Hubble's own buffer fills the gap; events sent
again are recognised by their uuid and skipped (``.duplicates``). What Hubble
could not keep arrives as ``LostEvent`` and is counted as lost.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from . import h2stream
from . import names as N
from ._proto.observer import observer_pb2 as opb
from .mapping import Mapper

log = logging.getLogger(__name__)

# "h2": our own HTTP/2 reader (fast, the default); "grpcio": gRPC's client (h2stream.py says why
# it is not the default).
CLIENTS = ("h2", "grpcio")
GET_FLOWS = "/" + opb.DESCRIPTOR.services_by_name["Observer"].full_name + "/GetFlows"


@dataclass(frozen=True)
class TlsOptions:
    """The `hubble` CLI's TLS flags, with the same names."""

    enabled: bool = False                                  # --tls
    ca_cert_files: tuple[str, ...] = ()                    # --tls-ca-cert-files
    client_cert_file: str | None = None                    # --tls-client-cert-file
    client_key_file: str | None = None                     # --tls-client-key-file
    server_name: str | None = None                         # --tls-server-name

    def context(self) -> ssl.SSLContext:
        """The same options for our own HTTP/2 client."""
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise ValueError("--tls-client-cert-file and --tls-client-key-file go together")
        return h2stream.tls_context(self.ca_cert_files, self.client_cert_file,
                                    self.client_key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        roots = b"".join(Path(p).read_bytes() for p in self.ca_cert_files) or None
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise ValueError("--tls-client-cert-file and --tls-client-key-file go together")
        key = Path(self.client_key_file).read_bytes() if self.client_key_file else None
        cert = Path(self.client_cert_file).read_bytes() if self.client_cert_file else None
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key,
                                            certificate_chain=cert)


def parse_server(addr: str, tls: TlsOptions) -> tuple[str, TlsOptions]:
    """``host:port``, ``tls://host:port`` (TLS on) or ``unix:///path`` as gRPC targets."""
    if addr.startswith("tls://"):
        return addr[len("tls://"):], TlsOptions(True, tls.ca_cert_files, tls.client_cert_file,
                                                 tls.client_key_file, tls.server_name)
    return addr, tls


@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    current_s: float = field(default=0.0)

    def next(self) -> float:
        self.current_s = self.initial_s if self.current_s == 0 else min(self.max_s,
                                                                        self.current_s * 2)
        return self.current_s * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current_s = 0.0


class GrpcFollower:
    """Feeds ``mapper`` from a followed ``GetFlows`` stream until ``stop()``."""

    def __init__(self, server: str, mapper: Mapper, tls: TlsOptions = TlsOptions(),
                 backoff: Backoff | None = None, connect_timeout_s: float = 10.0,
                 on_message: Callable[[], None] | None = None, client: str = "h2"):
        if client not in CLIENTS:
            raise ValueError(f"unknown gRPC client {client!r}; known: {', '.join(CLIENTS)}")
        self.client = client
        self.target, self.tls = parse_server(server, tls)
        self.mapper = mapper
        self.backoff = backoff or Backoff()
        self.connect_timeout_s = connect_timeout_s
        self.on_message = on_message
        self._stop = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self.connections = 0
        self.messages = 0

    def _channel(self) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", 16 << 20)]
        if self.tls.enabled:
            if self.tls.server_name:
                opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
            return grpc.secure_channel(self.target, self.tls.credentials(), options=opts)
        return grpc.insecure_channel(self.target, options=opts)

    def _request(self) -> bytes:
        req = opb.GetFlowsRequest(follow=True)
        since = self.mapper.stream_time_ns
        if since:
            req.since.FromNanoseconds(since)
        return req.SerializeToString()

    def run(self) -> None:
        """Connect, follow, reconnect; returns after ``stop()``."""
        first = True
        while not self._stop.is_set():
            reason = self._follow_once()
            if self._stop.is_set():
                break
            self.mapper.count(N.RECONNECTS, (("reason", reason),))
            delay = self.backoff.next()
            if first or reason != "eof":
                log.warning("hubble stream from %s ended (%s); reconnecting in %.1fs",
                            self.target, reason, delay)
            first = False
            self._stop.wait(delay)

    def _follow_once(self) -> str:
        """One connection: returns why it ended (``eof`` or a gRPC status name)."""
        if self.client == "h2":
            return self._follow_h2()
        return self._follow_grpcio()

    def _follow_h2(self) -> str:
        try:
            ctx = self.tls.context() if self.tls.enabled else None
        except (OSError, ValueError, ssl.SSLError) as e:
            log.error("hubble TLS configuration: %s", e)
            return "tls_config"
        try:
            sock = h2stream.connect(self.target, ctx, self.tls.server_name,
                                    self.connect_timeout_s)
        except h2stream.StreamError as e:
            return e.reason
        except ssl.SSLError as e:
            log.warning("hubble TLS handshake with %s failed: %s", self.target, e)
            return "tls"
        except OSError as e:
            log.debug("hubble connect %s: %s", self.target, e)
            return "unavailable"
        authority = self.tls.server_name or (self.target if not self.target.startswith("unix:")
                                             else "localhost")
        try:
            call = h2stream.GrpcStreamCall(sock, authority, GET_FLOWS, self._request(),
                                           "https" if ctx is not None else "http")
        except OSError:
            sock.close()
            return "unavailable"
        with self._lock:
            self._call = call
        if self._stop.is_set():
            call.close()
        self.connections += 1
        parse = opb.GetFlowsResponse.FromString
        mapper, count = self.mapper, self.mapper.count
        try:
            for raws in call.messages():
                self.backoff.reset()
                self.messages += len(raws)
                msgs = []
                for raw in raws:
                    try:
                        msgs.append(parse(raw))
                    except Exception:  # DecodeError, or anything the decoder raises
                        count(N.MALFORMED, (("reason", "decode"),))
                mapper.feed(msgs)
                if self.on_message is not None:
                    self.on_message()
            return "eof"
        except h2stream.StreamError as e:
            return e.reason
        except (OSError, ssl.SSLError):
            return "unavailable"
        finally:
            with self._lock:
                self._call = None

    def _follow_grpcio(self) -> str:
        try:
            channel = self._channel()
        except (OSError, ValueError) as e:
            log.error("hubble TLS configuration: %s", e)
            return "tls_config"
        try:
            stream = channel.unary_stream(GET_FLOWS, request_serializer=None,
                                          response_deserializer=None)
            call = stream(self._request())
            with self._lock:
                self._call = call
            if self._stop.is_set():
                call.cancel()
            self.connections += 1
            parse = opb.GetFlowsResponse.FromString
            feed, count = self.mapper.feed_one, self.mapper.count
            got_any = False
            for raw in call:
                self.messages += 1
                if not got_any:
                    got_any = True
                    self.backoff.reset()
                try:
                    msg = parse(raw)
                except Exception:  # DecodeError, or anything the decoder raises on garbage
                    count(N.MALFORMED, (("reason", "decode"),))
                    continue
                feed(msg)
                if self.on_message is not None:
                    self.on_message()
            return "eof"
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            return code.name.lower() if code is not None else "error"
        finally:
            with self._lock:
                self._call = None
            channel.close()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._call is not None:
                (self._call.close if self.client == "h2" else self._call.cancel)()
