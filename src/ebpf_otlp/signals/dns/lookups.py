"""Finished DNS lookups as columns, and the groupings that emit them.

A lookup is a query and its answer (or its timeout). Lookups paired inside a
batch come straight from the batch's columns (:func:`from_pairs`); the rest
come from the pending table's ``Query`` tuples (:func:`from_queries`). Both
end as one :class:`Lookups`, which the signal turns into spans and
histogram values per group of lookups that share their attributes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..batch import group


class Lookups(NamedTuple):
    q_ts: np.ndarray  # int64 query time (kernel monotonic ns)
    end_ts: np.ndarray  # int64 answer time (unused for timeouts)
    rcode: np.ndarray  # int64 4-bit rcode; -1: timeout
    answers: np.ndarray  # int64 ANCOUNT
    question: np.ndarray  # int64 index into the questions list emitted with them
    c_addr: np.ndarray  # (m, 16) uint8 client address
    c_port: np.ndarray  # int64
    s_addr: np.ndarray  # (m, 16) uint8 server address
    s_port: np.ndarray  # int64
    proto: np.ndarray  # int64
    family: np.ndarray  # int64
    ifindex: np.ndarray  # int64


def from_pairs(sub: np.ndarray, d, qi: np.ndarray, ai: np.ndarray) -> Lookups:
    """Lookups of queries ``qi`` answered by ``ai`` (positions in the decoded batch ``d``,
    whose records are ``sub``)."""
    q = sub[qi]
    return Lookups(d.ts_ns[qi], d.ts_ns[ai], d.rcode[ai], d.answers[ai], d.question[qi],
                   q["saddr"], q["sport"].astype(np.int64), q["daddr"],
                   q["dport"].astype(np.int64), q["proto"].astype(np.int64),
                   q["family"].astype(np.int64), q["ifindex"].astype(np.int64))


def from_queries(done: list[tuple], qbase: int) -> Lookups:
    """Lookups from (Query, answer time or None, rcode (-1 timeout), answers); lookup
    ``k``'s question is ``qbase + k``."""
    m = len(done)
    if not m:
        return _empty()
    qs = [q for q, *_ in done]
    rows = [q.row for q in qs]

    def ints(vals) -> np.ndarray:
        return np.fromiter(vals, np.int64, m)

    return Lookups(
        ints(q.ts_ns for q in qs), ints(0 if t is None else t for _, t, _, _ in done),
        ints(-1 if t is None else rc for _, t, rc, _ in done), ints(a for *_, a in done),
        np.arange(qbase, qbase + m, dtype=np.int64),
        np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(m, 16),
        ints(r[1] for r in rows),
        np.frombuffer(b"".join(r[2] for r in rows), np.uint8).reshape(m, 16),
        ints(r[3] for r in rows), ints(r[4] for r in rows), ints(r[5] for r in rows),
        ints(r[6] for r in rows))


def _empty() -> Lookups:
    z = np.zeros(0, np.int64)
    a = np.zeros((0, 16), np.uint8)
    return Lookups(z, z, z, z, z, a, z, a, z, z, z, z)


def concat(a: Lookups, b: Lookups) -> Lookups:
    if not len(b.q_ts):
        return a
    if not len(a.q_ts):
        return b
    return Lookups(*(np.concatenate([x, y]) for x, y in zip(a, b)))


def group_rows(question: np.ndarray, addr: np.ndarray, port: np.ndarray, proto: np.ndarray,
               family: np.ndarray, rcode: np.ndarray | None
               ) -> tuple[list[tuple], list[int]]:
    """Distinct (question, address bytes, port, proto, family, rcode or None) and their
    counts (the dns.queries / dns.responses keys)."""
    q = question.astype("<i8")
    p, pr, f = port.astype("<u2"), proto.astype("u1"), family.astype("u1")
    rc = rcode.astype("<i2") if rcode is not None else np.zeros(len(q), "<i2")
    first, _, counts = group(q, addr, p, pr, f, rc)
    raw = np.ascontiguousarray(addr[first]).tobytes()
    rows = [(qq, raw[16 * k:16 * k + 16], pp, prr, ff, None if rcode is None else r)
            for k, (qq, pp, prr, ff, r) in enumerate(zip(
                q[first].tolist(), p[first].tolist(), pr[first].tolist(), f[first].tolist(),
                rc[first].tolist()))]
    return rows, counts.tolist()


def span_groups(lk: Lookups) -> tuple[list[tuple], np.ndarray]:
    """Lookups that share every span attribute but the client's and the answer count:
    (question, server address bytes, port, proto, family, ifindex, rcode) per group, and
    the group of each lookup."""
    first, inv, _ = group(lk.question.astype("<i8"), lk.s_addr, lk.s_port.astype("<u2"),
                          lk.proto.astype("u1"), lk.family.astype("u1"),
                          lk.ifindex.astype("<u4"), lk.rcode.astype("<i2"))
    raw = np.ascontiguousarray(lk.s_addr[first]).tobytes()
    rows = [(q, raw[16 * k:16 * k + 16], p, pr, f, ifx, rc) for k, (q, p, pr, f, ifx, rc) in
            enumerate(zip(*(c[first].tolist() for c in (
                lk.question, lk.s_port, lk.proto, lk.family, lk.ifindex, lk.rcode))))]
    return rows, inv
