"""Where the SSL uprobes go (signals/http/placement.py), without a kernel.

The truth for real code is the bytes of Debian 12's libssl.so.3 (3.0.x) as
objdump lists them, the installed library when there is one, and a static
build's symbol table (which names OpenSSL's internal functions that the
shared library hides). Synthetic sequences cover what must fall back to
offset 0: unknown bytes, arguments or %rsp changed before the first emulated
instruction, wrappers whose call or result handling differ."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require

from ebpf_otlp.signals.http.placement import Elf, decode, internal_call, plan, site

# Debian 12 libssl3 3.0.x: function address -> bytes (objdump -d ranges).
SSL_READ = (0x35470, bytes.fromhex(
    "4883ec1864488b042528000000488944240831c085d2782f4889e14863d2e83dfeffff85c07e038b0424"
    "488b54240864482b14252800000075444883c41831d231c931f631ffc3e8049ffeff488d15e5d40400be"
    "4c070000488d3d42cc0400e8dca5feff31c031d2be0f010000bf14000000e8f9a3feffb8ffffffffebac"
    "e8edb0feff"))
SSL_READ_EX = (0x35500, bytes.fromhex("4883ec08e8c7fdffff31d285c00f48c24883c40831d231c931f631ffc3"))
SSL_WRITE = (0x359c0, bytes.fromhex(
    "4883ec1864488b042528000000488944240831c085d2782f4889e14863d2e8fdfbffff85c07e038b0424"
    "488b54240864482b14252800000075444883c41831d231c931f631ffc3e8b499feff488d1505cf0400be"
    "46080000488d3df2c60400e88ca0feff31c031d2be0f010000bf14000000e8a99efeffb8ffffffffebac"
    "e89dabfeff"))
SSL_WRITE_EX = (0x35a50,
                bytes.fromhex("4883ec08e887fbffff31d285c00f48c24883c40831d231c931f631ffc3"))
READ_INTERNAL = (0x352d0, bytes.fromhex("4155415455534883ec3864488b042528"))  # push %r13; ...
WRITE_INTERNAL = (0x355e0, bytes.fromhex("41564155415455534883ec3064488b04"))  # push %r14; ...
LIBSSL = {"SSL_read": SSL_READ, "SSL_read_ex": SSL_READ_EX, "SSL_write": SSL_WRITE,
          "SSL_write_ex": SSL_WRITE_EX}


def fake_elf(funcs: dict[str, tuple[int, bytes]], extra: tuple = ()) -> Elf:
    """An Elf whose one segment maps address == file offset, holding ``funcs`` (and
    ``extra`` (address, bytes) pieces that have no symbol)."""
    size = max(a + len(c) for a, c in [*funcs.values(), *extra]) + 64
    blob = bytearray(size)
    for a, c in [*funcs.values(), *extra]:
        blob[a:a + len(c)] = c
    return Elf(bytes(blob), {n: [(a, len(c))] for n, (a, c) in funcs.items()}, [(0, size, 0)])


@pytest.mark.parametrize(("name", "ex", "target"), [
    ("SSL_read", False, READ_INTERNAL[0]), ("SSL_read_ex", True, READ_INTERNAL[0]),
    ("SSL_write", False, WRITE_INTERNAL[0]), ("SSL_write_ex", True, WRITE_INTERNAL[0])])
def test_libssl_wrappers_lead_to_their_internal_function(name: str, ex: bool, target: int) -> None:
    addr, code = LIBSSL[name]
    assert site(code) is None, "the wrappers' first instruction is a single-stepped sub"
    assert addr + internal_call(code, ex) == target
    assert internal_call(code, not ex) is None, "the other result shape must not match"


SSL_SET_FD = (0x34a50, bytes.fromhex("4154 4189f4 55 4889fd 53 e8a1c2feff"))


def test_ssl_set_fd_gets_an_entry_probe_only() -> None:
    """push %r12 first: emulated at offset 0, no return probe."""
    elf = fake_elf({**LIBSSL, "SSL_set_fd": SSL_SET_FD}, (READ_INTERNAL, WRITE_INTERNAL))
    got = [(p.symbol, p.offset, p.enter, p.ret, p.emulated) for p in plan(elf)
           if p.symbol == "SSL_set_fd"]
    assert got == [("SSL_set_fd", 0, "ssl_set_fd", None, True)]
    elf = fake_elf({"SSL_set_fd": (0x100, bytes.fromhex("4883ec08 55"))})
    assert [(p.offset, p.emulated) for p in plan(elf)] == [(0, False)]


def test_internal_functions_start_with_an_emulated_push() -> None:
    for _, code in (READ_INTERNAL, WRITE_INTERNAL):
        assert site(code) == 0
        assert decode(code, 0).text.startswith("push %r1")


def test_plan_for_debian_libssl_puts_one_pair_per_direction_on_the_internal_functions() -> None:
    elf = fake_elf(LIBSSL, (READ_INTERNAL, WRITE_INTERNAL))
    got = {(p.symbol, p.offset, p.enter, p.ret, p.emulated, p.covers) for p in plan(elf)}
    assert got == {
        (None, WRITE_INTERNAL[0], "ssl_write_ex_enter", "ssl_exit_ex", True,
         ("SSL_write", "SSL_write_ex")),
        (None, READ_INTERNAL[0], "ssl_read_ex_enter", "ssl_exit_ex", True,
         ("SSL_read", "SSL_read_ex"))}
    # Asked not to relocate (or nothing readable): the four symbols at offset 0.
    assert [(p.symbol, p.offset, p.ret) for p in plan(None) if p.enter == "ssl_set_fd"] == [
        ("SSL_set_fd", 0, None)]
    for probes in (plan(elf, relocate=False),
                   [p for p in plan(None) if p.enter != "ssl_set_fd"]):
        assert sorted((p.symbol, p.offset, p.enter, p.ret, p.emulated) for p in probes) == [
            ("SSL_read", 0, "ssl_read_enter", "ssl_exit_int", False),
            ("SSL_read_ex", 0, "ssl_read_ex_enter", "ssl_exit_ex", False),
            ("SSL_write", 0, "ssl_write_enter", "ssl_exit_int", False),
            ("SSL_write_ex", 0, "ssl_write_ex_enter", "ssl_exit_ex", False)]


@pytest.mark.parametrize(("what", "code", "want"), [
    ("push first", bytes.fromhex("55 4889e5"), 0),
    ("nop first", bytes.fromhex("90 55"), 0),
    ("endbr64 then push", bytes.fromhex("f30f1efa 4155"), 4),
    ("endbr64 then call", bytes.fromhex("f30f1efa e800000000"), 4),
    ("test of an argument then jcc", bytes.fromhex("4885ff 7405"), 3),
    ("unknown first (lea)", bytes.fromhex("488d0500000000 55"), None),
    ("endbr64 then unknown (mov %rdi,%rbx)", bytes.fromhex("f30f1efa 4889fb 55"), None),
    ("rsp changed before the push", bytes.fromhex("4883ec08 55"), None),
    ("rdx cleared before the push", bytes.fromhex("31d2 55"), None),
    ("ret first", bytes.fromhex("c3"), None),
    ("empty", b"", None),
    ("truncated call", bytes.fromhex("e800"), None),
    ("truncated endbr64", bytes.fromhex("f30f1e"), None),
    ("push %rsp is not taken", bytes.fromhex("54"), None),
])
def test_site_table(what: str, code: bytes, want: int | None) -> None:
    assert site(code) == want, what


EX_OK = bytes.fromhex("4883ec08 e800010000 31d285c00f48c2 4883c408c3")
INT_OK = bytes.fromhex("4883ec18 31c0 85d2 782f 4889e1 4863d2 e800010000 85c07e038b0424 c3")


@pytest.mark.parametrize(("what", "code", "ex", "ok"), [
    ("ex wrapper", EX_OK, True, True),
    ("int wrapper", INT_OK, False, True),
    ("ex wrapper, rdx cleared before the call",
     bytes.fromhex("4883ec08 31d2 e800010000 31d285c00f48c2"), True, False),
    ("ex wrapper, result returned unchanged (no cmovs)",
     bytes.fromhex("4883ec08 e800010000 4883c408c3"), True, False),
    ("int wrapper, rcx not the stack slot it returns",
     bytes.fromhex("4883ec18 4889e1 4883ec08 e800010000 85c07e038b0424"), False, False),
    ("int wrapper without mov %rsp,%rcx",
     bytes.fromhex("4883ec18 4863d2 e800010000 85c07e038b0424"), False, False),
    ("unknown instruction before the call",
     bytes.fromhex("4883ec08 4889fb e800010000 31d285c00f48c2"), True, False),
    ("jmp before any call", bytes.fromhex("4883ec08 eb00 e800010000 31d285c00f48c2"), True,
     False),
    ("no call at all", bytes.fromhex("4883ec08 4883c408 c3"), True, False),
])
def test_internal_call_table(what: str, code: bytes, ex: bool, ok: bool) -> None:
    got = internal_call(code, ex)
    assert (got is not None) == ok, what
    if ok:
        assert got == code.index(b"\xe8") + 5 + 0x100


def test_plan_falls_back_to_offset_0_unless_every_wrapper_agrees() -> None:
    # The two read wrappers call different functions: no internal probe for reads.
    other = (0x1000, EX_OK)  # its call goes to 0x1109
    elf = fake_elf({"SSL_read": SSL_READ, "SSL_read_ex": other, "SSL_write": SSL_WRITE,
                    "SSL_write_ex": SSL_WRITE_EX}, (READ_INTERNAL, WRITE_INTERNAL,
                                                    (0x1109, b"\x55")))
    got = sorted((p.symbol or "", p.offset, p.emulated) for p in plan(elf))
    assert got == [("", WRITE_INTERNAL[0], True), ("SSL_read", 0, False),
                   ("SSL_read_ex", 0, False)]
    # The internal function starts with a single-stepped instruction: nothing gained.
    elf = fake_elf(LIBSSL, ((READ_INTERNAL[0], b"\x48\x83\xec\x08"), WRITE_INTERNAL))
    got = sorted((p.symbol or "", p.offset, p.emulated) for p in plan(elf))
    assert got == [("", WRITE_INTERNAL[0], True), ("SSL_read", 0, False),
                   ("SSL_read_ex", 0, False)]
    # endbr64 first (CET builds): the pair goes after it, where %rsp is unchanged.
    elf = fake_elf(LIBSSL, ((READ_INTERNAL[0], b"\xf3\x0f\x1e\xfa\x41\x55"), WRITE_INTERNAL))
    assert (None, READ_INTERNAL[0] + 4, True) in [(p.symbol, p.offset, p.emulated)
                                                 for p in plan(elf)]
    # A library with only SSL_read/SSL_write (OpenSSL before 1.1.1 has no _ex).
    elf = fake_elf({"SSL_read": SSL_READ, "SSL_write": SSL_WRITE},
                   (READ_INTERNAL, WRITE_INTERNAL))
    assert sorted((p.offset, p.covers) for p in plan(elf)) == [
        (READ_INTERNAL[0], ("SSL_read",)), (WRITE_INTERNAL[0], ("SSL_write",))]
    # A wrapper whose own first instruction is emulated, but whose call is not
    # provable: its pair sits on that instruction.
    elf = fake_elf({"SSL_write": (0x2000, bytes.fromhex("55 4889e5 c3"))})
    assert [(p.symbol, p.offset, p.emulated) for p in plan(elf)] == [("SSL_write", 0, True)]


def test_elf_read_rejects_what_it_cannot_read(tmp_path: Path) -> None:
    for name, data in (("empty", b""), ("text", b"hello" * 40),
                       ("truncated", Path("/bin/sh").read_bytes()[:200]
                        if Path("/bin/sh").exists() else b"\x7fELF\x02\x01" + b"\0" * 100)):
        p = tmp_path / name
        p.write_bytes(data)
        assert Elf.read(p) is None, name
    assert all(p.offset == 0 and p.symbol for p in plan(None))


def _objdump_starts(path: str, start: int, stop: int) -> set[int]:
    out = subprocess.run(["objdump", "-d", path, f"--start-address={start:#x}",
                          f"--stop-address={stop:#x}"], capture_output=True, text=True,
                         check=True).stdout
    return {int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\t", out, re.M)}


def test_installed_libssl_plan_and_instruction_boundaries() -> None:
    """On the installed libssl: every instruction the walk decodes starts where
    objdump says one does, and the plan is the emulated internal pair."""
    lib = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    require(Path(lib).exists(), "Debian libssl3 not installed")
    require(shutil.which("objdump") is not None, "objdump not installed (binutils)")
    elf = Elf.read(lib)
    probes = plan(elf)
    assert [(p.symbol, p.emulated) for p in probes] == [
        ("SSL_set_fd", True), (None, True), (None, True)], [p.describe() for p in probes]
    for name in ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"):
        addr, code = elf.func(name)
        starts = _objdump_starts(lib, addr, addr + len(code))
        at = 0
        while (insn := decode(code, at)) is not None and at < len(code):
            assert addr + at in starts, f"{name}+{at:#x} is not an instruction start"
            if insn.kind == "call":
                break
            at += insn.length
    for p in probes[1:]:
        vaddr = p.offset  # this library maps file offsets 1:1 in its text segment
        assert elf.file_offset(vaddr) == p.offset
        assert vaddr in _objdump_starts(lib, vaddr, vaddr + 8)


def test_static_build_names_the_internal_functions(tmp_path: Path) -> None:
    """A static build keeps OpenSSL's local symbols: the target found from the
    wrappers' bytes is ssl_read_internal / ssl_write_internal by name."""
    require(shutil.which("gcc") is not None, "gcc not installed")
    require(Path("/usr/lib/x86_64-linux-gnu/libssl.a").exists(),
            "static OpenSSL not installed (Debian libssl-dev)")
    exe = tmp_path / "static-tls-client"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(exe),
                    str(Path(__file__).parent / "static_tls_client.c"), "-lssl", "-lcrypto",
                    "-lpthread"], check=True, capture_output=True)
    elf = Elf.read(exe)
    want = {elf.file_offset(elf.funcs[n][0][0]) for n in ("ssl_read_internal",
                                                            "ssl_write_internal")}
    assert {p.offset for p in plan(elf) if p.symbol is None} == want
