"""The libbpf binding and object lifecycle against the real kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from netns import sh

from ebpf_otlp.platform import tc
from ebpf_otlp.platform.bpfobj import BpfObject
from ebpf_otlp.platform.layout import record_dtype
from ebpf_otlp.platform.libbpf import BpfError
from ebpf_otlp.platform.ringbuf import RingBuffer, RingPoller

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
EVENT = record_dtype("selftest", "selftest_event")
HIT_TP, HIT_RAW_TP, HIT_UPROBE, HIT_URETPROBE, HIT_SOCKOPS = 1, 2, 5, 6, 7


def selftest(*progs: str, **rodata: int) -> BpfObject:
    obj = BpfObject.open_packaged("selftest")
    obj.only_programs(progs)
    for k, v in rodata.items():
        obj.rodata[k] = v
    return obj.load()


def hits(obj: BpfObject, what: int) -> int:
    return obj.maps["hits"].sum_u64(what)


def test_rodata_and_tracepoint_count_exactly() -> None:
    libc = ctypes.CDLL(None)
    with selftest("probe_tracepoint", target_pid=os.getpid()) as obj:
        obj.programs["probe_tracepoint"].attach()
        for _ in range(37):
            libc.getppid()
        assert hits(obj, HIT_TP) == 37
        assert obj.maps["percpu_hits"].sum_u64(HIT_TP) == 37


def test_raw_tracepoint_and_detach_on_close() -> None:
    libc = ctypes.CDLL(None)
    obj = selftest("probe_raw_tracepoint", target_pid=os.getpid())
    link = obj.programs["probe_raw_tracepoint"].attach_raw_tracepoint("sys_enter")
    libc.getppid()
    assert hits(obj, HIT_RAW_TP) >= 1
    prog_id_before = link.fd
    obj.detach_all()
    n = hits(obj, HIT_RAW_TP)
    for _ in range(10):
        libc.getppid()
    assert hits(obj, HIT_RAW_TP) == n  # detached: nothing more counted
    assert prog_id_before >= 0
    obj.close()


def test_uprobe_and_uretprobe_by_symbol() -> None:
    libc = ctypes.CDLL("libc.so.6")
    with selftest("probe_uprobe", "probe_uretprobe", target_pid=os.getpid()) as obj:
        obj.programs["probe_uprobe"].attach_uprobe("libc.so.6", "getpid")
        obj.programs["probe_uretprobe"].attach_uprobe("libc.so.6", "getpid", retprobe=True)
        for _ in range(5):
            libc.getpid()
        assert hits(obj, HIT_UPROBE) == 5
        assert hits(obj, HIT_URETPROBE) == 5


def test_uprobe_unknown_symbol_is_a_clear_error() -> None:
    with selftest("probe_uprobe") as obj, pytest.raises(BpfError) as ei:
        obj.programs["probe_uprobe"].attach_uprobe("libc.so.6", "no_such_symbol_here")
    assert "no_such_symbol_here" in str(ei.value)


def test_sock_ops_on_cgroup_v2() -> None:
    from ebpf_otlp.platform.host import cgroup2_mount

    path = cgroup2_mount()
    require(path is not None and os.path.isdir(path), "cgroup v2 is not mounted")
    with selftest("probe_sockops") as obj:
        obj.programs["probe_sockops"].attach_cgroup(path)
        srv = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        for x in (c, s, srv):
            x.close()
        assert hits(obj, HIT_SOCKOPS) > 0


SOCKOPS_HERE = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from test_platform import HIT_SOCKOPS, hits, selftest
from ebpf_otlp.platform.host import cgroup2_mount
path = cgroup2_mount()
with selftest("probe_sockops") as obj:
    obj.programs["probe_sockops"].attach_cgroup(path)
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    for x in (c, s, srv):
        x.close()
    print(path, hits(obj, HIT_SOCKOPS))
"""


