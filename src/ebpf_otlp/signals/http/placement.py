"""Where to put the SSL uprobes so the kernel emulates, not single-steps, the probed instruction.

A uprobe replaces one instruction with a breakpoint. The kernel then either
emulates that instruction (x86: ``nop``, ``push reg``, ``call``/``jmp``/``jcc``
with a relative target) or copies it out of line and single-steps it; on
this machine kind the second costs 10-50 times the first (``http_load``'s
"one uprobe hit" figures). A uretprobe is a uprobe at the function's entry
that swaps the return address, so it pays the same entry cost.

Debian's libssl starts ``SSL_read``/``SSL_write`` with ``sub $0x18,%rsp``
(single-stepped), and ``SSL_read_ex``/``SSL_write_ex`` with ``sub $0x8,%rsp``.
All four only check their arguments and call one internal function per
direction (``ssl_read_internal``/``ssl_write_internal`` in OpenSSL's source),
whose first instruction is a ``push``. So both probes of a direction go on
that internal function: one emulated breakpoint and the return trampoline
per SSL call.

Nothing here guesses. Instructions are decoded only from a small table of
exact encodings; anything else ends the walk, and the probe stays at the
exported symbol's offset 0 (the old placement), which is always correct.
The internal function is used for a direction only when every exported
function of that direction that exists calls the same target, passes it
its own arguments (``ssl``, ``buf``, ``num``, and the byte-count pointer:
the ``_ex`` functions' 4th argument unchanged, or for ``SSL_read``/
``SSL_write`` a stack slot whose content they return), and handles its
result in one of the two exact shapes below, so the target's (ssl, buf,
num, count pointer) -> 1 or <= 0 contract is read from the caller's code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

# Kinds of instruction. EMULATED kinds are the ones arch/x86 uprobes
# emulate instead of single-stepping.
PLAIN, PUSH, NOP, CALL, JMP, JCC, RET = "plain", "push", "nop", "call", "jmp", "jcc", "ret"
EMULATED = frozenset({PUSH, NOP, CALL, JMP, JCC})

ARG_REGS = ("rdi", "rsi", "rdx", "rcx")
_PUSH_REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")


@dataclass(frozen=True)
class Insn:
    offset: int
    length: int
    kind: str
    writes: frozenset = frozenset()  # registers written ("flags" is not tracked)
    rsp_delta: int = 0  # change of %rsp
    target: int | None = None  # CALL/JMP/JCC: offset of the target, relative to the code
    text: str = ""


def _s8(b: int) -> int:
    return b - 256 if b > 127 else b


def _s32(data: bytes, at: int) -> int:
    return struct.unpack_from("<i", data, at)[0]


def decode(code: bytes, at: int) -> Insn | None:
    """The instruction at ``code[at:]`` if it is one of the known exact encodings, else None."""
    b = code[at:at + 16]
    n = len(b)

    def fixed(pattern: bytes, kind: str, text: str, writes: tuple = (), rsp: int = 0):
        if b[:len(pattern)] == pattern:
            return Insn(at, len(pattern), kind, frozenset(writes), rsp, None, text)
        return None

    if n == 0:
        return None
    op = b[0]
    # Relative control transfers (emulated).
    if op == 0xE8 and n >= 5:
        return Insn(at, 5, CALL, frozenset({"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9",
                                             "r10", "r11"}), 0, at + 5 + _s32(b, 1),
                    "call rel32")
    if op == 0xE9 and n >= 5:
        return Insn(at, 5, JMP, frozenset(), 0, at + 5 + _s32(b, 1), "jmp rel32")
    if op == 0xEB and n >= 2:
        return Insn(at, 2, JMP, frozenset(), 0, at + 2 + _s8(b[1]), "jmp rel8")
    if 0x70 <= op <= 0x7F and n >= 2:
        return Insn(at, 2, JCC, frozenset(), 0, at + 2 + _s8(b[1]), "jcc rel8")
    if op == 0x0F and n >= 6 and 0x80 <= b[1] <= 0x8F:
        return Insn(at, 6, JCC, frozenset(), 0, at + 6 + _s32(b, 2), "jcc rel32")
    if op == 0x90:
        return Insn(at, 1, NOP, text="nop")
    if op == 0xC3:
        return Insn(at, 1, RET, text="ret")
    # push %reg (not %rsp) and push %r8..%r15 (emulated).
    if 0x50 <= op <= 0x57 and op != 0x54:
        return Insn(at, 1, PUSH, frozenset(), -8, None, f"push %{_PUSH_REGS[op - 0x50]}")
    if op == 0x41 and n >= 2 and 0x50 <= b[1] <= 0x57:
        return Insn(at, 2, PUSH, frozenset(), -8, None, f"push %r{8 + b[1] - 0x50}")
    # Prologue instructions (single-stepped when probed; here only walked over).
    if b[:3] == b"\x48\x83\xec" and n >= 4 and b[3] < 0x80:
        return Insn(at, 4, PLAIN, frozenset(), -b[3], None, f"sub ${b[3]:#x},%rsp")
    if b[:3] == b"\x48\x81\xec" and n >= 7 and _s32(b, 3) >= 0:
        return Insn(at, 7, PLAIN, frozenset(), -_s32(b, 3), None, "sub $imm32,%rsp")
    if b[:3] == b"\x48\x83\xc4" and n >= 4 and b[3] < 0x80:
        return Insn(at, 4, PLAIN, frozenset(), b[3], None, f"add ${b[3]:#x},%rsp")
    if b[:4] == b"\x48\x89\x44\x24" and n >= 5:
        return Insn(at, 5, PLAIN, frozenset(), 0, None, f"mov %rax,{b[4]:#x}(%rsp)")
    for pattern, kind, text, writes in (
        (b"\xf3\x0f\x1e\xfa", PLAIN, "endbr64", ()),
        (b"\x64\x48\x8b\x04\x25\x28\x00\x00\x00", PLAIN, "mov %fs:0x28,%rax", ("rax",)),
        (b"\x48\x89\x04\x24", PLAIN, "mov %rax,(%rsp)", ()),
        (b"\x31\xc0", PLAIN, "xor %eax,%eax", ("rax",)),
        (b"\x31\xd2", PLAIN, "xor %edx,%edx", ("rdx",)),
        (b"\x85\xc0", PLAIN, "test %eax,%eax", ()),
        (b"\x85\xd2", PLAIN, "test %edx,%edx", ()),
        (b"\x48\x85\xd2", PLAIN, "test %rdx,%rdx", ()),
        (b"\x48\x85\xf6", PLAIN, "test %rsi,%rsi", ()),
        (b"\x48\x85\xff", PLAIN, "test %rdi,%rdi", ()),
        (b"\x48\x89\xe1", PLAIN, "mov %rsp,%rcx", ("rcx",)),
        (b"\x48\x63\xd2", PLAIN, "movslq %edx,%rdx", ("rdx",)),
        (b"\x8b\x04\x24", PLAIN, "mov (%rsp),%eax", ("rax",)),
        (b"\x0f\x48\xc2", PLAIN, "cmovs %edx,%eax", ("rax",)),
    ):
        got = fixed(pattern, kind, text, writes)
        if got is not None:
            return got
    return None


def site(code: bytes, needs: tuple[str, ...] = ARG_REGS) -> int | None:
    """Offset of the first emulated instruction reached from offset 0 in a straight
    line with ``needs`` and %rsp unchanged (so entry arguments read there are the
    caller's, and a uretprobe there finds the return address at %rsp), or None."""
    at = 0
    while True:
        insn = decode(code, at)
        if insn is None:
            return None
        if insn.kind in EMULATED:
            return at
        if insn.kind == RET or insn.rsp_delta or insn.writes & set(needs):
            return None
        at += insn.length


# What an exported function does with the internal function's result, as exact
# bytes right after the call. INT: `if (ret > 0) ret = *(int *)count; return ret`
# with count = %rsp (SSL_read/SSL_write). EX: `return ret < 0 ? 0 : ret` with the
# caller's own count pointer (SSL_read_ex/SSL_write_ex).
SHAPE_INT = b"\x85\xc0\x7e\x03\x8b\x04\x24"  # test %eax,%eax; jle +3; mov (%rsp),%eax
SHAPE_EX = b"\x31\xd2\x85\xc0\x0f\x48\xc2"  # xor %edx,%edx; test %eax,%eax; cmovs %edx,%eax


def internal_call(code: bytes, ex: bool) -> int | None:
    """Offset (relative to ``code``) of the function an SSL_{read,write}[_ex] wrapper
    hands its work to, if the wrapper's bytes prove the contract; else None."""
    at, rsp = 0, 0
    state = {r: "arg" for r in ARG_REGS}  # what each argument register holds
    rcx_at_rsp = None  # %rsp offset that %rcx points to, after `mov %rsp,%rcx`
    while at < len(code):
        insn = decode(code, at)
        if insn is None or insn.kind in (RET, JMP, PUSH):
            return None
        if insn.kind == CALL:
            break
        # jcc: follow the fall-through (the argument checks branch to error paths).
        if insn.text == "mov %rsp,%rcx":
            rcx_at_rsp = rsp
            state["rcx"] = "rsp"
        elif insn.text == "movslq %edx,%rdx" and state["rdx"] == "arg":
            state["rdx"] = "sext"
        else:
            for r in insn.writes & set(ARG_REGS):
                state[r] = "clobbered"
        rsp += insn.rsp_delta
        at += insn.length
    else:
        return None
    if state["rdi"] != "arg" or state["rsi"] != "arg":
        return None
    after = code[at + 5:at + 5 + 7]
    if ex:
        if state["rdx"] != "arg" or state["rcx"] != "arg" or after != SHAPE_EX:
            return None
    else:
        if (state["rdx"] not in ("arg", "sext") or state["rcx"] != "rsp"
                or rcx_at_rsp != rsp or after != SHAPE_INT):
            return None
    return insn.target


# --- ELF ---------------------------------------------------------------------

@dataclass
class Elf:
    """The parts of an x86-64 ELF file needed to place probes: function symbols
    (name -> (address, size)) and the loadable segments (address -> file offset)."""

    data: bytes
    funcs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # vaddr, filesz, off

    @classmethod
    def read(cls, path: str | Path) -> Elf | None:
        data = Path(path).read_bytes()
        if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            return None
        (_, _, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         _) = struct.unpack_from("<16sHHIQQQIHHHHHH", data, 0)
        if machine != 62:  # EM_X86_64
            return None
        elf = cls(data)
        try:
            for i in range(phnum):
                p_type, _, p_off, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", data, phoff + i * phentsize)
                if p_type == 1:  # PT_LOAD
                    elf.segments.append((p_vaddr, p_filesz, p_off))
            sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                        for i in range(shnum)]
            for sh in sections:
                if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
                    continue
                strtab = sections[sh[6]]
                s_off, s_size = strtab[4], strtab[5]
                for at in range(sh[4], sh[4] + sh[5] - 23, 24):
                    st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from(
                        "<IBBHQQ", data, at)
                    if st_info & 0xF != 2 or st_shndx == 0 or not st_value:  # STT_FUNC, defined
                        continue
                    end = data.find(b"\0", s_off + st_name, s_off + s_size)
                    if end < 0:
                        continue
                    name = data[s_off + st_name:end].decode(errors="replace")
                    have = elf.funcs.setdefault(name, [])
                    if (st_value, st_size) not in have:
                        have.append((st_value, st_size))
        except (struct.error, IndexError):
            return None  # truncated or inconsistent headers: no plan, probes at offset 0
        return elf

    def file_offset(self, vaddr: int) -> int | None:
        for v, size, off in self.segments:
            if v <= vaddr < v + size:
                return vaddr - v + off
        return None

    def func(self, name: str) -> tuple[int, bytes] | None:
        """(address, code) of the one function called ``name``, or None."""
        have = self.funcs.get(name, [])
        if len(have) != 1:
            return None  # absent, or ambiguous
        addr, size = have[0]
        off = self.file_offset(addr)
        if off is None or size <= 0:
            return None
        return addr, self.data[off:off + size]

    def code_at(self, vaddr: int, n: int = 32) -> bytes:
        off = self.file_offset(vaddr)
        return b"" if off is None else self.data[off:off + n]


