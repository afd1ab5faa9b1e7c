"""HTTP/1.x message heads, parsed with httptools (llhttp, Node.js's parser).

The kernel gives us the first ``head_bytes`` of each read or write, not the
whole stream, so a parser that must see every byte of the connection cannot
be fed directly. Each message head is parsed on its own with a fresh
httptools parser (about 1.5 us per head here); where the head ends and how
long the body is are then followed by byte counts from the kernel records
(``conn.Stream``), so the next message on the connection is found without
its bytes in between.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import httptools

REQUEST = 1
RESPONSE = 2

# What a message head starts with. Used to re-synchronise a stream after
# bytes we could not follow (a body of unknown length, a lost record).
START = re.compile(rb"(?:GET|POST|PUT|HEAD|DELETE|PATCH|OPTIONS|CONNECT|TRACE) \S|HTTP/1\.[01] \d")
HEAD_END = b"\r\n\r\n"


def starts_message(data: bytes | memoryview, pos: int = 0) -> int:
    """REQUEST or RESPONSE when ``data[pos:]`` starts like a message head, else 0."""
    m = START.match(data, pos)
    if m is None:
        return 0
    return RESPONSE if data[pos:pos + 5] == b"HTTP/" else REQUEST


_STARTS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ",
           b"CONNECT ", b"TRACE ", b"HTTP/1.1 ", b"HTTP/1.0 ")


def may_start_message(data: bytes | memoryview, pos: int = 0) -> bool:
    """Whether ``data[pos:]`` is too short to tell but could begin a message head
    (a head split after its first few bytes)."""
    rest = bytes(data[pos:pos + 12])
    return len(rest) < 12 and any(s.startswith(rest) or rest.startswith(s) for s in _STARTS) \
        and not starts_message(data, pos)


@dataclass(slots=True)
class Head:
    """One parsed message head (or its first line, when the rest was not captured)."""

    kind: int  # REQUEST or RESPONSE
    version: str = ""  # "1.1", "1.0"
    method: str = ""
    target: str = ""
    status: int = 0
    complete: bool = False  # all header lines seen
    length: int = 0  # bytes of the head, when complete
    content_length: int = -1
    chunked: bool = False
    traceparent: str = ""
    host: str = ""
    captured: dict[str, str] = field(default_factory=dict)


class ParseError(ValueError):
    """Not an HTTP/1.x head; ``reason`` is the low-cardinality cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Collector:
    """httptools protocol object: the URL and the end of the head. Header values
    are found by :func:`_header_re` afterwards: one regex scan costs less than a
    Python callback per header line (bench/http_load.py)."""

    __slots__ = ("url", "done")

    def __init__(self) -> None:
        self.url: list[bytes] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_headers_complete(self) -> None:
        self.done = True


_NEEDED = ("content-length", "transfer-encoding", "traceparent", "host")


@functools.lru_cache(maxsize=64)
def _header_re(capture: frozenset[str]) -> re.Pattern[bytes]:
    names = "|".join(re.escape(n) for n in sorted(set(_NEEDED) | capture))
    return re.compile(rb"\r\n(" + names.encode() + rb")[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)",
                      re.I)


def _headers(head: Head, data: bytes, capture: frozenset[str]) -> None:
    for name, value in _header_re(capture).findall(data):
        n = name.decode("latin-1").lower()
        if n == "content-length":
            try:
                head.content_length = int(value)
            except ValueError:
                raise ParseError("bad_content_length") from None
        elif n == "transfer-encoding":
            head.chunked = b"chunked" in value.lower()
        elif n == "traceparent":
            head.traceparent = value.decode("latin-1")
        elif n == "host":
            head.host = value.decode("latin-1")
        if n in capture:
            head.captured[n] = value.decode("latin-1")


# Complete heads already parsed, by their bytes: load generators, health checks and
# API clients repeat heads byte for byte (responses too, within a second of Date).
# A hit costs a dict lookup instead of ~4 us (bench/http_load.py). Heads are not
# changed after parsing, so sharing them is safe.
_CACHE: dict[tuple[bytes, int, frozenset[str]], Head] = {}
CACHE_SIZE = 4096
CACHE_HEAD_MAX = 2048  # larger heads are parsed each time: the cache stays under ~8 MB


