"""Ring buffer consumer that reads the ring's memory directly, in batches.

libbpf 1.1's ``ring_buffer__poll`` calls back once per record and does not
return while records keep coming, so a Python consumer slower than the
producer never gets control back (PERF.md). Here the ring is mapped like
libbpf does it (a writable consumer page; the producer page and the data area
mapped twice, read-only, so no record wraps) and every batch is decoded with
one numpy view and released with one consumer-position write.
"""

from __future__ import annotations

import logging
import mmap
import select
import struct
import threading
import time
from collections import Counter
from typing import Callable, Iterable

import numpy as np

from .libbpf import BpfError
from .maps import TYPE_RINGBUF, Map

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8

BatchCallback = Callable[[np.ndarray], None]
RecordCallback = Callable[[bytes], None]


def _round8(n: int) -> int:
    return (n + 7) & ~7


class RingBuffer:
    """One BPF ring buffer.

    Args:
        ring: the ``BPF_MAP_TYPE_RINGBUF`` map (loaded).
        dtype: the record dtype when every record has that size; enables the
            vectorised path. Without it records are delivered as bytes.
        on_batch: called with a structured array (a copy) per drained batch.
        on_record: called with each record's bytes (slower; for low rates).
        lost_map: per-CPU counter of failed reservations (``<ring>_lost``).
    """

    def __init__(self, ring: Map, dtype: np.dtype | None = None,
                 on_batch: BatchCallback | None = None,
                 on_record: RecordCallback | None = None, lost_map: Map | None = None):
        if ring.type != TYPE_RINGBUF:
            raise ValueError(f"map {ring.name} is not a ring buffer")
        if ring.fd < 0:
            raise BpfError(9, f"map {ring.name} is not loaded")
        if on_batch is None and on_record is None:
            raise ValueError("give on_batch or on_record")
        if on_batch is not None and dtype is None:
            raise ValueError("on_batch needs the record dtype")
        self.map = ring
        self.name = ring.name
        self.size = ring.max_entries
        self.mask = self.size - 1
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.on_batch = on_batch
        self.on_record = on_record
        self.lost_map = lost_map
        self.received = 0
        self.batches = 0
        # Records read but not handed on, by reason (the consumer position has
        # moved past them, so they are gone): "callback_failed", "bad_size".
        self.dropped: Counter[str] = Counter()
        self._cons = mmap.mmap(ring.fd, PAGE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(ring.fd, PAGE + 2 * self.size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=PAGE)
        self._data = np.frombuffer(self._prod, dtype=np.uint8)
        # Positions are read and written as single aligned 8-byte words: the
        # kernel reads consumer_pos while we write it, and struct's "<Q"
        # stores byte by byte, so a torn value made the ring look full and
        # the producer dropped records (found by bench/ringbuf.py).
        self._cons_pos = np.frombuffer(self._cons, dtype=np.uint64, count=1)
        self._prod_pos = np.frombuffer(self._prod, dtype=np.uint64, count=1)
        if self.dtype is not None:
            stride = HDR + _round8(self.dtype.itemsize)
            self._framed = np.dtype({"names": ["len", "rec"],
                                     "formats": ["<u4", self.dtype],
                                     "offsets": [0, HDR], "itemsize": stride})

    def lost(self) -> int:
        """Records the kernel side could not reserve (ring full), summed over CPUs."""
        return self.lost_map.sum_u64(0) if self.lost_map is not None else 0

    def pending_bytes(self) -> int:
        return int(self._prod_pos[0]) - int(self._cons_pos[0])

    def drain(self, limit: int = 1 << 30) -> int:
        """Consume what is committed when called; returns the records delivered.

        Records committed meanwhile wait for the next call: a consumer that
        chased a busy producer would deliver batches of a few records, and a
        batch's fixed numpy and Python cost would then dominate (bench/ringbuf.py,
        consumer CPU at 1 M records/s).
        """
        end = int(self._prod_pos[0])
        total = 0
        while total < limit and int(self._cons_pos[0]) < end:
            n = self._drain_once(end)
            if n == 0:
                break
            total += n
        return total

    def _drain_once(self, prod: int) -> int:
        cons = int(self._cons_pos[0])
        if prod <= cons:
            return 0
        if self.dtype is not None:
            n = self._drain_fixed(cons, prod)
            if n >= 0:
                return n
        return self._drain_walk(cons, prod)

    def _drain_fixed(self, cons: int, prod: int) -> int:
        """Vectorised path; -1 when the span is not uniform records of our size."""
        stride = self._framed.itemsize
        avail = prod - cons
        count = avail // stride
        if count == 0:
            return -1
        start = PAGE + (cons & self.mask)
        framed = self._data[start:start + count * stride].view(self._framed)
        lens = framed["len"]
        busy = np.flatnonzero(lens & BUSY)
        if busy.size:
            count = int(busy[0])
            if count == 0:
                return 0
            framed, lens = framed[:count], lens[:count]
        body = lens & ~np.uint32(DISCARD)
        if not np.all(body == self.dtype.itemsize):
            bad = int(np.flatnonzero(body != self.dtype.itemsize)[0])
            if bad == 0:
                return -1
            count = bad
            framed, lens = framed[:count], lens[:count]
        keep = (lens & DISCARD) == 0
        # a copy either way (boolean indexing makes one): the ring's memory is reused
        recs = framed["rec"].copy() if keep.all() else framed["rec"][keep]
        self._cons_pos[0] = cons + count * stride
        if len(recs):
            self._deliver(recs)
        return count

    def _drain_walk(self, cons: int, prod: int) -> int:
        n = 0
        data = self._prod
        batch: list[bytes] = []
        while cons < prod:
            off = PAGE + (cons & self.mask)
            length = struct.unpack_from("<I", data, off)[0]
            if length & BUSY:
                break
            body = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                batch.append(bytes(data[off + HDR:off + HDR + body]))
            cons += HDR + _round8(body)
            n += 1
        self._cons_pos[0] = cons
        if batch:
            if self.dtype is not None and self.on_batch is not None:
                good = [b for b in batch if len(b) == self.dtype.itemsize]
                if len(good) != len(batch):
                    self.dropped["bad_size"] += len(batch) - len(good)
                    log.warning("ring %s: %d records of unexpected size skipped", self.name,
                                len(batch) - len(good))
                if good:
                    self._deliver(np.frombuffer(b"".join(good), dtype=self.dtype).copy())
            else:
                self.received += len(batch)
                self.batches += 1
                self._call(lambda: [self.on_record(rec) for rec in batch], len(batch))
        return n

    def _deliver(self, recs: np.ndarray) -> None:
        self.received += len(recs)
        self.batches += 1
        if self.on_batch is not None:
            self._call(lambda: self.on_batch(recs), len(recs))
        else:
            self._call(lambda: [self.on_record(rec.tobytes()) for rec in recs], len(recs))

    def _call(self, fn: Callable[[], object], n: int) -> None:
        """A consumer that raises loses its batch (the position has moved on):
        count it, say so, and keep draining."""
        try:
            fn()
        except Exception:
            first = not self.dropped["callback_failed"]
            self.dropped["callback_failed"] += n
            if first:
                log.exception("ring %s: a batch of %d records failed in its consumer "
                              "(counted in ebpf_otlp.events.lost)", self.name, n)
            else:
                log.debug("ring %s: consumer failed again", self.name, exc_info=True)

    def close(self) -> None:
        self._data = self._cons_pos = self._prod_pos = None
        for m in (self._cons, self._prod):
            try:
                m.close()
            except (BufferError, ValueError):
                pass


class HeldBatches:
    """Ring batches held so that a consumer decodes thousands of records at a
    time, not a poll's worth: the per-batch numpy work is then shared.
    ``add`` (the ring's callback) says when ``limit`` records wait; ``take``
    hands over everything held, in order, as one array."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0  # records held
        self._parts: list[np.ndarray] = []
        self._since = 0.0
        self._lock = threading.Lock()

    def add(self, recs: np.ndarray) -> bool:
        """Hold ``recs`` (the ring gives copies); True when ``limit`` records wait."""
        with self._lock:
            if not self._parts:
                self._since = time.monotonic()
            self._parts.append(recs)
            self.count += len(recs)
            return self.count >= self.limit

    def waited(self) -> float:
        """Seconds the oldest held batch has waited; 0 when none is held."""
        return time.monotonic() - self._since if self.count else 0.0

    def take(self) -> np.ndarray | None:
        with self._lock:
            parts, self._parts, self.count = self._parts, [], 0
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class RingPoller:
    """Several ring buffers behind one epoll fd.

    Producers submit without wake-ups until enough data waits
    (``ringbuf_wakeup_bytes``), and the rings are watched edge-triggered: a
    ring readable since the last drain does not wake ``poll`` again, so a busy
    producer is drained in batches of at least that size, not chased record
    by record (bench/ringbuf.py). ``poll`` also drains every ring when its
    timeout expires, so a quiet ring is never stranded.
    """

    def __init__(self, rings: Iterable[RingBuffer] = ()):
        self._epoll = select.epoll()
        self.rings: list[RingBuffer] = []
        for r in rings:
            self.add(r)

    def add(self, ring: RingBuffer) -> None:
        self._epoll.register(ring.map.fd, select.EPOLLIN | select.EPOLLET)
        self.rings.append(ring)

    def remove(self, ring: RingBuffer) -> None:
        """Stop polling ``ring`` (its owner closes it)."""
        try:
            self._epoll.unregister(ring.map.fd)
        except (OSError, ValueError):
            pass
        self.rings = [r for r in self.rings if r is not ring]

    def fileno(self) -> int:
        """Readable when a ring signals data; usable from an outer loop."""
        return self._epoll.fileno()

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to ``timeout_ms`` for a wake-up, then drain every ring."""
        try:
            self._epoll.poll(timeout_ms / 1000.0)
        except InterruptedError:
            pass
        return self.drain()

    def drain(self) -> int:
        return sum(r.drain() for r in self.rings)

    def lost(self) -> int:
        return sum(r.lost() for r in self.rings)

    def close(self) -> None:
        for r in self.rings:
            r.close()
        self._epoll.close()
