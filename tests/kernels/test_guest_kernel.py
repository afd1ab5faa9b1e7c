"""Portability tier: the same compiled objects on this kernel and on Debian 12's
6.1 cloud kernel booted under QEMU.

Both runs execute guest_check.py: every program of every packaged object is
loaded and attached on its own, each signal runs through the project's own
agent and receiver while a scenario makes traffic whose truth it knows, and
the tier's negative control (an object reading a tracepoint field at a
hard-coded offset) must come out wrong on the second kernel. The per-kernel
table is printed at the end of the session.

Time: about 20 s on the host and about a minute in the guest (TCG, no KVM);
the kernel package is fetched once into tests/kernels/cache/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guest_check  # noqa: E402
import guestvm  # noqa: E402
import results  # noqa: E402
from conftest import require  # noqa: E402  (tests/conftest.py, on sys.path)

pytestmark = pytest.mark.kernel

OBJECTS = sorted(p.name.split(".")[0] for p in (guestvm.ROOT / "src/ebpf_otlp/bpf").glob("*.bpf.o"))
HOST_TIMEOUT_S = 240
GUEST_TIMEOUT_S = 300


class _TablePrinter:
    """Prints the per-kernel tables in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not results.RUNS:
            return
        terminalreporter.section("portability: per kernel, per signal")
        for label in ("host", "guest"):
            run = results.RUNS.get(label)
            if run is not None:
                terminalreporter.write_line(results.table(run))


@pytest.fixture(scope="module", autouse=True)
def _print_table(request: pytest.FixtureRequest) -> None:
    pm = request.config.pluginmanager
    if not pm.has_plugin("ebpf-otlp-portability-table"):
        pm.register(_TablePrinter(), "ebpf-otlp-portability-table")


@pytest.fixture(scope="module")
def extra_dir() -> Path:
    require(shutil.which("clang-19") is not None or shutil.which("clang") is not None,
            "clang is needed to build the tier's negative-control object")
    out = guestvm.CACHE / "extra"
    guestvm.build_nonportable(out)
    return out


@pytest.fixture(scope="module")
def host_run(extra_dir: Path) -> results.KernelRun:
    require(shutil.which("unshare") is not None, "unshare (util-linux) is missing")
    env = dict(os.environ, PYTHONPATH=str(guestvm.ROOT / "src"), PYTHONDONTWRITEBYTECODE="1")
    import time

    t0 = time.monotonic()
    # A private network namespace: TC/XDP on its own loopback, and port 53 free.
    r = subprocess.run(["unshare", "--net", sys.executable, str(HERE / "guest_check.py"),
                        "--extra", str(extra_dir)], capture_output=True, text=True, env=env,
                       timeout=HOST_TIMEOUT_S)
    run = results.KernelRun("host", guestvm.parse_events(r.stdout),
                            {"check": time.monotonic() - t0},
                            console_tail=(r.stdout + r.stderr)[-4000:])
    results.RUNS["host"] = run
    return run


@pytest.fixture(scope="module")
def guest_run(extra_dir: Path) -> results.KernelRun:
    missing = guestvm.missing_tools()
    require(not missing, "portability tier needs " + ", ".join(missing))
    try:
        g = guestvm.boot(["--extra", "/src/extra"],
                         extra_objects={p.name: p.read_bytes() for p in extra_dir.glob("*.o")},
                         timeout_s=GUEST_TIMEOUT_S)
    except guestvm.Unavailable as e:
        require(False, f"second kernel unavailable: {e}")
        raise
    run = results.KernelRun("guest", g.events, g.timings.steps, console_tail=g.console[-6000:])
    results.RUNS["guest"] = run
    return run


def _finished(run: results.KernelRun) -> None:
    assert run.finished, f"the check did not finish on {run.label}:\n{run.console_tail}"


def _objects_ok(run: results.KernelRun, obj: str) -> None:
    _finished(run)
    progs = run.programs(obj)
    require(obj in run.objects(), f"{obj}.bpf.o was not built when the {run.label} check ran")
    bad = [f"{p['program']} ({p['section']}): loaded={p['loaded']} attached={p['attached']} "
           f"{p.get('error', '')}\n    " + "\n    ".join(p.get("log", [])[-12:])
           for group in results.failed_hooks(progs) for p in group]
    assert not bad, f"on {run.release} ({run.label}):\n" + "\n".join(bad)
    unfired = [p["program"] for p in progs if not p["optional"] and p.get("fired") == 0]
    assert not unfired, f"attached but never ran on {run.release}: {unfired}"


def _signal_ok(run: results.KernelRun, name: str) -> None:
    _finished(run)
    sig = run.signal(name)
    assert sig is not None, f"no result for signal {name} on {run.label}"
    require(sig.get("status") != "absent", f"signal {name} is not shipped ({sig.get('detail')})")
    assert sig["started"], (f"signal {name} did not start on {run.release} ({run.label}): "
                            f"{sig.get('error')}")
    assert sig["records_ok"], (f"signal {name} on {run.release} ({run.label}): "
                               f"{sig.get('detail') or sig.get('error')}")


# --- host (this kernel, natively) --------------------------------------------------------

@pytest.mark.parametrize("obj", OBJECTS)
def test_host_objects_load_and_attach(host_run: results.KernelRun, obj: str) -> None:
    _objects_ok(host_run, obj)


@pytest.mark.parametrize("name", guest_check.SIGNALS)
def test_host_signal_records(host_run: results.KernelRun, name: str) -> None:
    _signal_ok(host_run, name)


# --- guest (Debian 12's 6.1 under QEMU) --------------------------------------------------

def test_guest_booted_and_ran(guest_run: results.KernelRun) -> None:
    _finished(guest_run)
    assert guest_run.release.startswith("6.1."), guest_run.release


