"""DNS message heads from the kernel -> decoded messages, and query/answer pairing.

Parsing uses dnspython (strict: compression pointers must point strictly
backwards, chains are capped, names over 255 bytes and reserved label types
are rejected). dnspython costs ~20 us per message here, too slow for tens of
thousands of messages per second, so a batch is first scanned with numpy:
header fields come out as columns, and the question's labels are walked for
all records at once to find where the question ends. The question's bytes
then key a bounded cache of what dnspython made of them, so dnspython parses
each distinct question once (and every message the fast scan cannot vouch
for: several questions, compression pointers, odd label types).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import numpy as np

from ...platform.layout import record_dtype

HEADER = 12
MAX_LABELS = 128  # a 255-byte name has at most 127 labels

# Reasons a message is skipped, the `reason` attribute of ebpf_otlp.dns.malformed.
SHORT = "short"  # fewer than 12 bytes: no header
TRUNCATED = "truncated"  # question runs past the bytes we have
INVALID = "invalid"  # dnspython rejected it (bad pointer, label type, name too long...)
NO_QUESTION = "no_question"  # well formed but nothing to name the lookup by


def event_dtype(head_bytes: int) -> np.dtype:
    """The record dtype of an object loaded with ``head_bytes``: the fields of
    ``struct dns_event`` before ``head``, then ``head_bytes`` rounded up to 8
    (what the BPF side reserves per record)."""
    base = record_dtype("dns", "dns_event")
    off = base.fields["head"][1]
    n = (head_bytes + 7) & ~7
    names = [k for k in base.names if k != "head"]
    return np.dtype({"names": [*names, "head"],
                     "formats": [base.fields[k][0] for k in names] + [(np.uint8, (n,))],
                     "offsets": [base.fields[k][1] for k in names] + [off],
                     "itemsize": off + n})


class Message(NamedTuple):
    """One decoded DNS message (query or response)."""

    key: bytes  # pairs a query with its answer (pair_keys)
    response: bool
    ts_ns: int  # kernel CLOCK_MONOTONIC
    name: str  # first question, no trailing dot
    qtype: str  # "A", "AAAA", "TYPE65534"...
    rcode: int  # 4-bit header rcode
    answers: int  # ANCOUNT
    row: int  # index of the record in its batch


_new_tuple = tuple.__new__  # builds the NamedTuples below without their __new__ (hot path)


class Decoded(NamedTuple):
    """A decoded batch as columns, one entry per message that decoded."""

    rows: np.ndarray  # index of the record in its batch (ring order)
    response: np.ndarray  # bool: QR bit
    ts_ns: np.ndarray  # int64, kernel CLOCK_MONOTONIC
    question: np.ndarray  # int64 index into ``questions``
    rcode: np.ndarray  # int64, 4-bit header rcode
    answers: np.ndarray  # int64, ANCOUNT
    questions: list[tuple[str, str]]  # (name without trailing dot, type mnemonic)


_EMPTY = Decoded(*(np.zeros(0, t) for t in (np.int64, bool, np.int64, np.int64, np.int64,
                                            np.int64)), [])


def question_text(wire: bytes) -> tuple[str, str]:
    """(name without trailing dot, type mnemonic) of a message's first question.

    Raises dns.exception.DNSException (or ValueError) for anything dnspython
    rejects, and IndexError when the message has no question.
    """
    msg = dns.message.from_wire(wire, question_only=True, ignore_trailing=True)
    q = msg.question[0]
    return q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype)


_RCODES = [dns.rcode.to_text(i) for i in range(16)]


def rcode_text(rcode: int) -> str:
    """Mnemonic of a 4-bit header rcode (NOERROR, NXDOMAIN, SERVFAIL...)."""
    return _RCODES[rcode]


class Decoder:
    """Decodes batches of ``struct dns_event`` records (numpy structured arrays)."""

    def __init__(self, cache_size: int = 65536):
        self.cache_size = cache_size
        self._questions: dict[bytes, tuple[str, str]] = {}
        self.malformed: Counter[str] = Counter()
        self.decoded = 0
        self.parsed = 0  # full dnspython parses (cache misses and slow path)

    def decode(self, recs: np.ndarray) -> list[Message]:
        """Messages that decoded, in ring order; the rest are counted in ``malformed``."""
        d = self.decode_columns(recs)
        if not len(d.rows):
            return []
        keys = pair_keys(recs[d.rows], d.response)
        qs = d.questions
        return [_new_tuple(Message, (key, resp, ts, qs[q][0], qs[q][1], rc, an, i))
                for key, resp, ts, q, rc, an, i in zip(
                    keys, d.response.tolist(), d.ts_ns.tolist(), d.question.tolist(),
                    d.rcode.tolist(), d.answers.tolist(), d.rows.tolist())]

    def decode_columns(self, recs: np.ndarray) -> Decoded:
        """Decode a batch into columns (see :class:`Decoded`), in ring order.

        Questions are grouped by their bytes with numpy (one ``np.unique`` per
        batch), so the cache is asked once per distinct question and batch,
        and dnspython parses each distinct question once in all.
        """
        n = len(recs)
        if n == 0:
            return _EMPTY
        head = recs["head"]
        hl = np.minimum(recs["head_len"].astype(np.int64), recs["msg_len"].astype(np.int64))
        h = head[:, :HEADER].astype(np.int64)
        ok = hl >= HEADER
        qr = (h[:, 2] >> 7).astype(bool)
        qdcount = (h[:, 4] << 8) | h[:, 5]
        qend, cut = self._question_ends(head, hl, ok & (qdcount == 1))
        short, ncut = int(n - ok.sum()), int(cut.sum())
        if short:
            self.malformed[SHORT] += short
        if ncut:
            self.malformed[TRUNCATED] += ncut
        rows = np.flatnonzero(ok & ~cut) if ncut else np.flatnonzero(ok)
        if len(rows) == 0:
            return _EMPTY
        qidx = np.full(n, -1, np.int64)
        questions: list[tuple[str, str]] = []
        simple = rows[qend[rows] > 0]
        if len(simple):
            self._group_questions(head, hl, qend, simple, qidx, questions)
        for i in rows[qend[rows] == 0].tolist():  # several questions, pointers, ...
            q = self._slow(head[i, :hl[i]].tobytes(), None)
            if q is not None:
                qidx[i] = len(questions)
                questions.append(q)
        rows = rows[qidx[rows] >= 0]
        self.decoded += len(rows)
        hr = h[rows]
        return Decoded(rows, qr[rows], recs["ts_ns"][rows].astype(np.int64), qidx[rows],
                       (hr[:, 3] & 0xF).astype(np.int64), (hr[:, 6] << 8) | hr[:, 7],
                       questions)

    def _group_questions(self, head: np.ndarray, hl: np.ndarray, qend: np.ndarray,
                         rows: np.ndarray, qidx: np.ndarray,
                         questions: list[tuple[str, str]]) -> None:
        """Fill ``qidx`` for ``rows`` (plain single questions) from their question bytes."""
        ends = qend[rows]
        width = int(ends.max())
        q = head[rows, HEADER:width].copy()
        q[np.arange(HEADER, width)[None, :] >= ends[:, None]] = 0
        # the length joins the bytes: names that differ only in trailing zeros stay apart
        mat = np.concatenate([q, (ends - HEADER).astype("<u2").view(np.uint8).reshape(-1, 2)],
                             axis=1)
        uniq, first, inv = np.unique(mat.view(np.dtype((np.void, mat.shape[1]))).ravel(),
                                     return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        cache_get = self._questions.get
        local = np.full(len(uniq), -1, np.int64)
        for u, f in enumerate(first.tolist()):
            i = int(rows[f])
            qkey = head[i, HEADER:int(qend[i])].tobytes()
            got = cache_get(qkey) or self._slow(head[i, :hl[i]].tobytes(), qkey)
            if got is not None:
                local[u] = len(questions)
                questions.append(got)
        qidx[rows] = local[inv]
        failed = np.flatnonzero(local[inv] < 0)
        for k in failed.tolist():  # each message counts once (its first copy already did)
            if k != first[inv[k]]:
                i = int(rows[k])
                q = self._slow(head[i, :hl[i]].tobytes(), None)
                if q is not None:
                    qidx[i] = len(questions)
                    questions.append(q)

    def _slow(self, wire: bytes, qkey: bytes | None) -> tuple[str, str] | None:
        """dnspython on the whole head; caches the answer under the question's bytes."""
        self.parsed += 1
        try:
            q = question_text(wire)
        except IndexError:
            self.malformed[NO_QUESTION] += 1
            return None
        except dns.message.ShortHeader:
            self.malformed[SHORT] += 1
            return None
        except EOFError:
            self.malformed[TRUNCATED] += 1
            return None
        except (dns.exception.DNSException, ValueError, UnicodeError):
            self.malformed[INVALID] += 1
            return None
        if qkey is not None:
            if len(self._questions) >= self.cache_size:
                # Crude but bounded: real traffic re-fills the hot names at once.
                self._questions.clear()
            self._questions[qkey] = q
        return q

    @staticmethod
    def _question_ends(head: np.ndarray, hl: np.ndarray,
                       simple: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the first question ends (after QTYPE/QCLASS), for every record
        whose question is plain labels within the bytes we have, else 0 (those
        go to dnspython unaided); and which records end inside those labels."""
        n = len(head)
        rows = np.flatnonzero(simple)
        pos = np.full(len(rows), HEADER, dtype=np.int64)
        end = np.zeros(n, dtype=np.int64)
        cut = np.zeros(n, dtype=bool)
        limit = hl[rows]
        for _ in range(MAX_LABELS):
            if len(rows) == 0:
                break
            inside = pos < limit
            length = head[rows, np.minimum(pos, head.shape[1] - 1)].astype(np.int64)
            root = inside & (length == 0)
            bad = ~inside | (length >= 64)  # pointer, reserved type, or out of bytes
            qe = pos + 5
            fits = root & (qe <= limit) & (pos - HEADER + 1 <= 255)
            end[rows[fits]] = qe[fits]
            # Out of bytes before the name (or its type and class) ended.
            cut[rows[~inside | (root & (qe > limit))]] = True
            keep = ~(root | bad)
            rows, pos, limit = rows[keep], (pos + length + 1)[keep], limit[keep]
        return end, cut


def pair_keys(recs: np.ndarray, qr: np.ndarray) -> list[bytes]:
    """One bytes key per record naming its exchange (see :func:`pair_key_array`)."""
    return pair_key_array(recs, qr).tolist()


def pair_key_array(recs: np.ndarray, qr: np.ndarray) -> np.ndarray:
    """One ``S39`` key per record naming its exchange: transaction id, client
    address and port, server address and port, transport. The client is the
    sender of a query and the receiver of a response, so a query and its
    answer get the same key whatever the ports are. ``tolist()`` gives the
    keys as bytes (the last byte is never 0, so nothing is stripped)."""
    n = len(recs)
    k = np.empty((n, 39), dtype=np.uint8)
    resp = qr[:, None]
    k[:, 0:2] = recs["head"][:, 0:2]
    k[:, 2:18] = np.where(resp, recs["daddr"], recs["saddr"])
    k[:, 18:34] = np.where(resp, recs["saddr"], recs["daddr"])
    cport = np.where(qr, recs["dport"], recs["sport"]).astype(">u2")
    sport = np.where(qr, recs["sport"], recs["dport"]).astype(">u2")
    k[:, 34:36] = cport.view(np.uint8).reshape(n, 2)
    k[:, 36:38] = sport.view(np.uint8).reshape(n, 2)
    # Last byte never 0 (numpy's S dtype strips trailing NULs).
    k[:, 38] = recs["proto"] | 0x80
    return k.view("S39").ravel()


class Query(NamedTuple):
    """A query waiting for its answer."""

    ts_ns: int
    name: str
    qtype: str
    # (client addr, client port, server addr, server port, proto, family, ifindex):
    # raw, turned into text only when the lookup is emitted.
    row: tuple


def new_query(ts_ns: int, name: str, qtype: str, row: tuple) -> Query:
    return _new_tuple(Query, (ts_ns, name, qtype, row))


class PendingTable:
    """Queries waiting for answers, oldest first, bounded.

    Lookups leave the table when answered, when they time out, or when the
    table is full and a newer query needs room (``evicted``).
    """

    def __init__(self, max_pending: int, timeout_ns: int, recent: int = 4096):
        self.max_pending = max_pending
        self.timeout_ns = timeout_ns
        # OrderedDict, not dict: popping the oldest entry of a plain dict again
        # and again makes next(iter(d)) walk the deleted slots (O(n) each).
        self.pending: OrderedDict[bytes, Query] = OrderedDict()
        # Recently answered keys: a second copy of an answer (seen on two
        # interfaces, or a retransmitted response) is a duplicate, not an orphan.
        self._answered: OrderedDict[bytes, int] = OrderedDict()
        self._recent = recent
        self.evicted = 0
        self.duplicates = 0
        self.unmatched = 0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, key: bytes, query: Query) -> bool:
        """False for a copy of a query already waiting (kept: the first send counts)."""
        pending = self.pending
        if key in pending:
            self.duplicates += 1
            return False
        if len(pending) >= self.max_pending:
            pending.popitem(last=False)
            self.evicted += 1
        pending[key] = query
        return True

    def answer(self, key: bytes, ts_ns: int) -> Query | None:
        q = self.pending.pop(key, None)
        if q is None:
            if key in self._answered:
                self.duplicates += 1
            else:
                self.unmatched += 1
            return None
        answered = self._answered
        answered[key] = ts_ns
        if len(answered) > self._recent:
            answered.popitem(last=False)
        return q

    def fast_pairs(self, keys: np.ndarray, response: np.ndarray, ts_ns: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exchanges complete inside one batch, found with numpy: keys whose
        messages alternate query, answer, query, answer... (a key comes back
        when a client reuses its port and id), ending with an answer, with no
        query of theirs already waiting. Each query pairs with the answer
        after it, as adding and answering one by one would; answers are
        remembered for duplicates. Returns (query positions, answer
        positions, positions left for :meth:`add`/:meth:`answer`, in order).
        """
        n = len(keys)
        uniq, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        order = np.argsort(inv, kind="stable")  # each key's messages, in ring order
        g = inv[order]
        offset = np.arange(n) - (np.cumsum(cnt) - cnt)[g]
        wrong = np.bincount(g, weights=(response[order] != (offset % 2 == 1)),
                            minlength=len(uniq))
        good = (wrong == 0) & (cnt % 2 == 0)
        pending = self.pending
        if pending:
            cand = np.flatnonzero(good)
            good[cand] = np.fromiter((k not in pending for k in uniq[cand].tolist()), bool,
                                     len(cand))
        sel = good[g]
        qi = order[sel & (offset % 2 == 0)]
        ai = order[sel & (offset % 2 == 1)]
        if len(ai):
            # in ring order, as one by one (the window may drop keys re-added later in
            # the same batch: a copy of such an answer then counts as unmatched)
            ai_sorted = np.sort(ai)
            answered = self._answered
            answered.update(zip(keys[ai_sorted].tolist(), ts_ns[ai_sorted].tolist()))
            for _ in range(len(answered) - self._recent):
                answered.popitem(last=False)
        rest = np.ones(n, bool)
        rest[qi] = False
        rest[ai] = False
        return qi, ai, np.flatnonzero(rest)

    def expire(self, now_ns: int) -> list[Query]:
        """Pop queries older than the timeout (insertion order is close to time order)."""
        out = []
        pending = self.pending
        limit = now_ns - self.timeout_ns
        while pending:
            key = next(iter(pending))
            q = pending[key]
            if q.ts_ns > limit:
                break
            del pending[key]
            out.append(q)
        return out


class TcpContinuations:
    """Finds TCP segments that continue a message whose first segment we saw.

    The kernel side reads a TCP segment as if it began a message (length
    prefix first). A message larger than one segment (after GRO) also
    arrives in segments that do not: their first bytes are answer data, not
    a prefix. Each first segment says how long its message is (``msg_len``)
    and how much of it it carried (``seg_len``), so the rest of that many
    bytes on the same flow and direction is skipped, not decoded as garbage.
    """

    def __init__(self, max_flows: int = 4096):
        self.max_flows = max_flows
        self._left: OrderedDict[bytes, int] = OrderedDict()
        self.skipped = 0

    def mask(self, recs: np.ndarray) -> np.ndarray | None:
        """Rows to skip, or None when the batch has no TCP."""
        tcp = np.flatnonzero(recs["proto"] == 6)
        if len(tcp) == 0:
            return None
        sub = recs[tcp]
        flow = np.empty((len(sub), 36), dtype=np.uint8)
        flow[:, 0:16], flow[:, 16:32] = sub["saddr"], sub["daddr"]
        flow[:, 32:34] = sub["sport"].astype("<u2").view(np.uint8).reshape(-1, 2)
        flow[:, 34:36] = sub["dport"].astype("<u2").view(np.uint8).reshape(-1, 2)
        flows = [bytes(f) for f in flow]
        skip = np.zeros(len(recs), dtype=bool)
        left_of = self._left
        for i, f, msg, seg in zip(tcp.tolist(), flows, sub["msg_len"].tolist(),
                                  sub["seg_len"].tolist()):
            left = left_of.get(f, 0)
            if left > 0:
                skip[i] = True
                self.skipped += 1
                left -= seg + 2  # the program took 2 of its bytes for a prefix
                if left > 0:
                    left_of[f] = left
                else:
                    del left_of[f]
            elif msg > seg:
                left_of[f] = msg - seg
                if len(left_of) > self.max_flows:
                    left_of.popitem(last=False)
        return skip
