"""``BPF_PROG_TEST_RUN``: run a loaded program on crafted input."""

from __future__ import annotations

from dataclasses import dataclass

from .libbpf import BpfError, ffi, lib


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes
    ctx_out: bytes


def test_run(prog: object, data: bytes = b"", *, ctx: bytes | None = None, repeat: int = 1,
             data_out_size: int | None = None, ctx_out_size: int = 0) -> TestRunResult:
    """Run ``prog`` ``repeat`` times on ``data``; ``duration_ns`` is the mean per run."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    din = ffi.from_buffer(data) if data else ffi.NULL
    opts.data_in = din
    opts.data_size_in = len(data)
    out_size = data_out_size if data_out_size is not None else max(len(data) + 256, 256)
    dout = ffi.new("char[]", out_size) if out_size else ffi.NULL
    opts.data_out = dout
    opts.data_size_out = out_size
    if ctx is not None:
        cin = ffi.from_buffer(ctx)
        opts.ctx_in = cin
        opts.ctx_size_in = len(ctx)
    cout = ffi.new("char[]", ctx_out_size) if ctx_out_size else ffi.NULL
    opts.ctx_out = cout
    opts.ctx_size_out = ctx_out_size
    opts.repeat = repeat
    ret = lib.bpf_prog_test_run_opts(prog.fd, opts)
    if ret < 0:
        raise BpfError(-ret, f"test run of {getattr(prog, 'name', prog)}")
    retval = opts.retval
    if retval >= 1 << 31:  # TC_ACT_UNSPEC and friends are negative ints
        retval -= 1 << 32
    return TestRunResult(
        retval=retval, duration_ns=opts.duration,
        data_out=ffi.buffer(dout, opts.data_size_out)[:] if out_size else b"",
        ctx_out=ffi.buffer(cout, opts.ctx_size_out)[:] if ctx_out_size else b"")
