"""Parsed results of one run of guest_check.py (host or guest), and the table
the tier prints at the end of the pytest session."""

from __future__ import annotations

from dataclasses import dataclass, field

# Filled by the test module's fixtures, printed by conftest's terminal summary.
RUNS: dict[str, KernelRun] = {}


@dataclass
class KernelRun:
    label: str  # "host" or "guest"
    events: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    console_tail: str = ""

    def _all(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def release(self) -> str:
        for e in self.events:
            if "kernel" in e:
                return e["kernel"]
        return "?"

    @property
    def finished(self) -> bool:
        return bool(self._all("done"))

    def programs(self, obj: str | None = None) -> list[dict]:
        return [e for e in self._all("program") if obj is None or e["object"] == obj]

    def objects(self) -> list[str]:
        return sorted({e["object"] for e in self._all("program")})

    def signal(self, name: str) -> dict | None:
        return next((e for e in self._all("signal") if e["signal"] == name), None)

    def signals(self) -> list[str]:
        return [e["signal"] for e in self._all("signal")]

    def doctor_hooks(self) -> dict[str, str]:
        d = self._all("doctor")
        return d[0].get("hooks", {}) if d else {}

    def http_capture(self) -> dict:
        e = self._all("http_capture")
        d = self._all("doctor")
        return {**(e[0] if e else {}), "doctor": d[0].get("http_capture") if d else None}

    def extra(self, program: str) -> dict | None:
        return next((e for e in self._all("extra") if e.get("program") in (program, "*")), None)


# Hooks that are alternatives by kernel version: HTTP's plaintext capture
# attaches the socket tracepoints (6.3+) or the syscall exit.
ALTERNATIVES = {"raw_tracepoint/sock_send_length": "http plaintext capture",
                "raw_tracepoint/sock_recv_length": "http plaintext capture",
                "raw_tracepoint/sys_exit": "http plaintext capture"}


def hook_groups(progs: list[dict]) -> dict[str, list[dict]]:
    """Programs grouped by the hook they serve.

    Programs with the same targeted section (``tracepoint/tcp/tcp_send_reset``)
    are variants of one hook for different kernels (e.g. a ``___old`` struct
    flavour): one of them loading is enough, as the signal picks whichever
    loads. Untargeted sections (``tc``, ``xdp``, ``sockops``) are one hook per
    program: ingress and egress are both needed.
    """
    groups: dict[str, list[dict]] = {}
    for p in progs:
        key = p["section"] if "/" in p["section"] else f"{p['section']}:{p['program']}"
        key = ALTERNATIVES.get(key, key)
        groups.setdefault(key, []).append(p)
    return groups


def failed_hooks(progs: list[dict]) -> list[list[dict]]:
    """Non-optional hooks none of whose variants loaded and attached."""
    return [g for g in hook_groups([p for p in progs if not p["optional"]]).values()
            if not any(p.get("attached") for p in g)]


def _row(run: KernelRun, name: str) -> list[str]:
    progs = run.programs(name)
    core = hook_groups([p for p in progs if not p["optional"]])
    fast = [p for p in progs if p["optional"]]

    def frac_groups(key: str) -> str:
        ok = sum(any(p.get(key) for p in g) for g in core.values())
        return f"{ok}/{len(core)}" if core else "-"

    def frac(items: list[dict], key: str) -> str:
        return f"{sum(bool(p.get(key)) for p in items)}/{len(items)}" if items else "-"

    loaded, attached = frac_groups("loaded"), frac_groups("attached")
    if fast:
        loaded += f" +fast {frac(fast, 'loaded')}"
        attached += f" +fast {frac(fast, 'attached')}"
    sig = run.signal(name)
    if sig is None:
        fired = [p for p in progs if "fired" in p]
        records = (f"probes fired {sum(p['fired'] > 0 for p in fired)}/{len(fired)}"
                   if fired else "-")
        hooks = ""
    elif sig.get("status") == "absent":
        records, hooks = "signal not shipped", ""
    else:
        records = "ok" if sig.get("records_ok") else "FAIL"
        kinds: dict[str, int] = {}
        for p in sig.get("programs", []):
            kind = p.split(":", 1)[1].split("/")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        hooks = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items()))
        if not sig.get("started"):
            records = "FAIL (did not start)"
    return [name, loaded, attached, records, hooks]


def table(run: KernelRun) -> str:
    names = sorted(set(run.objects()) | set(run.signals()))
    rows = [["signal/object", "hooks loaded", "attached", "records-correct",
             "hooks used by agent"]]
    rows += [_row(run, n) for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"kernel {run.release} ({run.label})"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    failed = {id(p) for g in failed_hooks(run.programs()) for p in g}
    for p in run.programs():
        if p.get("attached"):
            continue
        kind = ("FAILED" if id(p) in failed else
                "optional fast path unavailable" if p["optional"] else
                "variant for other kernels refused")
        lines.append(f"  {kind}: {p['object']}.{p['program']} ({p['section']}): "
                     f"{p.get('error', '')[:160]}")
    for name in names:
        sig = run.signal(name)
        if sig and sig.get("status") != "absent":
            lines.append(f"  {name}: {sig.get('detail') or sig.get('error', '')[:200]}")
    hooks = run.doctor_hooks()
    if hooks:
        lines.append("  doctor: " + ", ".join(f"{h}={'yes' if v == 'ok' else 'no'}"
                                              for h, v in hooks.items() if not h.startswith("_")))
    for prog in ("reason_core", "reason_fixed"):
        e = run.extra(prog)
        if e:
            lines.append(f"  negative control {prog}: "
                         f"{'correct' if e.get('records_ok') else 'WRONG'} "
                         f"(NO_SOCKET={e.get('no_socket')}, seen {e.get('seen', e.get('error'))})")
    if run.timings:
        lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in run.timings.items()))
    return "\n".join(lines)
