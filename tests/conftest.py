"""Kernel tests need root and a BPF-capable kernel. Where a facility is really
missing they skip and say which; with EBPF_OTLP_NO_SKIP=1 (set by .ci/run)
such a skip fails instead.

Run as root, the session also fails when it leaves something in the host's
own network namespace or tracefs (see hoststate.py): the host is snapshotted
at the start and compared at the end, as in CI where nothing else runs.
EBPF_OTLP_HOST_CHECK=0 turns that off for runs sharing the machine with
other test runs (their namespaces would count as ours)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import hoststate  # noqa: E402

NO_SKIP = os.environ.get("EBPF_OTLP_NO_SKIP") == "1"
HOST_CHECK = os.environ.get("EBPF_OTLP_HOST_CHECK", "1") != "0"
_HOST_BEFORE = pytest.StashKey[dict]()
_HOST_LEFT = pytest.StashKey[list]()
_FIRST_SEEN = pytest.StashKey[dict]()  # leftover line -> the test after which it appeared


def require(condition: bool, reason: str) -> None:
    """Skip (or, under EBPF_OTLP_NO_SKIP=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if NO_SKIP:
        pytest.fail(f"required facility missing: {reason}")
    pytest.skip(reason)


def pytest_sessionstart(session: pytest.Session) -> None:
    if HOST_CHECK and os.geteuid() == 0 and shutil.which("tc") and shutil.which("ip"):
        session.config.stash[_HOST_BEFORE] = hoststate.snapshot()
        session.config.stash[_FIRST_SEEN] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After each test: which leftover first appeared after which test (a few ms)."""
    result = yield
    before = item.config.stash.get(_HOST_BEFORE, None)
    if before is not None:
        seen = item.config.stash[_FIRST_SEEN]
        for line in hoststate.left_behind(before, hoststate.snapshot()):
            seen.setdefault(line, item.nodeid)
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_HOST_BEFORE, None)
    if before is None:
        return
    seen = session.config.stash[_FIRST_SEEN]
    left = [f"{line}  (first seen after {seen[line]})" if line in seen else line
            for line in hoststate.left_behind(before, hoststate.snapshot())]
    if left:
        session.config.stash[_HOST_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left = config.stash.get(_HOST_LEFT, None)
    if not left:
        return
    terminalreporter.section("host not left as found", sep="=", red=True, bold=True)
    terminalreporter.line("This session failed: the host's own namespace and tracefs differ "
                          "from the session start (tests must work in their own namespaces "
                          "and remove what they attach):", red=True)
    for line in left:
        terminalreporter.line(f"  {line}", red=True)
    terminalreporter.line("(if other test runs share this machine, their namespaces count "
                          "too: EBPF_OTLP_HOST_CHECK=0 turns this check off)")


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
