"""The packet datapath shared by the flows and DNS signals.

One BPF object (``bpf/packet.bpf.c``) holds the flow tables and the DNS ring;
its single TC program per hook and direction parses each packet once for
both signals (a signal that is off is dead code the verifier removed). XDP
flow mode adds ``packet_xdp_ingress``, and the TC ingress program then does
DNS only. Programs attach through TCX links where the kernel has them
(``--tc-mode auto``), else as clsact filters.

Interfaces are watched by name once per interval:

* an interface that disappears and comes back (a container restart) is
  re-attached, with its new ifindex, without restarting the agent;
* a hook that sees no packet while the interface's own counters move (another
  program ended classification before ours, a qdisc was replaced) is
  reported once in the log and as ``ebpf_otlp.hook.silent``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..platform import tcx
from ..platform.bpfobj import BpfObject
from ..platform.layout import constant, record_dtype
from ..platform.libbpf import BpfError

if TYPE_CHECKING:
    from ..config import AgentConfig

log = logging.getLogger(__name__)

DIRECTIONS = ("ingress", "egress")  # index = FLOW_DIR_RECEIVE / FLOW_DIR_TRANSMIT
_DIR_TEXT = {"ingress": "receive", "egress": "transmit"}
# DNS records are ~330 bytes (default head) and floods come in bursts: 8 MiB
# hold ~25,000 messages, over half a second at 20,000 queries/s, so a consumer
# that a busy host does not schedule for a while still loses nothing
# (bench/dns_flood.py). 16 MiB took the default agent past 64 MiB of kernel
# memory (README "Kernel memory").
MIN_DNS_RING_BYTES = 8 << 20
# Interfaces (x2 directions) the overflow and hook tables can key: re-attached
# interfaces take new keys. Beyond it, overflow lands in the ifindex-0 slot.
MAX_HOOK_KEYS = 512
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772


def has_link_header(ifname: str) -> bool:
    """Ethernet-like devices (and loopback) carry a link-layer header; tun,
    WireGuard and IP-in-IP devices start with the IP header."""
    try:
        kind = int(Path(f"/sys/class/net/{ifname}/type").read_text())
    except (OSError, ValueError):
        return True
    return kind in (ARPHRD_ETHER, ARPHRD_LOOPBACK)


def iface_packets(ifname: str, direction: str) -> int | None:
    """The interface's own packet counter for ``direction`` (None when gone)."""
    stat = "rx_packets" if direction == "ingress" else "tx_packets"
    try:
        return int(Path(f"/sys/class/net/{ifname}/statistics/{stat}").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Hook:
    """One watched interface: where it is now and what is attached to it."""

    name: str
    ifindex: int = 0                      # 0: not present
    attachments: list = field(default_factory=list)
    gone_logged: bool = False
    # per direction: last (hook packets, interface packets), and the silent state
    last: dict = field(default_factory=dict)
    silent: dict = field(default_factory=dict)


class PacketDatapath:
    """The packet object, loaded once for every signal that uses it.

    ``for_config(config).acquire(name)`` loads and attaches on the first call;
    ``release(name)`` detaches and frees after the last user.
    """

    _shared: dict[int, PacketDatapath] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: AgentConfig) -> PacketDatapath:
        with cls._shared_lock:
            dp = cls._shared.get(id(config))
            if dp is None:
                dp = cls._shared[id(config)] = cls(config)
            return dp

    def __init__(self, config: AgentConfig):
        self.config = config
        sig = set(config.signals)
        self.flows_on = "flows" in sig
        self.dns_on = "dns" in sig
        self.xdp = self.flows_on and config.flow_hook == "xdp"
        self.users: set[str] = set()
        self.obj: BpfObject | None = None
        self.mode = ""                       # "tcx" or "tc" once started
        self.hooks: dict[str, Hook] = {}
        self.ifnames: dict[int, str] = {}    # every ifindex ever attached -> name
        self.reattached = 0
        self.silent: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._keys_used: set[int] = set()
        self._slot_owner: dict[int, int] = {}  # hook_slots residue -> owning ifindex
        self._first_user = ""
        self._health_registered = False
        self._last_tick = 0.0
        self._auto = False

    # --- lifecycle ------------------------------------------------------------------
    def acquire(self, user: str, exporter: object = None) -> PacketDatapath:
        with self._lock:
            if self.obj is None:
                self._start()
                self._first_user = user
            self.users.add(user)
        if exporter is not None and not self._health_registered:
            self._health_registered = True
            self._register_health(exporter)
        return self

    def programs(self, user: str) -> list:
        """The loaded programs, listed for one user only (health counts them once)."""
        if self.obj is None or user != self._first_user:
            return []
        return [p for p in self.obj.programs.values() if p.autoload]

    def detach_hooks(self) -> None:
        """Detach from every interface (the counters then hold still for a last drain)."""
        with self._lock:
            if self.obj is None:
                return
            for h in self.hooks.values():
                self._detach(h)
            self.hooks.clear()

    def set_ifaces(self, names: list[str]) -> None:
        """SIGHUP: attach to the interfaces new in ``names``, detach from those no
        longer in it; the others keep their hooks (and counts). Idempotent."""
        with self._lock:
            if self.obj is None:
                return
            for name in names:
                socket.if_nametoindex(name)  # OSError: no such interface
            for name in names:
                if name not in self.hooks:
                    h = self.hooks[name] = Hook(name)
                    self._attach(h)
            for name in [n for n in self.hooks if n not in names]:
                self._detach(self.hooks.pop(name))

    def interval_tick(self, interval_s: float) -> None:
        """Once per interval whichever signal calls first: re-attach, check liveness."""
        now = time.monotonic()
        if now - self._last_tick < interval_s / 2:
            return
        self._last_tick = now
        self.refresh()
        self.check_alive()

    def _register_health(self, exporter) -> None:
        exporter.observe("ebpf_otlp.hook.silent", "1",
                         "1 while the interface moves packets our hook does not see",
                         lambda: [(int(v), {"network.interface.name": n,
                                            "network.io.direction": _DIR_TEXT[d]})
                                  for (n, d), v in list(self.silent.items())], kind="gauge")
        exporter.observe("ebpf_otlp.hook.reattached", "{event}",
                         "re-attachments to interfaces that were deleted and came back",
                         lambda: [(self.reattached, {})])

    def release(self, user: str) -> None:
        with self._lock:
            self.users.discard(user)
            if self.users or self.obj is None:
                return
            for h in self.hooks.values():
                self._detach(h)
            obj, self.obj = self.obj, None
            obj.close()
        with self._shared_lock:
            if self._shared.get(id(self.config)) is self:
                del self._shared[id(self.config)]

    def _start(self) -> None:
        cfg = self.config
        for name in cfg.ifaces:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise OSError(f"no such interface: {name}") from None
        self._auto = cfg.tc_mode == "auto"
        self.mode = tcx.resolve(cfg.tc_mode)
        obj = BpfObject.open_packaged("packet")
        try:
            self._configure(obj)
            obj.load()
            self.obj = obj
            self._init_tables()
            for name in cfg.ifaces:
                h = self.hooks[name] = Hook(name)
                self._attach(h)
        except BaseException:
            self.obj = None
            self.hooks.clear()
            obj.close()  # detaches whatever was attached
            raise
        log.info("packet hooks: %s on %s", self.mode.upper(), ", ".join(cfg.ifaces))

    def _configure(self, obj: BpfObject) -> None:
        cfg = self.config
        obj.rodata["flows_on"] = int(self.flows_on)
        obj.rodata["dns_on"] = int(self.dns_on)
        obj.rodata["hook_count_on"] = 1
        obj.rodata["flows_tc_ingress"] = int(not self.xdp)
        obj.rodata["ringbuf_wakeup_bytes"] = cfg.ringbuf_wakeup_bytes
        for t in ("flows_a", "flows_b"):
            obj.set_max_entries(t, cfg.max_flows if self.flows_on else 1)
        obj.set_max_entries("flows_overflow", MAX_HOOK_KEYS + 2)
        obj.set_max_entries("hook_seen", MAX_HOOK_KEYS)
        if self.dns_on:
            max_ports = constant("dns", "DNS_MAX_PORTS")
            ports = tuple(dict.fromkeys(cfg.dns_ports))
            obj.rodata["dns_ports"] = np.array(list(ports) + [0] * (max_ports - len(ports)),
                                               dtype="<u2").tobytes()
            obj.rodata["n_dns_ports"] = len(ports)
            obj.rodata["head_bytes"] = cfg.dns_head_bytes
            obj.set_max_entries("dns_events", max(cfg.ringbuf_bytes, MIN_DNS_RING_BYTES))
        else:
            obj.set_max_entries("dns_events", 4096)
        progs = ["packet_tc_ingress", "packet_tc_egress"]
        if any(not has_link_header(n) for n in cfg.ifaces):
            progs += ["packet_tc_ingress_l3", "packet_tc_egress_l3"]
        if self.xdp:
            progs.append("packet_xdp_ingress")
        obj.only_programs(progs)

    def _init_tables(self) -> None:
        """Overflow slot 0 catches flows of interfaces without their own slot."""
        ovf = self.obj.maps["flows_overflow"]
        kdt = record_dtype("flows", "flow_ovf_key")
        for d in (0, 1):
            k = np.zeros(1, kdt)
            k["direction"] = d
            ovf.update(k.tobytes(), bytes(ovf.value_stride))

    def _hook_keys(self, ifindex: int) -> None:
        if ifindex in self._keys_used or len(self._keys_used) * 2 >= MAX_HOOK_KEYS:
            return
        self._keys_used.add(ifindex)
        ovf = self.obj.maps["flows_overflow"]
        seen = self.obj.maps["hook_seen"]
        kdt = record_dtype("flows", "flow_ovf_key")
        for d in (0, 1):
            k = np.zeros(1, kdt)
            k["ifindex"], k["direction"] = ifindex, d
            ovf.update(k.tobytes(), bytes(ovf.value_stride))
            seen.update(((ifindex << 1) | d).to_bytes(4, "little"), bytes(seen.value_stride))
        # The fast path (bpf/packet.bpf.c hook_slots): the first interface with
        # this residue owns the slot; later ones count in hook_seen only.
        slots = self.obj.maps["hook_slots"]
        residue = ifindex % (slots.max_entries // 2)
        if residue not in self._slot_owner:
            self._slot_owner[residue] = ifindex
            owned = np.zeros((slots.ncpus, slots.value_stride // slots.ncpus // 8), "<u8")
            owned[:, 0] = ifindex  # struct hook_slot: u32 ifindex, u32 pad, u64 packets
            for d in (0, 1):
                slots.update((residue << 1) | d, owned.tobytes())

    # --- attaching ------------------------------------------------------------------
    def _attach(self, h: Hook) -> bool:
        try:
            idx = socket.if_nametoindex(h.name)
        except OSError:
            return False
        self._hook_keys(idx)
        suffix = "" if has_link_header(h.name) else "_l3"
        progs = self.obj.programs
        plan = [("packet_xdp_ingress" if self.xdp else "packet_tc_ingress" + suffix, "ingress"),
                ("packet_tc_egress" + suffix, "egress")]
        if self.xdp and self.dns_on:
            plan.append(("packet_tc_ingress" + suffix, "ingress"))
        for prog, direction in plan:
            p = progs[prog]
            if prog == "packet_xdp_ingress":
                h.attachments.append(p.attach_xdp(idx))
                continue
            if self.mode == "tcx":
                try:
                    h.attachments.append(p.attach_tcx(idx, direction))
                    continue
                except BpfError as e:
                    if not (self._auto and not h.attachments and not self.ifnames):
                        raise
                    # the kernel names TCX but refuses it here (a sandbox, a
                    # missing config): auto falls back to clsact filters
                    log.warning("TCX attach refused (%s); using clsact filters", e)
                    self.mode = "tc"
            h.attachments.append(p.attach_tc(idx, direction))
        h.ifindex = idx
        h.last.clear()
        self.ifnames[idx] = h.name
        return True

    def _detach(self, h: Hook) -> None:
        for a in h.attachments:
            try:
                self.obj.detach(a)
            except BpfError as e:
                if e.errno not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    log.warning("detaching %s: %s", a, e)
        h.attachments.clear()
        h.ifindex = 0

    def add_interface(self, name: str, ifindex: int) -> None:
        """Attach to ``name`` now: a new ``--iface`` glob match, or a watched interface
        created again (agent.watch_interfaces, every second). Both signals call it;
        the second call, like :meth:`refresh` later, finds it attached already."""
        with self._lock:
            if self.obj is None:
                return
            h = self.hooks.get(name)
            known = h is not None
            if h is None:
                h = self.hooks[name] = Hook(name)
            elif h.ifindex == ifindex:
                return
            old = h.ifindex
            if old:
                self._detach(h)
            try:
                if self._attach(h) and known:  # a watched interface that came back
                    self.reattached += 1
                    h.gone_logged = False
                    log.warning("interface %s is back (ifindex %d, was %d): re-attached",
                                name, h.ifindex, old)
            except (BpfError, KeyError):
                self._detach(h)
                raise

    def refresh(self) -> None:
        """Re-attach interfaces that came back under a new ifindex."""
        with self._lock:
            if self.obj is None:
                return
            for h in self.hooks.values():
                try:
                    idx = socket.if_nametoindex(h.name)
                except OSError:
                    idx = 0
                if idx == h.ifindex:
                    continue
                old = h.ifindex
                if old:
                    self._detach(h)
                if not idx:
                    if not h.gone_logged:
                        log.warning("interface %s is gone; it is re-attached when it returns",
                                    h.name)
                        h.gone_logged = True
                    continue
                try:
                    if self._attach(h):
                        self.reattached += 1
                        h.gone_logged = False
                        log.warning("interface %s is back (ifindex %d, was %d): re-attached",
                                    h.name, idx, old)
                except BpfError as e:
                    log.warning("re-attaching to %s failed: %s", h.name, e)
                    self._detach(h)

    # --- liveness ------------------------------------------------------------------
    def hook_packets(self, ifindex: int, direction: str) -> int:
        d = DIRECTIONS.index(direction)
        m = self.obj.maps["hook_seen"]
        raw = m.lookup(((ifindex << 1) | d).to_bytes(4, "little"))
        n = 0 if raw is None else int(m.per_cpu(raw).sum())
        slots = self.obj.maps["hook_slots"]
        residue = ifindex % (slots.max_entries // 2)
        if self._slot_owner.get(residue) == ifindex:
            raw = slots.lookup((residue << 1) | d)
            if raw is not None:  # per CPU: u32 ifindex, u32 pad, u64 packets
                n += int(np.frombuffer(raw, "<u8").reshape(slots.ncpus, -1)[:, 1].sum())
        return n

    def check_alive(self) -> dict[tuple[str, str], bool]:
        """Per (interface, direction): silent = the interface moved packets since
        the last check and our hook saw none. Logs each hook once when it turns
        silent (and when it recovers)."""
        out: dict[tuple[str, str], bool] = {}
        with self._lock:
            if self.obj is None:
                return out
            for h in self.hooks.values():
                if not h.ifindex:
                    continue
                for d in DIRECTIONS:
                    seen, iface = self.hook_packets(h.ifindex, d), iface_packets(h.name, d)
                    if iface is None:
                        continue
                    prev = h.last.get(d)
                    h.last[d] = (seen, iface)
                    if prev is None:
                        continue
                    silent = iface > prev[1] and seen == prev[0]
                    if silent and not h.silent.get(d):
                        log.warning("%s %s: the interface moved %d packets but our hook saw "
                                    "none (another program ending classification first? a "
                                    "replaced qdisc?)", h.name, d, iface - prev[1])
                    elif h.silent.get(d) and not silent and seen > prev[0]:
                        log.info("%s %s: our hook sees packets again", h.name, d)
                    h.silent[d] = silent
                    out[(h.name, d)] = silent
            self.silent.update(out)
        return out


class PacketHooks:
    """What the signals that share the packet datapath (flows, DNS at TC) do alike:
    their ``dp`` is that datapath, and interface changes go through it."""

    dp: PacketDatapath | None
    objects: list
    config: object

    def bpf_objects(self) -> list:
        return [*self.objects, *([self.dp.obj] if self.dp is not None and self.dp.obj else [])]

    def reconfigure(self, config: object, changed: set[str]) -> bool:
        """SIGHUP with only the interface list changed: the shared packet hooks follow
        it in place (the unchanged interfaces keep theirs, and the counts)."""
        if changed != {"ifaces"} or self.dp is None or self.dp.xdp:
            return False
        try:
            self.dp.set_ifaces(list(config.ifaces))
        except OSError:
            return False
        self.config = config
        return True

    def add_interface(self, name: str, ifindex: int) -> None:
        """Attach to an interface that appeared while running (agent.watch_interfaces)."""
        if self.dp is not None:
            self.dp.add_interface(name, ifindex)
