"""Kernel-facing set-up of the TCP signal: which program variant the running
kernel's tracepoint layouts need, and attaching sock_ops where /sys hides
the cgroup2 mount."""

from __future__ import annotations

import logging

from .libbpf import ffi, lib

log = logging.getLogger(__name__)

# Program variants by the tracepoint record layout of the running kernel
# (bpf/tcp.bpf.c): the first whose context struct the kernel's BTF has wins.
VARIANTS = {
    "tcp_retransmit": ("trace_event_raw_tcp_retransmit_skb", "tcp_retransmit_old",
                       "trace_event_raw_tcp_event_sk_skb"),
    "tcp_send_reset": ("trace_event_raw_tcp_send_reset", "tcp_send_reset_old",
                       "trace_event_raw_tcp_event_sk_skb"),
}
# Owner attribution of passive opens: useful, not essential.
OPTIONAL = {"tcp_accept", "tcp_accept4"}
KIND_STRUCT = 4


def kernel_structs(names: set[str]) -> set[str]:
    """Which of ``names`` the running kernel's BTF defines as structs."""
    btf = lib.btf__load_vmlinux_btf()
    if btf == ffi.NULL:
        return set()
    try:
        return {n for n in names if lib.btf__find_by_name_kind(btf, n.encode(), KIND_STRUCT) >= 0}
    finally:
        lib.btf__free(btf)