@pytest.mark.parametrize("where", ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"])
def test_sock_ops_on_either_cgroup_layout(where: str) -> None:
    """Pure cgroup v2 (Debian 12's default) mounts it at /sys/fs/cgroup, the hybrid
    layout at /sys/fs/cgroup/unified: made here in a private mount namespace (a tmpfs
    over /sys/fs/cgroup, then cgroup2 where the layout puts it), so the host's mounts
    are never touched. The mount is found from the mount table and sock_ops runs."""
    script = (f"mount -t tmpfs tmpfs /sys/fs/cgroup && mkdir -p {where} && "
              f"mount -t cgroup2 cgroup2 {where} && exec \"$@\"")
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                          "sh", sys.executable, "-c", SOCKOPS_HERE, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 0, res.stderr
    path, n = res.stdout.split()
    assert path == where and int(n) > 0


def test_map_ops_and_batch_drain_with_fallback() -> None:
    with selftest("probe_tracepoint") as obj:
        m = obj.maps["hits"]
        for k in range(100):
            m.update(k, (k * 3).to_bytes(8, "little"))
        assert m.lookup(7) == (21).to_bytes(8, "little")
        assert m.delete(7) and not m.delete(7)
        assert m.lookup(7) is None
        assert sorted(int.from_bytes(k, "little") for k in m.keys()) == \
            [k for k in range(100) if k != 7]
        keys, vals = m.drain()
        got = dict(zip(keys.view("<u4")[:, 0].tolist(), vals.view("<u8")[:, 0].tolist()))
        assert got == {k: k * 3 for k in range(100) if k != 7}
        assert len(m) == 0
        for k in range(10):
            m.update(k, (k).to_bytes(8, "little"))
        m._batch_ok = False  # the path for kernels without batch ops
        keys, vals = m.drain()
        assert sorted(keys.view("<u4")[:, 0].tolist()) == list(range(10))
        assert len(m) == 0


def test_percpu_values_per_cpu_and_summed() -> None:
    with selftest("probe_tracepoint") as obj:
        m = obj.maps["percpu_hits"]
        per = np.arange(1, m.ncpus + 1, dtype="<u8")
        m.update(5, per.tobytes())
        assert m.per_cpu(m.lookup(5)).tolist() == per.tolist()
        assert m.sum_u64(5) == int(per.sum())
        keys, vals = m.drain()
        assert vals.shape == (1, 8 * m.ncpus)


def test_ring_buffer_batches_in_order_and_counts_losses() -> None:
    with selftest("rb_produce", records_per_run=4, ringbuf_wakeup_bytes=1 << 30) as obj:
        got: list[np.ndarray] = []
        rb = RingBuffer(obj.maps["test_events"], EVENT, on_batch=got.append,
                        lost_map=obj.maps["test_events_lost"])
        poller = RingPoller([rb])
        r = obj.programs["rb_produce"].test_run(b"\0" * 60, repeat=1000)
        assert r.retval == 2  # XDP_PASS
        poller.poll(0)
        seq = np.concatenate(got)["seq"]
        assert seq.tolist() == list(range(4000))
        assert obj.bss["seq"] == 4000  # the kernel's own counter, read live
        assert rb.lost() == 0
        # 1 MiB ring, 56 bytes a record: 200,000 records overflow it.
        obj.programs["rb_produce"].test_run(b"\0" * 60, repeat=50_000)
        n = poller.drain()
        assert rb.lost() > 0
        assert n + rb.lost() == 200_000
        poller.close()


def test_a_failing_consumer_loses_its_batch_counted_not_the_ring() -> None:
    with selftest("rb_produce", records_per_run=2, ringbuf_wakeup_bytes=1 << 30) as obj:
        got: list[np.ndarray] = []
        calls = [0]

        def consume(recs: np.ndarray) -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("consumer bug")
            got.append(recs)

        rb = RingBuffer(obj.maps["test_events"], EVENT, on_batch=consume)
        obj.programs["rb_produce"].test_run(b"\0" * 60, repeat=50)  # 100 records
        assert rb.drain() == 100  # no exception escapes; the ring is emptied
        assert rb.dropped["callback_failed"] == 100  # one batch, all of it
        obj.programs["rb_produce"].test_run(b"\0" * 60, repeat=10)
        assert rb.drain() == 20
        assert np.concatenate(got)["seq"].tolist() == list(range(100, 120))
        assert rb.received == 120 and obj.bss["seq"] == 120
        rb.close()


def test_ring_buffer_per_record_path() -> None:
    with selftest("rb_produce", records_per_run=3) as obj:
        seen: list[bytes] = []
        rb = RingBuffer(obj.maps["test_events"], on_record=seen.append)
        obj.programs["rb_produce"].test_run(b"\0" * 77, repeat=5)
        assert rb.drain() == 15
        recs = np.frombuffer(b"".join(seen), EVENT)
        assert recs["seq"].tolist() == list(range(15))
        assert set(recs["pkt_len"].tolist()) == {77}
        rb.close()


def test_wakeup_reaches_epoll() -> None:
    import select

    with selftest("rb_produce", records_per_run=1, ringbuf_wakeup_bytes=0) as obj:
        rb = RingBuffer(obj.maps["test_events"], EVENT, on_batch=lambda a: None)
        poller = RingPoller([rb])
        ep = select.epoll()
        ep.register(poller.fileno(), select.EPOLLIN)
        obj.programs["rb_produce"].test_run(b"\0" * 60)
        assert ep.poll(2.0), "the forced wake-up did not make the poller readable"
        assert poller.poll(0) == 1
        ep.close()
        poller.close()


def test_test_run_returns_data_and_verdict() -> None:
    with selftest("probe_xdp", "probe_tc") as obj:
        pkt = bytes(range(64))
        r = obj.programs["probe_xdp"].test_run(pkt, repeat=100)
        assert r.retval == 2 and r.data_out == pkt and r.duration_ns > 0
        r = obj.programs["probe_tc"].test_run(pkt)
        assert r.retval == 0 and r.data_out == pkt


def test_verifier_log_reaches_the_exception() -> None:
    clang = shutil.which("clang-19") or shutil.which("clang")
    require(clang is not None, "clang is needed to compile the broken test program")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "broken.bpf.o")
        subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86",
                        "-I", str(ROOT / "bpf"), "-I", str(ROOT / "vmlinux/x86"), "-c",
                        str(ROOT / "tests/bpf/broken.bpf.c"), "-o", str(out)], check=True)
        obj = BpfObject.open_file(out)
        with pytest.raises(BpfError) as ei:
            obj.load()
        obj.close()
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.EACCES
    assert "load BPF object broken" in e.operation
    text = "\n".join(e.log)
    assert "invalid access to packet" in text, text
    assert "invalid access to packet" in str(e)


