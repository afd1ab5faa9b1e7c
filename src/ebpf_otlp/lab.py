"""Test hosts: network namespaces joined by a veth pair, created for one test or
the demo and always removed."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

_counter = itertools.count()


def sh(*cmd: str, check: bool = True, ns: str | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


class Topology:
    """Two namespaces ``a`` and ``b`` joined by veth ``veth-a`` <-> ``veth-b``.

    Addresses: a = 10.201.0.1 / fd00:eb::1, b = 10.201.0.2 / fd00:eb::2.
    Use as a context manager; the namespaces (and so every TC filter, XDP
    program and socket inside them) are deleted on exit.
    """

    a_ip4, b_ip4 = "10.201.0.1", "10.201.0.2"
    a_ip6, b_ip6 = "fd00:eb::1", "fd00:eb::2"
    a_if = "veth-a"
    b_if = "veth-b"

    def __init__(self, mtu: int = 1500, offload: bool = True):
        n = f"{os.getpid() % 100000}{next(_counter)}"
        self.a = f"eo{n}a"
        self.b = f"eo{n}b"
        self.mtu = mtu
        self.offload = offload

    def __enter__(self) -> Topology:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        tmp_a, tmp_b = f"{self.a}x", f"{self.b}x"
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", tmp_a, "mtu", str(self.mtu), "type", "veth", "peer", "name",
           tmp_b, "mtu", str(self.mtu))
        sh("ip", "link", "set", tmp_a, "netns", self.a, "name", self.a_if)
        sh("ip", "link", "set", tmp_b, "netns", self.b, "name", self.b_if)
        for ns, ifn, v4, v6 in ((self.a, self.a_if, self.a_ip4, self.a_ip6),
                                (self.b, self.b_if, self.b_ip4, self.b_ip6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", ifn)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", ifn, "nodad")
            sh("ip", "-n", ns, "link", "set", ifn, "up")
            if not self.offload:
                sh("ethtool", "-K", ifn, "tso", "off", "gso", "off", "gro", "off",
                   check=False, ns=ns)
        # Neighbours resolved up front: no ARP/NDP frames inside a measured window.
        sh("ip", "-n", self.a, "neigh", "replace", self.b_ip4, "lladdr", self.mac(self.b),
           "dev", self.a_if, "nud", "permanent")
        sh("ip", "-n", self.b, "neigh", "replace", self.a_ip4, "lladdr", self.mac(self.a),
           "dev", self.b_if, "nud", "permanent")
        sh("ip", "-n", self.a, "-6", "neigh", "replace", self.b_ip6, "lladdr",
           self.mac(self.b), "dev", self.a_if, "nud", "permanent")
        sh("ip", "-n", self.b, "-6", "neigh", "replace", self.a_ip6, "lladdr",
           self.mac(self.a), "dev", self.b_if, "nud", "permanent")

    def mac(self, ns: str) -> str:
        ifn = self.a_if if ns == self.a else self.b_if
        return sh("cat", f"/sys/class/net/{ifn}/address", ns=ns).stdout.strip()

    def ifindex(self, ns: str, ifname: str | None = None) -> int:
        ifn = ifname or (self.a_if if ns == self.a else self.b_if)
        return int(sh("cat", f"/sys/class/net/{ifn}/ifindex", ns=ns).stdout)

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 60):
        return sh(*cmd, ns=ns, check=check, timeout=timeout)

    def popen(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)

    def link_stats(self, ns: str, ifname: str | None = None) -> dict[str, int]:
        """The interface's own counters (what ``ip -s link`` prints)."""
        ifn = ifname or (self.a_if if ns == self.a else self.b_if)
        out = {}
        for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            out[key] = int(sh("cat", f"/sys/class/net/{ifn}/statistics/{key}", ns=ns).stdout)
        return out

    def snmp(self, ns: str, proto: str = "Tcp") -> dict[str, int]:
        """One protocol's counters from the namespace's /proc/net/snmp."""
        lines = [ln.split() for ln in sh("cat", "/proc/net/snmp", ns=ns).stdout.splitlines()
                 if ln.startswith(proto + ":")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}

    def close(self) -> None:
        for ns in (self.a, self.b):
            if Path(f"/run/netns/{ns}").exists():
                for _ in range(3):
                    if sh("ip", "netns", "del", ns, check=False).returncode == 0:
                        break
                    time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.close()
