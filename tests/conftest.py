"""Kernel tests need root and a BPF-capable kernel. Where a facility is really
missing they skip and say which; with EBPF_OTLP_NO_SKIP=1 (set by .ci/run)
such a skip fails instead."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

NO_SKIP = os.environ.get("EBPF_OTLP_NO_SKIP") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip (or, under EBPF_OTLP_NO_SKIP=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if NO_SKIP:
        pytest.fail(f"required facility missing: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kernel" in item.keywords:
            item.fixturenames.insert(0, "_kernel_ok")


@pytest.fixture(scope="session")
def _kernel_ok() -> None:
    require(os.geteuid() == 0, "kernel tests need root")
    require(Path("/sys/kernel/btf/vmlinux").exists(), "kernel has no BTF (/sys/kernel/btf/vmlinux)")
    obj = Path(__file__).parent.parent / "src/ebpf_otlp/bpf/selftest.bpf.o"
    require(obj.exists(), "BPF objects not built: run `make build`")


@pytest.fixture
def topo():
    from netns import Topology

    with Topology() as t:
        yield t
