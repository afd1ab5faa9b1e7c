"""Kernel-facing set-up of the TCP signal: which program variant the running
kernel's tracepoint layouts need, and attaching sock_ops where /sys hides
the cgroup2 mount."""

from __future__ import annotations

import logging
import os
import tempfile

from ...platform.bpfobj import Link, Program
from ...platform.mounts import MountError, mount, unmount

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

def attach_sockops(prog: Program, path: str) -> Link:
    """Attach ``prog`` to the cgroup v2 directory ``path``.

    ``ip netns exec`` (and many containers) remount /sys, hiding the host's
    cgroup2 mount while the cgroups themselves still exist. Then the root of
    our cgroup namespace is mounted on a private temporary directory just for
    the attach and unmounted right after: the link keeps the cgroup.
    """
    if path and os.path.exists(os.path.join(path, "cgroup.controllers")):
        return prog.attach_cgroup(path)
    tmp = tempfile.mkdtemp(prefix="ebpf-otlp-cg-")
    try:
        try:
            mount("cgroup2", tmp)
        except MountError as e:
            raise OSError(f"{path} missing and cgroup2 mount failed: {e}") from None
        try:
            log.info("tcp: %s not mounted here, attached sock_ops via a private cgroup2 mount",
                     path)
            return prog.attach_cgroup(tmp)
        finally:
            unmount(tmp)
    finally:
        os.rmdir(tmp)