LOAD_XDP = """
from ebpf_otlp.platform.bpfobj import BpfObject
from ebpf_otlp.platform.libbpf import BpfError
obj = BpfObject.open_packaged("selftest")
obj.only_programs(["probe_xdp"])
try:
    obj.load()
    print("loaded")
except BpfError as e:
    print(e.errno, str(e).splitlines()[0])
"""


def test_eperm_names_the_missing_capabilities() -> None:
    """A load without CAP_BPF/CAP_SYS_ADMIN (dropped from the bounding set, so root
    has none after exec) fails with EPERM and says which capability is missing."""
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    res = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                          sys.executable, "-c", LOAD_XDP], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    err, _, message = res.stdout.strip().partition(" ")
    assert int(err) == errno.EPERM, res.stdout
    assert "missing capability CAP_BPF" in message, message
    # With every capability (root here), the same load works: the cause was the capability.
    full = subprocess.run([sys.executable, "-c", LOAD_XDP], capture_output=True, text=True,
                          timeout=60)
    assert full.stdout.strip() == "loaded", full.stdout + full.stderr


def test_open_bad_bytes_is_a_clear_error() -> None:
    with pytest.raises(BpfError) as ei:
        BpfObject.open_bytes(b"not an ELF object", "garbage")
    assert "open BPF object garbage" in str(ei.value)


def test_rodata_rejects_unknown_names_and_writes_after_load() -> None:
    obj = BpfObject.open_packaged("selftest")
    with pytest.raises(KeyError):
        obj.rodata["no_such_var"] = 1
    obj.only_programs(["probe_xdp"])
    obj.load()
    with pytest.raises(BpfError):
        obj.rodata["target_pid"] = 1
    obj.close()


@pytest.fixture
def veth():
    name = f"eo{os.getpid() % 100000}t"
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    sh("ip", "link", "set", name, "up")
    try:
        yield name, socket.if_nametoindex(name)
    finally:
        sh("ip", "link", "del", name, check=False)


def _tc_show(dev: str) -> str:
    return "".join(sh("tc", "filter", "show", "dev", dev, d).stdout for d in ("ingress", "egress"))


def test_tc_and_xdp_attach_and_close_removes_them(veth) -> None:
    name, idx = veth
    with selftest("probe_tc", "probe_xdp") as obj:
        obj.programs["probe_tc"].attach_tc(idx, "ingress")
        obj.programs["probe_tc"].attach_tc(idx, "egress")
        obj.programs["probe_xdp"].attach_xdp(idx)
        assert _tc_show(name).count("handle 0xeb0f probe_tc") == 2
        assert "xdp" in sh("ip", "link", "show", name).stdout
    assert "bpf" not in _tc_show(name)
    assert "xdp" not in sh("ip", "link", "show", name).stdout


def test_stale_tc_filters_of_a_crashed_run_are_removed(veth) -> None:
    name, idx = veth
    with selftest("probe_tc") as obj:
        # attached behind the object's back, as if its owner had been killed
        tc.attach(obj.programs["probe_tc"].fd, idx, "ingress", "probe_tc")
    assert "probe_tc" in _tc_show(name), "netlink filters outlive their loader"
    assert tc.remove_stale(idx) == 1
    assert "bpf" not in _tc_show(name)