def parse_head(data: bytes, kind: int, capture: frozenset[str] = frozenset()) -> Head:
    """Parse the head at the start of ``data`` (which may hold body bytes after it,
    or be cut short). Raises :class:`ParseError` when it is not HTTP/1.x or the
    first line is not complete."""
    end = data.find(HEAD_END)
    if 0 <= end < CACHE_HEAD_MAX:
        data = data[:end + 4]
        key = (data, kind, capture)
        head = _CACHE.get(key)
        if head is None:
            head = _parse(data, kind, capture, end)
            if len(_CACHE) >= CACHE_SIZE:
                _CACHE.clear()
            _CACHE[key] = head
        return head
    if end >= 0:
        data = data[:end + 4]
    return _parse(data, kind, capture, end)


def whole_head(data: bytes, kind: int, capture: frozenset[str] = frozenset()) -> Head | None:
    """The head that ``data`` is exactly (its first line through the blank line),
    from the cache or parsed; None when it is not one :func:`parse_head` would
    take from the start of a stream (the caller then follows the slow path,
    which counts why)."""
    key = (data, kind, capture)
    head = _CACHE.get(key)
    if head is not None:
        return head
    if starts_message(data) != kind or len(data) > CACHE_HEAD_MAX:
        return None
    try:
        head = _parse(data, kind, capture, len(data) - 4)
    except ParseError:
        return None
    if not head.complete or head.length != len(data):
        return None
    if len(_CACHE) >= CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = head
    return head


class WholeHeads:
    """:func:`whole_head` of one capture set, by the head's exact bytes, the
    answer None too (bytes that are not a whole head stay not one): a batch's
    repeated heads cost one dict lookup, not the parse cache's key tuple and a
    call (bench/http_replay.py). Bounded: cleared when ``size`` heads are held
    (each at most CACHE_HEAD_MAX bytes)."""

    __slots__ = ("known", "by_copy", "capture", "size")

    def __init__(self, capture: frozenset[str] = frozenset(), size: int = 4096):
        self.known: dict[bytes, Head | None] = {}
        # the same by a record's whole copied bytes (the head and what follows it):
        # a hit needs no search for the blank line, which touches the record's
        # memory once more (bench/http_replay.py)
        self.by_copy: dict[bytes, Head | None] = {}
        self.capture = capture
        self.size = size

    def copied(self, data: bytes) -> Head | None:
        """The head that ``data`` (a record's copied bytes) starts with when they
        hold all of it, or None; remembered by ``data``."""
        e = data.find(HEAD_END)
        head = None
        if e >= 0:
            h = data[:e + 4]
            head = self.known.get(h, False)
            if head is False:
                head = self.parse(h)
        if len(data) <= CACHE_HEAD_MAX:
            if len(self.by_copy) >= self.size:
                self.by_copy.clear()
            self.by_copy[data] = head
        return head

    def parse(self, data: bytes) -> Head | None:
        """The head ``data`` is exactly (a response when it starts with ``HT``), or
        None; remembered."""
        head = whole_head(data, RESPONSE if data[:2] == b"HT" else REQUEST, self.capture)
        if len(data) <= CACHE_HEAD_MAX:
            if len(self.known) >= self.size:
                self.known.clear()
            self.known[data] = head
        return head


def _parse(data: bytes, kind: int, capture: frozenset[str], end: int) -> Head:
    line_end = data.find(b"\r\n")
    if line_end < 0:
        raise ParseError("first_line_cut")
    head = Head(kind)
    col = _Collector()
    parser = (httptools.HttpRequestParser(col) if kind == REQUEST
              else httptools.HttpResponseParser(col))
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # the head is complete; what follows is another protocol
    except httptools.HttpParserError as e:
        if not col.done:
            raise ParseError(type(e).__name__.removeprefix("HttpParser").removesuffix("Error")
                             .lower() or "invalid") from None
    head.version = parser.get_http_version()
    if head.version not in ("1.1", "1.0"):
        raise ParseError("version")
    if kind == REQUEST:
        head.method = parser.get_method().decode("latin-1")
        head.target = b"".join(col.url).decode("latin-1")
    else:
        head.status = parser.get_status_code()
    head.complete = col.done
    _headers(head, data, capture)
    head.length = end + 4 if col.done and end >= 0 else 0
    return head


def parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a W3C ``traceparent`` value, or None if invalid."""
    p = parse_traceparent_flags(value)
    return p[:2] if p is not None else None


def parse_traceparent_flags(value: str) -> tuple[bytes, bytes, int] | None:
    """(trace id, parent span id, trace flags) of a W3C ``traceparent`` value
    (flag 0x01: the caller sampled it), or None if invalid."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0].lower() == "ff":
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) < 2:
        return None
    try:
        trace, parent = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        flags = bytes.fromhex(parts[0] + parts[3][:2])[1]
    except ValueError:
        return None
    if not any(trace) or not any(parent):
        return None
    return trace, parent, flags
