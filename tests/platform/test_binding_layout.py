"""Every struct declared to cffi has the size and field offsets of the
installed libbpf headers: a C probe compiled here is the independent truth."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import require

from ebpf_otlp.platform.libbpf import ffi

STRUCTS = ["bpf_object_open_opts", "bpf_uprobe_opts", "bpf_map_batch_opts",
           "bpf_test_run_opts", "bpf_tc_hook", "bpf_tc_opts", "btf_type", "btf_var_secinfo",
           "btf_enum", "bpf_link_create_opts"]


def _declared() -> dict[str, tuple[int, dict[str, int]]]:
    out = {}
    for name in STRUCTS:
        t = ffi.typeof(f"struct {name}")
        fields = {f: fld.offset for f, fld in t.fields if not f.startswith("_unused")}
        out[name] = (ffi.sizeof(t), fields)
    return out


def _probe(declared: dict) -> dict[str, tuple[int, dict[str, int]]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <bpf/libbpf.h>",
             "#include <bpf/bpf.h>", "#include <bpf/btf.h>", "int main(void) {"]
    for name, (_, fields) in declared.items():
        lines.append(f'printf("{name} . %zu\\n", sizeof(struct {name}));')
        for f in fields:
            lines.append(f'printf("{name} {f} %zu\\n", offsetof(struct {name}, {f}));')
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d, "probe.c"), Path(d, "probe")
        src.write_text("\n".join(lines))
        subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
        text = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    out: dict = {}
    for line in text.splitlines():
        name, field, value = line.split()
        size, fields = out.setdefault(name, [0, {}])
        if field == ".":
            out[name][0] = int(value)
        else:
            fields[field] = int(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_declared_structs_match_installed_headers() -> None:
    require(shutil.which("gcc") is not None, "gcc is needed to compile the layout probe")
    require(Path("/usr/include/bpf/libbpf.h").exists(), "libbpf-dev headers are not installed")
    declared = _declared()
    truth = _probe(declared)
    for name, (size, fields) in declared.items():
        assert truth[name][0] == size, f"sizeof(struct {name})"
        for f, off in fields.items():
            assert truth[name][1][f] == off, f"offsetof(struct {name}, {f})"


@pytest.mark.kernel
def test_tcx_attach_types_are_the_kernels() -> None:
    """libbpf 1.1's headers have no TCX attach types; ours are the running kernel's
    (its BTF), or the kernel has none (then --tc-mode auto picks tc)."""
    from ebpf_otlp.platform.btf import kernel_enum
    from ebpf_otlp.platform.libbpf import lib

    kernel = {name: value for value, name in kernel_enum("bpf_attach_type").items()}
    require("BPF_TCX_INGRESS" in kernel, "kernel without TCX (before 6.6)")
    assert kernel["BPF_TCX_INGRESS"] == lib.BPF_TCX_INGRESS
    assert kernel["BPF_TCX_EGRESS"] == lib.BPF_TCX_EGRESS


@pytest.mark.parametrize("name", ["bpf_tc_hook", "bpf_tc_opts", "bpf_test_run_opts",
                                  "bpf_map_batch_opts", "bpf_uprobe_opts",
                                  "bpf_object_open_opts", "bpf_link_create_opts"])
def test_opts_structs_start_with_sz(name: str) -> None:
    fields = ffi.typeof(f"struct {name}").fields
    assert fields[0][0] == "sz" and fields[0][1].offset == 0
