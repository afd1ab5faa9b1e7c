"""The views' filters, parsed and checked before anything is loaded: a bad one
is a :class:`FilterError` (one line, exit status 2).

Values of one filter are alternatives (``--port 53 --port 80``: either);
different filters must all hold. An event without the attribute a filter
looks at does not match it (``--dns-name`` keeps only DNS lookups).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from ..otlp.semconv import TRANSPORTS
from .events import SIGNALS, Event

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FROM_KEYS = ("source.address", "client.address")
TO_KEYS = ("destination.address", "server.address")
PORT_KEYS = ("source.port", "destination.port", "client.port", "server.port")
PROTOCOLS = frozenset(TRANSPORTS.values())


class FilterError(ValueError):
    """A filter that cannot be right."""


def _split(values: Iterable[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _networks(flag: str, values: Iterable[str]) -> tuple[Network, ...]:
    out = []
    for v in _split(values):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise FilterError(f"{flag}: {v!r} is not an IP address or CIDR "
                              f"(e.g. 10.0.0.0/8, fd00::1)") from None
    return tuple(out)


def _ints(flag: str, values: Iterable[str], lo: int, hi: int) -> frozenset[int]:
    out = set()
    for v in _split(values):
        try:
            n = int(v)
        except ValueError:
            raise FilterError(f"{flag}: {v!r} is not a number") from None
        if not lo <= n <= hi:
            raise FilterError(f"{flag}: {n} is not within {lo}..{hi}")
        out.add(n)
    return frozenset(out)


@dataclass(frozen=True)
class Filters:
    signals: frozenset[str] = frozenset()
    ips: tuple[Network, ...] = ()
    from_ips: tuple[Network, ...] = ()
    to_ips: tuple[Network, ...] = ()
    ports: frozenset[int] = frozenset()
    protocols: frozenset[str] = frozenset()
    drop_reasons: frozenset[str] = frozenset()
    dns_names: tuple[str, ...] = ()
    pids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def implied_signals(self) -> set[str]:
        """The signals whose events can match at all."""
        out = set(self.signals or SIGNALS)
        if self.drop_reasons:
            out &= {"drops"}
        if self.dns_names:
            out &= {"dns"}
        if self.pids or self.comms:
            out &= {"tcp", "http"}  # the signals with process attribution
        return out

    def __call__(self, ev: Event) -> bool:
        if self.signals and ev["signal"] not in self.signals:
            return False
        if self.ips and not (self._in(ev, FROM_KEYS + TO_KEYS, self.ips)):
            return False
        if self.from_ips and not self._in(ev, FROM_KEYS, self.from_ips):
            return False
        if self.to_ips and not self._in(ev, TO_KEYS, self.to_ips):
            return False
        if self.ports and not any(ev.get(k) in self.ports for k in PORT_KEYS):
            return False
        if self.protocols and ev.get("network.transport") not in self.protocols:
            return False
        if self.drop_reasons and ev.get("network.drop.reason") not in self.drop_reasons:
            return False
        if self.dns_names:
            name = str(ev.get("dns.question.name", "")).lower().rstrip(".")
            if "dns.question.name" not in ev or not any(fnmatch.fnmatchcase(name, g)
                                                        for g in self.dns_names):
                return False
        if self.pids and ev.get("process.pid") not in self.pids:
            return False
        return not self.comms or ev.get("process.executable.name") in self.comms

    def _in(self, ev: Event, keys: tuple[str, ...], nets: tuple[Network, ...]) -> bool:
        for k in keys:
            a = ev.get(k)
            if a is None:
                continue
            hit = self._cache.get((a, nets))
            if hit is None:
                try:
                    ip = ipaddress.ip_address(a)
                    hit = any(ip in n for n in nets)
                except ValueError:
                    hit = False
                if len(self._cache) > 65536:
                    self._cache.clear()
                self._cache[(a, nets)] = hit
            if hit:
                return True
        return False


def parse(signals: Iterable[str] = (), ip: Iterable[str] = (), from_ip: Iterable[str] = (),
          to_ip: Iterable[str] = (), port: Iterable[str] = (), protocol: Iterable[str] = (),
          drop_reason: Iterable[str] = (), dns_name: Iterable[str] = (),
          pid: Iterable[str] = (), comm: Iterable[str] = (),
          known_reasons: Iterable[str] | None = None) -> Filters:
    """Check every value; ``known_reasons``: the running kernel's drop reasons
    (short names), when it has them."""
    sigs = set(_split(signals))
    bad = sigs - set(SIGNALS)
    if bad:
        raise FilterError(f"--signal: unknown {', '.join(sorted(bad))}; "
                          f"known: {', '.join(SIGNALS)}")
    protos = {p.lower() for p in _split(protocol)}
    bad = protos - PROTOCOLS
    if bad:
        raise FilterError(f"--protocol: unknown {', '.join(sorted(bad))}; "
                          f"known: {', '.join(sorted(PROTOCOLS))}")
    reasons = set()
    known = set(known_reasons) if known_reasons is not None else None
    for r in _split(drop_reason):
        name = r.upper().removeprefix("SKB_DROP_REASON_")
        if known and name not in known:
            raise FilterError(f"--drop-reason: this kernel has no drop reason {r!r} "
                              f"(e.g. {', '.join(sorted(known)[:4])}, ...)")
        reasons.add(name)
    globs = []
    for g in _split(dns_name):
        g = g.lower().rstrip(".")
        if not g or any(c.isspace() for c in g):
            raise FilterError(f"--dns-name: {g!r} is not a name or glob")
        globs.append(g)
    comms = set()
    for c in _split(comm):
        if len(c.encode()) > 15:
            raise FilterError(f"--comm: {c!r} is longer than a process name (15 bytes)")
        comms.add(c)
    return Filters(
        signals=frozenset(sigs), ips=_networks("--ip", ip),
        from_ips=_networks("--from-ip", from_ip), to_ips=_networks("--to-ip", to_ip),
        ports=_ints("--port", port, 1, 65535), protocols=frozenset(protos),
        drop_reasons=frozenset(reasons), dns_names=tuple(globs),
        pids=_ints("--pid", pid, 1, 2**22), comms=frozenset(comms))
