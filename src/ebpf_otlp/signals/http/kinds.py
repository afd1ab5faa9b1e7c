"""What a new connection shares with the other connections of its kind.

Connections of one client process to one server (and the server's side of
them) differ only in a port: the addresses, the address family, the process
name and the workload ids (cgroup, network namespace) repeat. On a new
connection per request (``Connection: close``) turning those bytes into text
for every connection was a large part of the agent's work
(bench/http_replay.py); here it is done once per kind, looked up by the
record's bytes of them.
"""

from __future__ import annotations

import numpy as np

from ...otlp.semconv import AddressCache

# The record fields that make a connection's kind (struct http_event, bpf/http.h).
KIND_FIELDS = ("family", "laddr", "raddr", "comm", "cgroup_id", "netns")


class ConnKinds:
    """(family, local address text, remote address text, process name, (cgroup id,
    netns inode)) by the bytes of KIND_FIELDS of a record; bounded (cleared
    when ``size`` kinds are held: connections keep what they got)."""

    def __init__(self, dtype: np.dtype, addrs: AddressCache, size: int = 4096):
        cols = []
        for name in KIND_FIELDS:
            ft, off = dtype.fields[name][:2]
            cols.extend(range(off, off + ft.itemsize))
        self._cols = np.array(cols, np.intp)
        self.width = len(cols)
        self._offsets = []
        pos = 0
        for name in KIND_FIELDS:
            ft = dtype.fields[name][0]
            self._offsets.append((name, pos, ft))
            pos += ft.itemsize
        self.addrs = addrs
        self.size = size
        self.known: dict[bytes, tuple] = {}
        # comm and cgroup_id, next to each other in the kind bytes: a process's ids
        pos = {name: p for name, p, _ in self._offsets}
        self.ids = slice(pos["comm"], pos["cgroup_id"] + dtype.fields["cgroup_id"][0].itemsize)

    def columns(self, recs: np.ndarray) -> bytes:
        """The kind bytes of every record of a batch, ``width`` each."""
        raw = np.ascontiguousarray(recs).view(np.uint8).reshape(len(recs), -1)
        return raw[:, self._cols].tobytes()

    def with_ids(self, key: bytes, ids: bytes) -> bytes:
        """``key`` with a process's ids (``key[self.ids]`` of one of its records)."""
        return key[:self.ids.start] + ids + key[self.ids.stop:]

    def kind(self, key: bytes) -> tuple:
        """The kind of one record's kind bytes (``columns``), made once."""
        k = self.known.get(key)
        if k is None:
            k = self._make(key)
            if len(self.known) >= self.size:
                self.known.clear()
            self.known[key] = k
        return k

    def _make(self, key: bytes) -> tuple:
        v = {name: np.frombuffer(key, ft, 1, pos)[0] for name, pos, ft in self._offsets}
        comm = bytes(v["comm"])
        name = comm.split(b"\0", 1)[0].decode(errors="replace")
        fam = int(v["family"])
        origin = (int(v["cgroup_id"]), int(v["netns"]))
        if fam == 0:
            return (0, "", "", name, origin)
        # IPv4 records are IPv4-mapped (bpf/http.h)
        return (fam, self.addrs.text(bytes(v["laddr"])), self.addrs.text(bytes(v["raddr"])),
                name, origin)
