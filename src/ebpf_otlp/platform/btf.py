"""Reading BTF through libbpf: data-section variables and kernel enums."""

from __future__ import annotations

from .libbpf import BpfError, ffi, lib

KIND_ENUM = 6
KIND_DATASEC = 15
KIND_ENUM64 = 19


def _kind(t: object) -> int:
    return (t.info >> 24) & 0x1F


def _vlen(t: object) -> int:
    return t.info & 0xFFFF


def _name(btf: object, off: int) -> str:
    return ffi.string(lib.btf__name_by_offset(btf, off)).decode()


def datasec_vars(btf: object, section: str) -> dict[str, tuple[int, int]]:
    """Map each variable of a data section (``.rodata``, ``.bss``) to (offset, size)."""
    tid = lib.btf__find_by_name_kind(btf, section.encode(), KIND_DATASEC)
    if tid < 0:
        return {}
    sec = lib.btf__type_by_id(btf, tid)
    infos = ffi.cast("struct btf_var_secinfo *", sec + 1)
    out = {}
    for i in range(_vlen(sec)):
        var = lib.btf__type_by_id(btf, infos[i].type)
        out[_name(btf, var.name_off)] = (infos[i].offset, infos[i].size)
    return out


def kernel_enum(name: str) -> dict[int, str]:
    """Values and names of ``enum <name>`` in the running kernel's BTF."""
    btf = lib.btf__load_vmlinux_btf()
    if btf == ffi.NULL:
        raise BpfError(ffi.errno or 2, "load vmlinux BTF (/sys/kernel/btf/vmlinux)")
    try:
        for kind in (KIND_ENUM, KIND_ENUM64):
            tid = lib.btf__find_by_name_kind(btf, name.encode(), kind)
            if tid < 0:
                continue
            t = lib.btf__type_by_id(btf, tid)
            out = {}
            signed = bool(t.info >> 31)  # kind_flag: the enum's values are signed
            if kind == KIND_ENUM:
                vals = ffi.cast("struct btf_enum *", t + 1)
                for i in range(_vlen(t)):
                    v = vals[i].val
                    out[v if signed else v & 0xFFFFFFFF] = _name(btf, vals[i].name_off)
            else:  # btf_enum64: name_off, val_lo32, val_hi32
                vals = ffi.cast("uint32_t *", t + 1)
                for i in range(_vlen(t)):
                    lo, hi = vals[3 * i + 1], vals[3 * i + 2]
                    out[lo | hi << 32] = _name(btf, vals[3 * i])
            return out
        return {}
    finally:
        lib.btf__free(btf)


KIND_STRUCT = 4
KIND_TYPEDEF = 8


def _kernel_defines(names: set[str], kind: int) -> set[str]:
    btf = lib.btf__load_vmlinux_btf()
    if btf == ffi.NULL:
        return set()
    try:
        return {n for n in names if lib.btf__find_by_name_kind(btf, n.encode(), kind) >= 0}
    finally:
        lib.btf__free(btf)


def kernel_structs(names: set[str]) -> set[str]:
    """Which of ``names`` the running kernel's BTF defines as structs."""
    return _kernel_defines(names, KIND_STRUCT)


def kernel_tracepoints(names: set[str]) -> set[str]:
    """Which of the tracepoints ``names`` (without category) the running kernel
    has, from BTF's ``btf_trace_<name>`` typedefs: no tracefs needed."""
    have = _kernel_defines({f"btf_trace_{n}" for n in names}, KIND_TYPEDEF)
    return {n for n in names if f"btf_trace_{n}" in have}
