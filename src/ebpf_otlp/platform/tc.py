"""TC clsact filters. Unlike links, they outlive the process, so every filter
of ours carries a reserved handle and a priority in a reserved range: close
removes them, and start-up removes those a crashed run left behind.

The clsact qdisc itself is left as found: one this process created goes
again with the last filter on it (ours or another tool's), one that was
there before is never deleted."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading

from .libbpf import BpfError, capture_log, ffi, lib

log = logging.getLogger(__name__)

HANDLE = 0xEB0F
PRIO_BASE = 0xEB00
PRIO_SLOTS = 32
_POINTS = {"ingress": 1, "egress": 2}  # enum bpf_tc_attach_point


def _hook(ifindex: int, direction: str) -> object:
    if direction not in _POINTS:
        raise ValueError(f"TC direction must be ingress or egress, not {direction!r}")
    hook = ffi.new("struct bpf_tc_hook *")
    hook.sz = ffi.sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = _POINTS[direction]
    return hook


def _opts(prio: int, prog_fd: int = 0, flags: int = 0) -> object:
    opts = ffi.new("struct bpf_tc_opts *")
    opts.sz = ffi.sizeof("struct bpf_tc_opts")
    opts.handle = HANDLE
    opts.priority = prio
    opts.prog_fd = prog_fd
    opts.flags = flags
    return opts


# ifindexes whose clsact qdisc this process created (and has not removed yet)
_created: set[int] = set()
_created_lock = threading.Lock()


def _ensure_clsact(hook: object, ifindex: int) -> bool:
    """Create the clsact qdisc unless there is one; True when this call created it."""
    with capture_log() as lines:
        ret = lib.bpf_tc_hook_create(hook)
    if ret < 0 and ret != -errno.EEXIST:
        raise BpfError(-ret, f"create clsact qdisc on ifindex {ifindex} (tc)", lines)
    return ret == 0


# rtnetlink: dump the filters under one clsact hook (what `tc filter show dev X
# ingress` asks for)
_RTM_NEWTFILTER, _RTM_GETTFILTER = 44, 46
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_CLSACT_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # TC_H_MAKE(CLSACT, MIN_*)


def filter_count(ifindex: int) -> int:
    """How many filter entries (of any tool) the clsact qdisc of ``ifindex``
    holds in both directions; 0 when it has none or there is no clsact qdisc."""
    n = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sk:
        sk.settimeout(2.0)
        for seq, parent in enumerate(_CLSACT_PARENT.values(), 1):
            tcm = struct.pack("BxHiIII", socket.AF_UNSPEC, 0, ifindex, 0, parent, 0)
            sk.send(struct.pack("IHHII", 16 + len(tcm), _RTM_GETTFILTER,
                                _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + tcm)
            done = False
            while not done:
                data = sk.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    mlen, mtype, _flags, mseq, _pid = struct.unpack_from("IHHII", data, off)
                    if mlen < 16:
                        break
                    if mseq == seq:
                        if mtype == _NLMSG_ERROR:
                            err = -struct.unpack_from("i", data, off + 16)[0]
                            raise OSError(err, f"dump tc filters of ifindex {ifindex}")
                        done = done or mtype == _NLMSG_DONE
                        n += mtype == _RTM_NEWTFILTER
                    off += (mlen + 3) & ~3
    return n


def _remove_clsact_if_ours_and_empty(ifindex: int) -> None:
    """Delete the clsact qdisc of ``ifindex`` if this process created it and no
    filter (of anyone) is left on it."""
    with _created_lock:
        if ifindex not in _created:
            return
        try:
            left = filter_count(ifindex)
        except OSError as e:
            log.warning("clsact qdisc on ifindex %d kept: %s", ifindex, e)
            return
        if left:  # ours in the other direction, or another tool's
            log.debug("clsact qdisc on ifindex %d kept: %d filter entries still on it",
                      ifindex, left)
            return
        _created.discard(ifindex)
        hook = _hook(ifindex, "ingress")
        hook.attach_point = _POINTS["ingress"] | _POINTS["egress"]  # the whole qdisc
        with capture_log() as lines:
            ret = lib.bpf_tc_hook_destroy(hook)
        # ENOENT/ENODEV/EINVAL: the qdisc or the interface is already gone
        if ret < 0 and -ret not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            log.warning("removing the clsact qdisc we created on ifindex %d: %s%s",
                        ifindex, errno.errorcode.get(-ret, -ret),
                        f" ({lines[-1].strip()})" if lines else "")


def _occupied(hook: object, prio: int) -> bool:
    with capture_log():  # "no such filter" is the common answer, not a warning
        ret = lib.bpf_tc_query(hook, _opts(prio))
    return ret == 0


class TcFilter:
    def __init__(self, ifindex: int, direction: str, prio: int, name: str):
        self.ifindex = ifindex
        self.direction = direction
        self.prio = prio
        self.name = name
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        hook = _hook(self.ifindex, self.direction)
        with capture_log() as lines:
            ret = lib.bpf_tc_detach(hook, _opts(self.prio))
        # ENOENT/ENODEV: the interface or its qdisc is already gone with its netns.
        if ret < 0 and -ret not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise BpfError(-ret, f"detach tc filter {self}", lines)
        _remove_clsact_if_ours_and_empty(self.ifindex)

    def __repr__(self) -> str:
        return f"<TcFilter {self.name} ifindex={self.ifindex} {self.direction} prio={self.prio:#x}>"


def attach(prog_fd: int, ifindex: int, direction: str, name: str) -> TcFilter:
    """Attach ``prog_fd`` as a direct-action filter in the first free slot of ours."""
    hook = _hook(ifindex, direction)
    with _created_lock:
        if _ensure_clsact(hook, ifindex):
            _created.add(ifindex)
    try:
        for slot in range(PRIO_SLOTS):
            prio = PRIO_BASE + slot
            if _occupied(hook, prio):
                continue
            with capture_log() as lines:
                ret = lib.bpf_tc_attach(hook, _opts(prio, prog_fd))
            if ret == -errno.EEXIST:
                continue
            if ret < 0:
                raise BpfError(-ret, f"attach tc {direction} filter {name} on ifindex "
                               f"{ifindex}", lines)
            return TcFilter(ifindex, direction, prio, name)
        raise BpfError(errno.ENOSPC, f"attach tc filter {name}: all {PRIO_SLOTS} slots of "
                       f"ebpf-otlp are taken on ifindex {ifindex}")
    except BaseException:
        _remove_clsact_if_ours_and_empty(ifindex)  # nothing of ours went on it
        raise


def _query_prog_id(hook: object, prio: int) -> int:
    """The program id of our filter at ``prio``, or 0 when the slot is free."""
    opts = _opts(prio)
    with capture_log():
        ret = lib.bpf_tc_query(hook, opts)
    return opts.prog_id if ret == 0 else 0


def remove_stale(ifindex: int) -> int:
    """Remove filters of ours left on ``ifindex`` by an earlier run that is gone;
    returns how many. A filter whose program a live process still holds (a
    second agent on the same interface) is left alone: see :mod:`.owners`."""
    from .owners import prog_holders

    found = []
    for direction in _POINTS:
        hook = _hook(ifindex, direction)
        for slot in range(PRIO_SLOTS):
            prio = PRIO_BASE + slot
            pid = _query_prog_id(hook, prio)
            if pid:
                found.append((hook, prio, pid))
    holders = prog_holders({p for _, _, p in found})
    removed = 0
    for hook, prio, prog_id in found:
        if prog_id in holders:
            log.info("tc filter prio %#x on ifindex %d belongs to running pid(s) %s: kept",
                     prio, ifindex, sorted(holders[prog_id]))
            continue
        with capture_log():
            ret = lib.bpf_tc_detach(hook, _opts(prio))
        if ret == 0:
            removed += 1
    if removed:
        log.info("removed %d stale ebpf-otlp tc filters from ifindex %d", removed, ifindex)
    return removed