# --- the plan ------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """Attach ``enter`` and ``ret`` (programs of bpf/http.bpf.c; ``ret`` None: no return
    probe) at ``symbol`` + ``offset`` (``symbol`` None: ``offset`` is a file offset)."""

    symbol: str | None
    offset: int
    enter: str
    ret: str | None
    emulated: bool
    covers: tuple[str, ...]

    def describe(self) -> str:
        where = (f"{self.symbol}+{self.offset:#x}" if self.symbol
                 else f"internal function at file offset {self.offset:#x}")
        cost = "emulated" if self.emulated else "single-stepped"
        return f"{'/'.join(self.covers)} at {where} ({cost})"


# (direction, [(symbol, ex, entry program at the symbol, return program)]);
# at an internal function the _ex programs are used (same arguments).
DIRECTIONS = (
    ("write", (("SSL_write", False, "ssl_write_enter", "ssl_exit_int"),
               ("SSL_write_ex", True, "ssl_write_ex_enter", "ssl_exit_ex"))),
    ("read", (("SSL_read", False, "ssl_read_enter", "ssl_exit_int"),
              ("SSL_read_ex", True, "ssl_read_ex_enter", "ssl_exit_ex"))),
)
INTERNAL = {"write": ("ssl_write_ex_enter", "ssl_exit_ex"),
            "read": ("ssl_read_ex_enter", "ssl_exit_ex")}
# Entry only: ties each SSL* to its socket when the application names it.
SET_FD = ("SSL_set_fd", "ssl_set_fd")


def plan(elf: Elf | None, relocate: bool = True) -> list[Probe]:
    """The probes for one TLS library file: SSL_set_fd's entry, then per direction
    either one pair on the internal function, or one pair per exported symbol (at an
    emulated instruction before any argument or %rsp change if there is one, else at
    offset 0)."""
    out: list[Probe] = []
    if elf is None:  # not an x86-64 ELF file we can read: libbpf resolves the names
        out.append(Probe(SET_FD[0], 0, SET_FD[1], None, False, (SET_FD[0],)))
    elif SET_FD[0] in elf.funcs:
        got = elf.func(SET_FD[0])
        at = site(got[1], ("rdi", "rsi")) if relocate and got else None
        out.append(Probe(SET_FD[0], at or 0, SET_FD[1], None, at is not None, (SET_FD[0],)))
    for direction, fns in DIRECTIONS:
        if elf is None:
            out += [Probe(f[0], 0, f[2], f[3], False, (f[0],)) for f in fns]
            continue
        present = [(f, elf.func(f[0])) for f in fns if f[0] in elf.funcs]
        if relocate and present and all(got for _, got in present):
            targets = set()
            for (_, ex, _, _), (addr, code) in present:
                rel = internal_call(code, ex)
                targets.add(None if rel is None else addr + rel)
            target = targets.pop() if len(targets) == 1 else None
            off = elf.file_offset(target) if target is not None else None
            at = site(elf.code_at(target)) if off is not None else None
            if at is not None:
                enter, ret = INTERNAL[direction]
                out.append(Probe(None, off + at, enter, ret, True,
                                 tuple(f[0] for f, _ in present)))
                continue
        for (sym, _, enter, ret), got in present:
            at = site(got[1]) if relocate and got else None
            out.append(Probe(sym, at or 0, enter, ret, at is not None, (sym,)))
    return out
