"""Drained drop-table entries -> metric attributes.

One row per distinct (reason, location, flow, interface) of one interval,
never one per packet, so plain Python per row is affordable.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ...otlp.semconv import PORT_PROTOS, address_text, transport
from ...platform.layout import record_dtype
from .reasons import DropReasons


def key_dtype() -> np.dtype:
    return record_dtype("drops", "drop_key")


def value_dtype() -> np.dtype:
    return record_dtype("drops", "drop_value")


def own_netns() -> int:
    """The inode of this process's network namespace (0 if unknown)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class DropRow:
    """One drained entry, decoded."""

    attributes: dict[str, str | int]
    packets: int
    first_ns: int  # CLOCK_MONOTONIC
    reason: int
    location: int
    netns: int = 0  # inode of the namespace the kernel freed the packet in; 0 unknown


class DropDecoder:
    """Turns drained (keys, values) arrays into :class:`DropRow`.

    ``keep``: the flow attributes the user keeps (``config.flow_attributes``);
    ``location_name``: address -> function name, or None to leave the
    location out.
    """

    def __init__(self, reasons: DropReasons, keep: tuple[str, ...] | frozenset[str],
                 location_name: Callable[[int], str] | None = None,
                 netns: int | None = None):
        self.reasons = reasons
        self.keep = frozenset(keep)
        self.location_name = location_name
        self.netns = own_netns() if netns is None else netns
        self._ifnames: dict[int, str | None] = {}

    def _ifname(self, ifname: bytes, ifindex: int, netns: int) -> str | None:
        name = ifname.split(b"\0", 1)[0]
        if name:
            return name.decode(errors="replace")
        # Only the kernel's skb_iif is known: an index means something only
        # in the namespace it came from, so resolve it only in ours.
        if not ifindex or netns != self.netns:
            return None
        if ifindex not in self._ifnames:
            try:
                self._ifnames[ifindex] = socket.if_indextoname(ifindex)
            except OSError:
                self._ifnames[ifindex] = None
        return self._ifnames[ifindex]

    def rows(self, keys: np.ndarray, values: np.ndarray) -> Iterator[DropRow]:
        """Decode raw drained arrays (uint8, as ``Map.drain`` returns them)."""
        self._ifnames.clear()  # interfaces come and go; re-resolve each interval
        if not len(keys):
            return
        k = keys.view(key_dtype()).reshape(-1)
        v = values.view(value_dtype()).reshape(-1)
        keep = self.keep
        for i in range(len(k)):
            rec = k[i]
            reason = int(rec["reason"])
            attrs: dict[str, str | int] = {"network.drop.reason": self.reasons.name(reason)}
            location = int(rec["location"])
            if self.location_name is not None and location:
                attrs["network.drop.location"] = self.location_name(location)
            family = int(rec["family"])
            if family in (4, 6):
                proto = int(rec["l4proto"])
                flow: dict[str, str | int] = {
                    "network.type": f"ipv{family}",
                    "network.transport": transport(proto),
                    "source.address": address_text(rec["saddr"].tobytes()),
                    "destination.address": address_text(rec["daddr"].tobytes()),
                }
                if proto in PORT_PROTOS:
                    flow["source.port"] = int(rec["sport"])
                    flow["destination.port"] = int(rec["dport"])
                attrs.update((a, x) for a, x in flow.items() if a in keep)
            if "network.interface.name" in keep:
                ifname = self._ifname(rec["ifname"].tobytes(), int(rec["ifindex"]),
                                      int(rec["netns"]))
                if ifname:
                    attrs["network.interface.name"] = ifname
            yield DropRow(attrs, int(v[i]["packets"]), int(v[i]["first_ns"]), reason, location,
                          int(rec["netns"]))
