"""``ebpf-otlp doctor``: what this host supports, each hook really tried.

Hooks are tried in a forked child inside a new, empty network namespace, so
the TC and XDP attaches touch only that namespace's loopback and vanish with
it.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import traceback
from pathlib import Path

from .platform.host import cgroup2_mount

CLONE_NEWNET = 0x40000000

# hook -> (program in selftest.bpf.o, how to attach it)
HOOKS = {
    "tracepoint": "probe_tracepoint",
    "raw_tracepoint": "probe_raw_tracepoint",
    "kprobe": "probe_kprobe",
    "fentry": "probe_fentry",
    "uprobe": "probe_uprobe",
    "xdp": "probe_xdp",
    "tc": "probe_tc",
    "tcx": "probe_tc",
    "sock_ops": "probe_sockops",
    "ringbuf": "rb_produce",
}
TRACEPOINTS = {
    "tcp": ["sock/inet_sock_set_state", "tcp/tcp_retransmit_skb", "tcp/tcp_send_reset",
            "tcp/tcp_receive_reset"],
    "drops": ["skb/kfree_skb"],
}
SIGNAL_NEEDS = {
    "flows": [("tc", "xdp")],
    "tcp": [("tracepoint",)],
    "dns": [("tc",), ("ringbuf",)],
    "drops": [("tracepoint",)],
    "http": [("raw_tracepoint",), ("ringbuf",)],  # uprobes (TLS) are optional
}


def _try_hook(hook: str, prog_name: str) -> str:
    from .platform.bpfobj import BpfObject

    with BpfObject.open_packaged("selftest") as obj:
        obj.only_programs([prog_name])
        obj.load()
        prog = obj.programs[prog_name]
        if hook == "uprobe":
            prog.attach_uprobe("libc.so.6", "getpid")
        elif hook == "xdp":
            prog.attach_xdp(1)  # loopback of the private namespace
        elif hook == "tc":
            prog.attach_tc(1, "ingress")
        elif hook == "tcx":
            prog.attach_tcx(1, "ingress")
        elif hook == "sock_ops":
            prog.attach_cgroup(_cgroup2_path())
        elif hook == "ringbuf":
            r = prog.test_run(b"\0" * 64)
            if r.retval != 2:
                return f"test run returned {r.retval}"
        else:
            prog.attach()
    return "ok"


def _cgroup2_path() -> str:
    path = cgroup2_mount()
    if path is None:
        raise OSError(2, "no cgroup v2 mount")
    return path


def _probe_child(wfd: int) -> None:
    results = {}
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        results["_netns"] = f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
    else:
        os.system("ip link set lo up 2>/dev/null")
    for hook, prog in HOOKS.items():
        try:
            results[hook] = _try_hook(hook, prog)
        except Exception as e:  # report any failure as the hook's status
            first = str(e).splitlines()[0]
            results[hook] = first
    os.write(wfd, json.dumps(results).encode())


def probe_hooks() -> dict[str, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _probe_child(w)
        except Exception:
            os.write(w, json.dumps({"_error": traceback.format_exc()}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data or b"{}")


def facts() -> dict:
    out: dict = {"kernel": platform.release(), "machine": platform.machine()}
    out["btf"] = Path("/sys/kernel/btf/vmlinux").exists()
    try:
        from .platform import libbpf

        out["libbpf"] = libbpf.version()
        out["capabilities"] = sorted(libbpf.effective_caps())
    except ImportError as e:
        out["libbpf"] = None
        out["libbpf_error"] = str(e)
        return out
    from .platform.mounts import MountError, ensure_tracefs

    try:
        out["tracefs"] = ensure_tracefs()
    except MountError as e:
        out["tracefs"] = None
        out["tracefs_error"] = str(e)
    out["bpffs"] = any(line.split()[2] == "bpf" for line in
                       Path("/proc/self/mounts").read_text().splitlines())
    try:
        out["cgroup2"] = _cgroup2_path()
    except OSError:
        out["cgroup2"] = None
    base = out["tracefs"] or "/sys/kernel/tracing"
    out["tracepoints"] = {tp: Path(base, "events", tp).is_dir()
                          for tps in TRACEPOINTS.values() for tp in tps}
    return out


def assess(f: dict, hooks: dict[str, str]) -> dict[str, str]:
    """Which signals can run, with the reason when not."""
    out = {}
    for sig, needs in SIGNAL_NEEDS.items():
        missing = [" or ".join(alts) for alts in needs if not any(hooks.get(a) == "ok"
                                                                 for a in alts)]
        missing += [tp for tp in TRACEPOINTS.get(sig, []) if not f.get("tracepoints", {}).get(tp)]
        out[sig] = "yes" if not missing else "no (missing " + ", ".join(missing) + ")"
    return out


def tc_mode(hooks: dict[str, str]) -> str:
    """What ``--tc-mode auto`` attaches with here: TCX links where they work."""
    if hooks.get("tcx") == "ok":
        return "tcx"
    return "tc" if hooks.get("tc") == "ok" else "none"


def http_capture() -> str:
    """What ``--http-capture auto`` uses here (signals/http/capture.py)."""
    try:
        from .signals.http.capture import capture_mode

        return capture_mode("auto")
    except Exception as e:  # no libbpf, no BTF: the http signal cannot run anyway
        return f"unknown ({e})"


def capability_report(have: set[str] | None = None) -> dict[str, dict]:
    """Each capability the agent may use: held or not, and what needs it."""
    from . import capabilities

    have = capabilities.effective() if have is None else have
    out = {}
    for cap, why in capabilities.NEEDED_FOR.items():
        held = cap in have
        state = "yes" if held else "no"
        if not held and cap == "CAP_DAC_READ_SEARCH" and os.geteuid() == 0:
            state = "no (not needed as uid 0)"
        out[cap] = {"held": held, "state": state, "needed_for": why}
    return out


def run_doctor(as_json: bool = False) -> int:
    f = facts()
    hooks = probe_hooks() if f.get("libbpf") and os.geteuid() == 0 else {}
    signals = assess(f, hooks)
    caps = capability_report()
    report = {"host": f, "hooks": hooks, "signals": signals, "tc_mode": tc_mode(hooks),
              "http_capture": http_capture() if f.get("libbpf") else "unknown",
              "capabilities": caps}
    fatal = (not f.get("libbpf") or not f.get("btf") or os.geteuid() != 0
             or not any(v.startswith("yes") for v in signals.values()))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"kernel      {f['kernel']} ({f['machine']})")
        print(f"BTF         {'yes' if f['btf'] else 'NO (/sys/kernel/btf/vmlinux missing)'}")
        print(f"libbpf      {f.get('libbpf') or 'MISSING: ' + f.get('libbpf_error', '')}")
        if f.get("libbpf"):
            print(f"caps        {', '.join(f['capabilities']) or 'none'}")
            print(f"tracefs     {f['tracefs'] or f.get('tracefs_error')}")
            print(f"bpffs       {'mounted' if f['bpffs'] else 'not mounted (not needed)'}")
            print(f"cgroup v2   {f['cgroup2'] or 'not mounted (sock_ops RTT unavailable)'}")
            for tp, ok in f["tracepoints"].items():
                print(f"tracepoint  {tp:28s} {'yes' if ok else 'no'}")
        for cap, c in caps.items():
            print(f"capability  {cap:28s} {c['state']}: {c['needed_for']}")
        if os.geteuid() != 0:
            print("hooks       not tried: run as root")
        for hook, status in hooks.items():
            if not hook.startswith("_"):
                print(f"hook        {hook:28s} {'yes' if status == 'ok' else 'no: ' + status}")
        for sig, status in signals.items():
            print(f"signal      {sig:28s} {status}")
        if hooks:
            mode = report["tc_mode"]
            why = {"tcx": "TCX links (go away with the process)",
                   "tc": "clsact filters (no TCX here; removed at exit and at the next start)",
                   "none": "neither TCX nor clsact works"}[mode]
            print(f"tc mode     auto -> {mode}: {why}")
        cap = report["http_capture"]
        why = {"socket": "sock:sock_send_length/sock_recv_length (only socket calls pay)",
               "syscall": "every syscall's exit (no socket tracepoints: Linux < 6.3)"}
        print(f"http        --http-capture auto -> {cap}: {why.get(cap, '')}".rstrip(": "))
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(run_doctor("--json" in sys.argv))
