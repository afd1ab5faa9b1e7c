"""Pairing of Hubble's L7 request and response records (HTTP, DNS).

Cilium's proxies report a request and, later, its response as two flows; the
response carries the endpoints reversed (it travels server -> client) and
Hubble's own ``latency_ns``. A request waits in a bounded table keyed by the
unordered endpoint pair plus what identifies the exchange (method and URL for
HTTP, query name and type for DNS); a response takes the oldest matching
request (FIFO, as HTTP/1.1 answers in order). Requests that wait longer than
the timeout (measured on the stream's own clock: Hubble's timestamps) come out
as timeouts; requests pushed out because the table is full are counted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from . import names as N

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
TIMEOUT = "timeout"
DNS_OK_RCODES = frozenset((0, 3))  # NOERROR, NXDOMAIN: answers, not failures (as the DNS signal)
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
          6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}


@dataclass(frozen=True)
class Request:
    time_ns: int
    key: tuple
    info: Any  # what the mapper needs to build the span (client/server, direction, ...)


class PendingTable:
    """Requests waiting for their response; bounded, FIFO per key, oldest first overall."""

    def __init__(self, max_pending: int, timeout_ns: int):
        self.max_pending = max_pending
        self.timeout_ns = timeout_ns
        self._by_seq: OrderedDict[int, Request] = OrderedDict()
        self._by_key: dict[tuple, deque[int]] = {}
        self._seq = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_seq)

    def add(self, req: Request) -> Request | None:
        """Queue ``req``; returns the request evicted to make room, if any."""
        evicted = None
        if len(self._by_seq) >= self.max_pending:
            evicted = self._pop_oldest()
            self.evicted += 1
        self._seq += 1
        self._by_seq[self._seq] = req
        self._by_key.setdefault(req.key, deque()).append(self._seq)
        return evicted

    def take(self, key: tuple) -> Request | None:
        q = self._by_key.get(key)
        if not q:
            return None
        seq = q.popleft()
        if not q:
            del self._by_key[key]
        return self._by_seq.pop(seq)

    def _pop_oldest(self) -> Request:
        seq, req = self._by_seq.popitem(last=False)
        q = self._by_key[req.key]
        q.remove(seq)  # the oldest of its key: at the front, O(1) in practice
        if not q:
            del self._by_key[req.key]
        return req

    def expire(self, now_ns: int) -> list[Request]:
        """Requests older than the timeout at stream time ``now_ns``, oldest first."""
        out = []
        limit = now_ns - self.timeout_ns
        while self._by_seq:
            seq = next(iter(self._by_seq))
            if self._by_seq[seq].time_ns > limit:
                break
            out.append(self._pop_oldest())
        return out


def route_template(path: str) -> str:
    """A low-cardinality route: segments that look like ids (numbers, UUIDs,
    long hex) become ``*``; ``/users/42/orders`` -> ``/users/*/orders``."""
    if not path:
        return "/"
    segs = path.split("/")
    for i, s in enumerate(segs):
        if s and (s.isdigit() or _is_uuid(s) or (len(s) >= 8 and _is_hex(s))):
            segs[i] = "*"
    return "/".join(segs)


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


def _is_uuid(s: str) -> bool:
    return len(s) == 36 and s.count("-") == 4 and _is_hex(s.replace("-", ""))


def split_url(url: str) -> tuple[str | None, str | None, str]:
    """(scheme, host, path without query) of Hubble's ``HTTP.url``."""
    scheme = host = None
    rest = url
    if "://" in url:
        scheme, rest = url.split("://", 1)
        host, sep, rest = rest.partition("/")
        rest = sep + rest
    path = rest.split("?", 1)[0].split("#", 1)[0]
    return scheme or None, host or None, path or "/"


def http_span(start: int, end: int, info: tuple, method: str, url: str, code: int,
              protocol: str, timeout: bool) -> tuple[int, tuple, str, tuple]:
    """(span kind, span tuple, histogram name, histogram attributes) of one HTTP
    exchange, with the HTTP signal's names. ``info`` is (client, server,
    transport, IP version, traffic direction) of the request."""
    (ca, _), (sa, sport), _transport, _ipv, td = info
    server = td == N.INGRESS  # Cilium's ingress proxy stands in front of the server
    scheme, _host, path = split_url(url)
    scheme = scheme or "http"
    route = route_template(path)
    method = method or "_OTHER"
    code = 0 if timeout else code
    if timeout:
        err: str | None = TIMEOUT
    elif code >= 500 or (not server and code >= 400):
        err = str(code)
    else:
        err = None
    status = (("http.response.status_code", code),) if code else ()
    where = ((("server.address", sa),) if sa else ()) + \
        ((("server.port", sport),) if sport else ())
    hist = (("http.request.method", method),) + status + (("http.route", route),
                                                         ("url.scheme", scheme)) + where
    if err is not None:
        hist += (("error.type", err),)
    attrs = (("http.request.method", method), ("url.path", path), ("url.scheme", scheme)) \
        + status + where + ((("client.address", ca),) if ca else ())
    if protocol.upper().startswith("HTTP/"):
        attrs += (("network.protocol.version", protocol[5:]),)
    kind = SPAN_KIND_SERVER if server else SPAN_KIND_CLIENT
    return (kind, (start, end, f"{method} {route}", attrs, err),
            N.HTTP_SERVER if server else N.HTTP_CLIENT, hist)


def dns_span(start: int, end: int, info: tuple, query: str, qtype: str, response: Any,
             names: bool) -> tuple[tuple, tuple]:
    """(span tuple, histogram attributes) of one DNS lookup with the DNS signal's
    names; ``response`` is Hubble's ``DNS`` record of the answer, None for a timeout."""
    (ca, cport), (sa, sport), transport, ipv, _td = info
    qname = query[:-1] if query.endswith(".") else query
    server = (("server.address", sa), ("server.port", sport or 0),
              ("network.transport", transport or "udp"))
    client = (("network.type", N.NET_TYPE.get(ipv, "")), ("client.address", ca),
              ("client.port", cport or 0))
    attrs: tuple = (("dns.question.name", qname), ("dns.question.type", qtype))
    hist: tuple = (("dns.question.type", qtype),) + server
    if names:
        hist += (("dns.question.name", qname.lower()),)
    if response is None:
        err: str | None = TIMEOUT
        attrs += server + client
        hist += (("error.type", TIMEOUT),)
    else:
        d = response
        rc = RCODES.get(d.rcode, str(d.rcode))
        err = None if d.rcode in DNS_OK_RCODES else rc
        answers = len(d.rrtypes) if d.rrtypes else len(d.ips) + len(d.cnames)
        attrs += (("dns.response_code", rc), ("dns.answer.count", answers)) + server + client
        hist += (("dns.response_code", rc),)
        if err is not None:
            hist += (("error.type", err),)
    return (start, end, f"DNS {qtype}", attrs, err), hist
