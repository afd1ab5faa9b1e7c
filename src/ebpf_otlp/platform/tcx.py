"""TCX: TC programs attached through a bpf_link (Linux 6.6+).

A TCX link lives as long as its file descriptor: it goes away with the
process, even on SIGKILL, and it never replaces another tool's program (ours
is appended after those already on the hook, and returns TC_ACT_UNSPEC =
TCX_NEXT so the ones after it still run). Legacy TC clsact filters
(:mod:`ebpf_otlp.platform.tc`) stay the fallback where the kernel has no TCX.
"""

from __future__ import annotations

import errno
import os

from .libbpf import BpfError, capture_log, ffi, lib

MODES = ("auto", "tcx", "tc")
BPF_F_BEFORE = 1 << 3  # with no relative program: first on the hook
_TYPES = {"ingress": "BPF_TCX_INGRESS", "egress": "BPF_TCX_EGRESS"}


def attach_type(direction: str) -> int:
    if direction not in _TYPES:
        raise ValueError(f"TC direction must be ingress or egress, not {direction!r}")
    return int(getattr(lib, _TYPES[direction]))


def kernel_has_tcx() -> bool:
    """The running kernel knows the TCX attach types (its BTF says so)."""
    from .btf import kernel_enum

    try:
        return "BPF_TCX_INGRESS" in kernel_enum("bpf_attach_type").values()
    except (BpfError, OSError):
        return False


def resolve(mode: str) -> str:
    """``tcx`` or ``tc`` for ``--tc-mode`` ``auto``/``tcx``/``tc``."""
    if mode not in MODES:
        raise ValueError(f"tc mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        return "tcx" if kernel_has_tcx() else "tc"
    if mode == "tcx" and not kernel_has_tcx():
        raise BpfError(errno.EOPNOTSUPP, "TCX attach: this kernel has no TCX (needs 6.6+); "
                       "use --tc-mode tc")
    return mode


class TcxLink:
    """One program on one interface's TCX hook; closing the fd detaches it."""

    def __init__(self, fd: int, ifindex: int, direction: str, name: str):
        self._fd = fd
        self.ifindex = ifindex
        self.direction = direction
        self.name = name
        self.description = f"{name} -> tcx {direction} ifindex {ifindex}"

    @property
    def fd(self) -> int:
        return self._fd

    def destroy(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<TcxLink {self.description}>"


def attach(prog_fd: int, ifindex: int, direction: str, name: str,
           first: bool = False) -> TcxLink:
    """Append ``prog_fd`` to the TCX ``direction`` hook of ``ifindex`` (or put it
    before every other program with ``first``; ebpf-otlp itself never does)."""
    opts = ffi.NULL
    if first:
        opts = ffi.new("struct bpf_link_create_opts *")
        opts.sz = ffi.sizeof("struct bpf_link_create_opts")
        opts.flags = BPF_F_BEFORE
    with capture_log() as lines:
        fd = lib.bpf_link_create(prog_fd, ifindex, attach_type(direction), opts)
    if fd < 0:
        raise BpfError(-fd, f"attach tcx {direction} {name} on ifindex {ifindex}", lines)
    return TcxLink(fd, ifindex, direction, name)


def query(ifindex: int, direction: str, max_progs: int = 64) -> list[int]:
    """Ids of the programs on the TCX hook, in the order they run (the kernel's list)."""
    ids = ffi.new("__u32[]", max_progs)
    cnt = ffi.new("__u32 *", max_progs)
    with capture_log() as lines:
        ret = lib.bpf_prog_query(ifindex, attach_type(direction), 0, ffi.NULL, ids, cnt)
    if ret < 0:
        raise BpfError(-ret, f"query tcx {direction} programs of ifindex {ifindex}", lines)
    return [int(ids[i]) for i in range(cnt[0])]