@pytest.mark.parametrize("obj", OBJECTS)
def test_guest_objects_load_and_attach(guest_run: results.KernelRun, obj: str) -> None:
    _objects_ok(guest_run, obj)


@pytest.mark.parametrize("name", guest_check.SIGNALS)
def test_guest_signal_records(guest_run: results.KernelRun, name: str) -> None:
    _signal_ok(guest_run, name)


def test_guest_fast_paths(guest_run: results.KernelRun) -> None:
    """6.1 has kprobes and fentry: every optional variant a signal ships loads,
    attaches and (for the self-test probes) fires there."""
    _finished(guest_run)
    fast = [p for p in guest_run.programs() if p["optional"]]
    assert fast, "no kprobe/fentry program in any object"
    bad = [f"{p['object']}.{p['program']}: {p.get('error', '')}" for p in fast
           if not p["attached"] or p.get("fired") == 0]
    assert not bad, "fast paths failing on 6.1:\n" + "\n".join(bad)
    fired = {p["program"] for p in fast if p.get("fired")}
    assert {"probe_kprobe", "probe_fentry"} <= fired


@pytest.mark.parametrize("name", guest_check.SIGNALS)
def test_agent_picks_fast_paths_where_they_exist(host_run: results.KernelRun,
                                                 guest_run: results.KernelRun,
                                                 name: str) -> None:
    """A signal that ships kprobe/fentry variants runs them on 6.1 (where they
    loaded) and its tracepoint/TC path on the host (where they cannot)."""
    for run in (host_run, guest_run):
        _finished(run)
    fast = {p["program"] for p in guest_run.programs(name) if p["optional"] and p["attached"]}
    if not fast:
        return  # this signal ships no fast path (yet): nothing to choose
    for run, want in ((guest_run, True), (host_run, False)):
        sig = run.signal(name) or {}
        used = {p.split(":", 1)[0] for p in sig.get("programs", [])}
        assert bool(used & fast) == want, (
            f"{name} on {run.label}: agent used {sorted(used)}, fast variants {sorted(fast)}")


def test_http_capture_mode_by_kernel(host_run: results.KernelRun,
                                     guest_run: results.KernelRun) -> None:
    """HTTP's plaintext capture: the socket tracepoints on the host (6.18), the
    syscall exit on 6.1, which has no sock:sock_send_length (both gave the
    scenario's spans: test_*_signal_records)."""
    for run, want, other in ((host_run, "http_sock_send", "http_sys_exit"),
                             (guest_run, "http_sys_exit", "http_sock_send")):
        _finished(run)
        used = {p.split(":", 1)[0] for p in (run.signal("http") or {}).get("programs", [])}
        assert want in used and other not in used, f"http on {run.label}: {sorted(used)}"
    # --http-capture: auto resolves per kernel; socket is refused, with the reason, on 6.1
    host = host_run.http_capture()
    assert (host.get("auto"), host.get("socket"), host["doctor"]) == ("socket",) * 3, host
    guest = guest_run.http_capture()
    assert (guest.get("auto"), guest["doctor"]) == ("syscall", "syscall"), guest
    assert "error: --http-capture socket" in guest.get("socket", "") and "6.3" in guest["socket"], \
        guest


def test_doctor_agrees_with_measurement(host_run: results.KernelRun,
                                        guest_run: results.KernelRun) -> None:
    """``ebpf-otlp doctor`` reports kprobe and fentry as the loads measured them:
    available on 6.1, and on the host exactly as available as they really are
    (unavailable on this machine kind)."""
    for run in (host_run, guest_run):
        _finished(run)
        hooks = run.doctor_hooks()
        assert hooks, f"doctor gave no hooks on {run.label}"
        measured = {p["program"]: p["attached"] for p in run.programs("selftest")}
        for hook, prog in (("kprobe", "probe_kprobe"), ("fentry", "probe_fentry")):
            assert (hooks.get(hook) == "ok") == measured[prog], (
                f"{run.label}: doctor says {hook}={hooks.get(hook)!r}, "
                f"the load measured attached={measured[prog]}")
    assert guest_run.doctor_hooks().get("kprobe") == "ok"
    assert guest_run.doctor_hooks().get("fentry") == "ok"


def test_nonportable_object_fails_on_guest(host_run: results.KernelRun,
                                           guest_run: results.KernelRun) -> None:
    """The tier's negative control: reading kfree_skb's ``reason`` at the build
    host's offset is right on the host and wrong on 6.1; the CO-RE read is
    right on both. If this fails, the tier cannot tell portable from not."""
    for run in (host_run, guest_run):
        _finished(run)
        core = run.extra("reason_core")
        assert core and core.get("records_ok"), f"{run.label}: CO-RE read wrong: {core}"
    fixed_host = host_run.extra("reason_fixed")
    assert fixed_host and fixed_host.get("records_ok"), fixed_host
    fixed_guest = guest_run.extra("reason_fixed")
    assert fixed_guest and not fixed_guest.get("records_ok"), (
        f"the hard-coded offset read the right reason on 6.1 too: {fixed_guest}")


def test_tc_mode_is_tcx_on_the_host_and_clsact_on_6_1(host_run: results.KernelRun,
                                                      guest_run: results.KernelRun) -> None:
    """``doctor``'s TCX probe: TCX links attach on this machine's kernel (6.6+)
    and not on 6.1, where ``--tc-mode auto`` falls back to clsact filters (the
    guest's flows and DNS checks above ran that way)."""
    for run in (host_run, guest_run):
        _finished(run)
    assert host_run.doctor_hooks().get("tcx") == "ok"
    guest = guest_run.doctor_hooks()
    assert guest.get("tc") == "ok" and guest.get("tcx") not in (None, "ok"), guest
