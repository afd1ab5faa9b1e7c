"""``ebpf-otlp observe``: one line per event as it happens, or one JSON object
per line (``-o json``, the OTLP attribute names) for ``jq``.

TCP and DNS events arrive as the kernel reports them (ring buffers, drained
every 50 ms). Drops and flows are counted in the kernel and drained once per
``--interval``: a drop line stands for every drop of one (reason, flow) in that
interval (``network.packet.drops`` says how many), and ``--flows`` prints the
busiest flows of each interval.

No replay (``--last``/``--since``): observe loads its own hooks when it starts,
so there is no history before that, and a buffer of what this process already
printed would only repeat it. Use ``--duration`` to stop after a while.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Callable, TextIO

import click

from .events import Event
from .session import Session

COLOURS = {"tcp": "cyan", "dns": "magenta", "drops": "red", "flows": "blue", "http": "green"}
SKIP_EVENTS = frozenset({"rtt"})  # RTT samples feed `top`; a close line carries the RTT


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}GB"


def _secs(s: float) -> str:
    if s < 0.001:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _ep(ev: Event, side: str) -> str:
    a = ev.get(f"{side}.address", "?")
    p = ev.get(f"{side}.port")
    if p is None:
        return str(a)
    return f"[{a}]:{p}" if ":" in str(a) else f"{a}:{p}"


def endpoints(ev: Event) -> str:
    if "client.address" in ev or "server.address" in ev:
        return f"{_ep(ev, 'client')} -> {_ep(ev, 'server')}"
    if "source.address" in ev:
        return f"{_ep(ev, 'source')} -> {_ep(ev, 'destination')}"
    return ev.get("network.type", "-")


def details(ev: Event) -> str:
    sig, kind = ev["signal"], ev["event"]
    parts: list[str] = []
    if sig == "tcp":
        parts.append(str(ev.get("network.tcp.handshake.role", "")))
        if kind == "open" and "network.tcp.handshake.duration" in ev:
            parts.append("handshake " + _secs(ev["network.tcp.handshake.duration"]))
        if kind == "close":
            if "network.tcp.connection.duration" in ev:
                parts.append(_secs(ev["network.tcp.connection.duration"]))
            parts.append(f"tx {_bytes(ev['network.tcp.bytes.transmit'])} "
                         f"rx {_bytes(ev['network.tcp.bytes.receive'])}")
            parts.append(f"retrans {ev['network.tcp.retransmits']}")
            if "network.tcp.rtt" in ev:
                parts.append("rtt " + _secs(ev["network.tcp.rtt"]))
        if kind == "fail":
            parts.append(str(ev["error.type"]))
        if "process.pid" in ev:
            parts.append(f"pid {ev['process.pid']} {ev.get('process.executable.name', '')}")
    elif sig == "dns":
        parts += [str(ev.get("network.transport", "")), str(ev["dns.question.type"]),
                  str(ev["dns.question.name"]),
                  str(ev.get("dns.response_code", ev.get("error.type", ""))),
                  _secs(ev["dns.lookup.duration"])]
        if "dns.answer.count" in ev:
            parts.append(f"answers {ev['dns.answer.count']}")
    elif sig == "drops":
        parts += [str(ev.get("network.transport", ev.get("network.type", ""))),
                  str(ev["network.drop.reason"]), f"x{ev['network.packet.drops']}"]
        if "network.drop.location" in ev:
            parts.append("at " + str(ev["network.drop.location"]))
        if "network.interface.name" in ev:
            parts.append("on " + str(ev["network.interface.name"]))
    elif sig == "http":
        dur = ev.get("http.server.request.duration", ev.get("http.client.request.duration"))
        parts += [str(ev.get("http.side", "")), str(ev.get("http.request.method", "")),
                  str(ev.get("url.path", ev.get("http.route", ""))),
                  str(ev.get("http.response.status_code", ev.get("error.type", "-"))),
                  _secs(dur) if dur is not None else ""]
        if "process.pid" in ev:
            parts.append(f"pid {ev['process.pid']} {ev.get('process.executable.name', '')}")
    elif sig == "flows":
        parts += [str(ev.get("network.transport", ev.get("network.type", ""))),
                  str(ev.get("network.io.direction", "")),
                  str(ev.get("network.interface.name", "")),
                  f"{_bytes(ev['network.flow.bytes.rate'])}/s",
                  f"{_bytes(ev['network.flow.bytes'])} {ev['network.flow.packets']}pkt"]
    return "  ".join(p for p in parts if p)


def line(ev: Event, colour: bool) -> str:
    t = datetime.fromtimestamp(ev["time"] / 1e9).strftime("%H:%M:%S.%f")[:-3]
    sig, kind = str(ev["signal"]), str(ev["event"])
    bad = kind == "fail" or sig == "drops" or "error.type" in ev
    head = f"{t}  {sig:<5}  {kind:<6}"
    body = f"  {endpoints(ev):<47}  {details(ev)}"
    if colour:
        head = click.style(head, fg=COLOURS.get(sig))
        if bad:
            body = click.style(body, fg="red")
    return head + body


def json_line(ev: Event) -> str:
    out = {"time": datetime.fromtimestamp(ev["time"] / 1e9).astimezone().isoformat(),
           "time_unix_nano": ev["time"]}
    out.update((k, v) for k, v in ev.items() if k != "time")
    return json.dumps(out, separators=(",", ":"))


class Printer:
    """Writes events; with ``flows_top`` keeps each interval's flows and prints the
    busiest at the interval's end."""

    def __init__(self, out: TextIO, as_json: bool, colour: bool, flows_top: int):
        self.out = out
        self.as_json = as_json
        self.colour = colour
        self.flows_top = flows_top
        self.flows: list[Event] = []
        self.printed = 0

    def __call__(self, ev: Event | None) -> None:
        if ev is None:
            self.end_interval()
            return
        if ev["event"] in SKIP_EVENTS:
            return
        if ev["signal"] == "flows":
            self.flows.append(ev)
            return
        self._write(ev)

    def _write(self, ev: Event) -> None:
        self.out.write((json_line(ev) if self.as_json else line(ev, self.colour)) + "\n")
        self.out.flush()
        self.printed += 1

    def end_interval(self) -> None:
        if not self.flows:
            return
        top = sorted(self.flows, key=lambda e: -e["network.flow.bytes"])[:self.flows_top]
        self.flows = []
        for ev in top:
            self._write(ev)


def run_observe(session: Session, as_json: bool, flows_top: int,
                duration: float | None, out: TextIO = sys.stdout,
                say: Callable[[str], None] = lambda s: click.echo(s, err=True)) -> int:
    colour = not as_json and out.isatty()
    printer = Printer(out, as_json, colour, flows_top)
    try:
        session.start()
        say(f"observing {','.join(session.signals)} (Ctrl-C to stop)")
        session.run(printer, duration)
    except BrokenPipeError:  # `observe | head`: the reader went away
        return 0
    finally:
        session.close()
    try:
        for ev in session.pending():
            printer(ev)
        printer.end_interval()
    except BrokenPipeError:
        return 0
    if session.dropped:
        say(f"{session.dropped} events not shown: the output could not keep up")
    return 0

