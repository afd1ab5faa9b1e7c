"""Record layouts shared with BPF: the C header in ``bpf/`` is the single
source of truth. cffi parses it; numpy dtypes are derived from cffi's view, so
Python never restates a field offset."""

from __future__ import annotations

import functools
import re
from importlib import resources

import numpy as np
from cffi import FFI

_TYPEDEFS = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef int8_t __s8; typedef int16_t __s16; typedef int32_t __s32; typedef int64_t __s64;
typedef uint16_t __be16; typedef uint32_t __be32;
"""
_PRIM = {
    "uint8_t": "u1", "uint16_t": "<u2", "uint32_t": "<u4", "uint64_t": "<u8",
    "int8_t": "i1", "int16_t": "<i2", "int32_t": "<i4", "int64_t": "<i8",
    "char": "S1", "_Bool": "u1", "unsigned char": "u1", "int": "<i4", "unsigned int": "<u4",
}


def _header_source(name: str) -> str:
    ref = resources.files("ebpf_otlp") / "bpf" / f"{name}.h"
    text = ref.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"#define\s+(\w+)\s+(\(?-?\d+[uUlL]*\)?|0x[0-9a-fA-F]+[uUlL]*)\s*$", s)
        if m:
            lines.append(f"#define {m.group(1)} {m.group(2).strip('()').rstrip('uUlL')}")
        elif not s.startswith("#") and not s.startswith("//"):
            lines.append(line)
    return "\n".join(lines)


@functools.cache
def header_ffi(name: str) -> FFI:
    """A cffi FFI that knows the structs of ``bpf/<name>.h``."""
    ffi = FFI()
    ffi.cdef(_TYPEDEFS + _header_source(name))
    return ffi


def _dtype(ffi: FFI, ctype: object) -> np.dtype:
    if ctype.kind == "primitive":
        return np.dtype(_PRIM[ctype.cname])
    if ctype.kind == "enum":
        return np.dtype("<i4")
    if ctype.kind == "array":
        return np.dtype((_dtype(ffi, ctype.item), (ctype.length,)))
    if ctype.kind == "struct":
        names, formats, offsets = [], [], []
        for fname, field in ctype.fields:
            names.append(fname)
            formats.append(_dtype(ffi, field.type))
            offsets.append(field.offset)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": ffi.sizeof(ctype)})
    raise TypeError(f"unsupported C type in record header: {ctype.cname}")


@functools.cache
def record_dtype(header: str, struct: str) -> np.dtype:
    """The numpy dtype of ``struct <struct>`` from ``bpf/<header>.h``."""
    ffi = header_ffi(header)
    return _dtype(ffi, ffi.typeof(f"struct {struct}"))


def constant(header: str, name: str) -> int:
    return getattr(header_ffi(header).dlopen(None), name)
