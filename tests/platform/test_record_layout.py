"""The record structs Python decodes (from bpf/<x>.h via cffi) have the layout
clang gave them in each object's BTF, as bpftool reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require

from ebpf_otlp.platform.layout import header_ffi, record_dtype

BPF_DIR = Path(__file__).resolve().parents[2] / "src" / "ebpf_otlp" / "bpf"
# Each record header against the object that carries its structs: its namesake,
# and the packet object for the flow and DNS records (bpf/packet.bpf.c).
PAIRS = sorted({(p.stem, p.stem) for p in BPF_DIR.glob("*.h")
                if (BPF_DIR / f"{p.stem}.bpf.o").exists()}
               | {("flows", "packet"), ("dns", "packet")})


def _btf_structs(obj: Path) -> dict[str, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)], check=True,
                         capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t["kind"] == "STRUCT" and t.get("name")}


@pytest.mark.parametrize("header,obj", PAIRS)
def test_header_structs_match_object_btf(header: str, obj: str) -> None:
    require(shutil.which("bpftool") is not None, "bpftool is not installed")
    ffi = header_ffi(header)
    structs = ffi.list_types()[1]
    btf = _btf_structs(BPF_DIR / f"{obj}.bpf.o")
    checked = 0
    for name in structs:
        if name not in btf:
            continue  # declared for Python only, or optimised out of the object
        dt = record_dtype(header, name)
        assert btf[name]["size"] == dt.itemsize, f"sizeof(struct {name})"
        for m in btf[name]["members"]:
            assert m["bits_offset"] % 8 == 0, f"{name}.{m['name']} is a bitfield"
            assert dt.fields[m["name"]][1] == m["bits_offset"] // 8, f"{name}.{m['name']}"
        checked += 1
    assert checked, f"no struct of {header}.h found in {obj}.bpf.o's BTF"
