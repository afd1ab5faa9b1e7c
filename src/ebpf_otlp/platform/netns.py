"""Network namespaces as the host sees them: which processes live in a
namespace (``/proc/*/ns/net``), which namespace the far end of a veth lives
in (rtnetlink ``IFLA_LINK_NETNSID`` matched against ``RTM_GETNSID`` of each
namespace's processes), and a namespace's own addresses (``/proc/PID/net``).
"""

from __future__ import annotations

import os
import socket
import struct
import time

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWNSID, RTM_GETNSID = 88, 90
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
IFLA_IFNAME, IFLA_LINK, IFLA_LINK_NETNSID = 3, 5, 37
NETNSA_NSID, NETNSA_PID = 1, 2
NO_NSID = -1


def netns_inode(pid: int | str = "self", proc: str = "/proc") -> int:
    """The inode of a process's network namespace, 0 if it is gone."""
    try:
        link = os.readlink(f"{proc}/{pid}/ns/net")  # "net:[4026531840]"
        return int(link[5:-1])
    except (OSError, ValueError):
        return 0


def _attrs(data: bytes, off: int) -> dict[int, bytes]:
    out = {}
    while off + 4 <= len(data):
        alen, atype = struct.unpack_from("HH", data, off)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[off + 4:off + alen]
        off += (alen + 3) & ~3
    return out


class Rtnl:
    """A tiny rtnetlink client: one request, one answer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.settimeout(2.0)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _ask(self, mtype: int, body: bytes) -> tuple[int, bytes] | None:
        self._seq += 1
        msg = struct.pack("IHHII", 16 + len(body), mtype, NLM_F_REQUEST, self._seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                mlen, rtype, _flags, seq, _ = struct.unpack_from("IHHII", data, off)
                if mlen < 16:
                    return None
                if seq == self._seq:
                    if rtype == NLMSG_ERROR:
                        return None
                    return rtype, data[off + 16:off + mlen]
                off += (mlen + 3) & ~3

    def link(self, ifindex: int) -> dict[int, bytes] | None:
        """The attributes of link ``ifindex`` (None if there is none)."""
        r = self._ask(RTM_GETLINK, struct.pack("BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0))
        if r is None or r[0] != RTM_NEWLINK:
            return None
        return _attrs(r[1], 16)

    def nsid_of_pid(self, pid: int) -> int:
        """The id this namespace gave the network namespace of ``pid`` (-1: none)."""
        body = struct.pack("Bxxx", socket.AF_UNSPEC) + struct.pack("HHI", 8, NETNSA_PID, pid)
        r = self._ask(RTM_GETNSID, body)
        if r is None or r[0] != RTM_NEWNSID:
            return NO_NSID
        a = _attrs(r[1], 4)
        return struct.unpack("i", a[NETNSA_NSID])[0] if NETNSA_NSID in a else NO_NSID


def link_peer(rtnl: Rtnl, ifindex: int) -> tuple[int, int] | None:
    """(peer namespace id, peer ifindex) of a veth-like link whose far end is in
    another namespace; None for a link with no peer elsewhere."""
    a = rtnl.link(ifindex)
    if a is None or IFLA_LINK_NETNSID not in a:
        return None
    nsid = struct.unpack("i", a[IFLA_LINK_NETNSID])[0]
    peer = struct.unpack("i", a[IFLA_LINK])[0] if IFLA_LINK in a else 0
    return nsid, peer


class ProcessTable:
    """Processes per network namespace inode, from one scan of ``/proc``,
    re-scanned on a miss at most every ``rescan_s``."""

    def __init__(self, proc: str = "/proc", rescan_s: float = 1.0):
        self.proc = proc
        self.rescan_s = rescan_s
        self.by_netns: dict[int, list[int]] = {}
        self.scans = 0
        self._last = -1e9

    def scan(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.rescan_s:
            return False
        self._last = now
        self.scans += 1
        out: dict[int, list[int]] = {}
        try:
            names = os.listdir(self.proc)
        except OSError:
            return False
        for name in names:
            if not name.isdigit():
                continue
            ino = netns_inode(name, self.proc)
            if ino:
                out.setdefault(ino, []).append(int(name))
        self.by_netns = out
        return True

    def pids(self, netns: int) -> list[int]:
        """Processes in namespace ``netns`` (a rescan on a miss, rate-limited)."""
        got = self.by_netns.get(netns)
        if not got and self.scan():
            got = self.by_netns.get(netns)
        return got or []


def local_addresses(pid: int, proc: str = "/proc") -> list[str]:
    """The unicast addresses of ``pid``'s network namespace, loopback and
    link-local excluded (from ``/proc/PID/net/fib_trie`` and ``if_inet6``)."""
    out: list[str] = []
    try:
        with open(f"{proc}/{pid}/net/fib_trie") as f:
            lines = f.read().splitlines()
        for prev, line in zip(lines, lines[1:]):
            if line.strip() == "/32 host LOCAL":
                addr = prev.strip().lstrip("|-+ ").strip()
                if not addr.startswith("127.") and addr not in out:
                    out.append(addr)
    except OSError:
        pass
    try:
        with open(f"{proc}/{pid}/net/if_inet6") as f:
            for line in f:
                hexaddr, _idx, _plen, scope, *_ = line.split()
                if int(scope, 16) != 0:  # host / link scope
                    continue
                a = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                if a not in out:
                    out.append(a)
    except (OSError, ValueError):
        pass
    return out
