"""OTLP log records for the first drop of each new (reason, flow) pair.

Bounded on both sides: pairs already reported are remembered in an LRU of
fixed size, and records are rate-limited by a token bucket; every record
not emitted because of the limit is counted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .decode import DropRow

EVENT_NAME = "network.packet.drop"
SEVERITY_WARN = 13  # OTLP SeverityNumber WARN


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def describe(attrs: dict[str, str | int]) -> str:
    """``NETFILTER_DROP udp 10.0.0.1:5 -> 10.0.0.2:53 on eth0`` (what is known of it)."""
    parts = [str(attrs.get("network.drop.reason", "UNKNOWN"))]
    if "network.transport" in attrs:
        parts.append(str(attrs["network.transport"]))

    def end(side: str) -> str | None:
        addr = attrs.get(f"{side}.address")
        if addr is None:
            return None
        port = attrs.get(f"{side}.port")
        if port is None:
            return str(addr)
        return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"

    src, dst = end("source"), end("destination")
    if src or dst:
        parts.append(f"{src or '?'} -> {dst or '?'}")
    if "network.interface.name" in attrs:
        parts.append(f"on {attrs['network.interface.name']}")
    if "network.drop.location" in attrs:
        parts.append(f"at {attrs['network.drop.location']}")
    return "packet dropped: " + " ".join(parts)


class FirstDropLogger:
    """Emits one log record per (reason, flow) pair not seen recently."""

    def __init__(self, logger: object, max_pairs: int, rate: float = 10.0, burst: float = 100.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.max_pairs = max(1, max_pairs)
        self.bucket = TokenBucket(rate, burst, clock)
        # Hashes, not the attribute sets: ~100 bytes a pair instead of ~1.5 kB.
        # A 64-bit collision (one log record not emitted) is negligible here.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self.emitted = 0
        self.suppressed = 0

    def offer(self, row: DropRow, epoch_offset_ns: int) -> None:
        pair = hash(frozenset(row.attributes.items()))
        if pair in self._seen:
            self._seen.move_to_end(pair)
            return
        self._seen[pair] = None
        while len(self._seen) > self.max_pairs:
            self._seen.popitem(last=False)
        if not self.bucket.take():
            self.suppressed += 1
            return
        self.logger.emit(timestamp=row.first_ns + epoch_offset_ns,
                         severity_number=SEVERITY_WARN, severity_text="WARN",
                         body=describe(row.attributes), attributes=row.attributes,
                         event_name=EVENT_NAME)
        self.emitted += 1
