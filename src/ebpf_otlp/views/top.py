"""``ebpf-otlp top``: a full-screen table refreshed every interval.

Drawn with ``rich`` (``Live`` on the alternate screen, ``Table`` sized to the
terminal): a rendering library, not an application framework. Textual would
bring an async event loop, widgets and CSS for what is one table redrawn each
second, and a dependency several times larger; rich degrades to plain text
and works over SSH in any terminal of 80x24 or more. Keys are read from the
terminal in cbreak mode by one thread.

Keys: 1-4 or Tab switch the table (flows, TCP peers, DNS names, drops), ``s``
sorts by the next numeric column, ``q`` (or Ctrl-C) quits. When the output is
not a terminal, the four tables are printed as plain text every interval.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from datetime import datetime
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table as RichTable
from rich.text import Text

from .events import Event
from .session import Session
from .tables import Table, TopState

HEADER_LINES = 5  # tabs, table title, column titles, blank line, footer


class Top:
    def __init__(self, session: Session, rows: int | None, out: TextIO = sys.stdout):
        self.session = session
        self.state = TopState()
        self.rows = rows
        self.out = out
        self.view = 0
        self.tty = out.isatty()
        self.console = Console(file=out, highlight=False) if self.tty else None
        self._lock = threading.Lock()
        self.live: Live | None = None

    # --- events (main thread) ----------------------------------------------------
    def __call__(self, ev: Event | None) -> None:
        if ev is not None:
            with self._lock:
                self.state.add(ev)
            return
        with self._lock:
            self.state.end_interval(self.session.maker.interval_s)
        self.draw()

    # --- keys (their own thread) --------------------------------------------------
    def key(self, ch: str) -> None:
        with self._lock:
            if ch in "1234":
                self.view = int(ch) - 1
            elif ch == "\t":
                self.view = (self.view + 1) % len(self.state.tables)
            elif ch == "s":
                self.current.sort += 1
            elif ch in ("q", "Q", "\x03"):
                self.session.stop.set()
                return
        self.draw()

    @property
    def current(self) -> Table:
        return self.state.tables[self.view]

    # --- drawing ------------------------------------------------------------------------
    def draw(self) -> None:
        with self._lock:
            if self.live is not None:
                self.live.update(self.screen(), refresh=True)
            elif not self.tty:
                self.out.write(self.plain())
                self.out.flush()

    def screen(self) -> Group:
        t = self.current
        width, height = self.console.size if self.console else (80, 24)
        limit = self.rows or max(1, height - HEADER_LINES)
        sort = t.sortable[t.sort % len(t.sortable)].title
        tabs = Text()
        for i, table in enumerate(self.state.tables):
            tabs.append(f" {i + 1} {table.name} ", style="reverse" if i == self.view else "")
        head = Text.assemble(tabs, f"  sort {sort} [s]  q quits  ",
                             (datetime.now().strftime("%H:%M:%S"), "bold"))
        table = RichTable(title=t.title, box=None, expand=False, pad_edge=False,
                          padding=(0, 1), header_style="bold underline")
        for c in t.shown(width):
            table.add_column(c.title, justify="right" if c.numeric else "left",
                             no_wrap=True, overflow="ellipsis",
                             min_width=max(len(c.title), c.width))
        for row in t.sorted_rows(limit, width):
            table.add_row(*row)
        foot = Text(f"signals: {','.join(self.session.signals)}  interval "
                    f"{self.state.interval_s:.1f}s  events not shown: {self.session.dropped}",
                    style="dim")
        return Group(head, table, foot)

    def plain(self) -> str:
        limit = self.rows or 10
        lines = [f"--- ebpf-otlp top {datetime.now().strftime('%H:%M:%S')} "
                 f"(interval {self.state.interval_s:.1f}s)"]
        for t in self.state.tables:
            rows = t.sorted_rows(limit)
            head = [c.title for c in t.columns]
            widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                      for i, h in enumerate(head)]
            lines.append(t.title)
            for r in [head, *rows]:
                lines.append("  ".join(v.rjust(w) if c.numeric else v.ljust(w)
                                       for v, w, c in zip(r, widths, t.columns)).rstrip())
            lines.append("")
        return "\n".join(lines) + "\n"


def _keys(top: Top, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    while not stop.is_set():
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            data = os.read(fd, 32).decode(errors="replace")
            if not data:
                return
            for ch in data:
                top.key(ch)


def run_top(session: Session, rows: int | None, duration: float | None,
            out: TextIO = sys.stdout) -> int:
    top = Top(session, rows, out)
    interactive = top.tty and sys.stdin.isatty()
    old_attrs = None
    try:
        session.start()
        if not top.tty:
            session.run(top, duration)
            return 0
        if interactive:
            old_attrs = termios.tcgetattr(sys.stdin.fileno())
            tty.setcbreak(sys.stdin.fileno())
            threading.Thread(target=_keys, args=(top, session.stop), daemon=True,
                             name="keys").start()
        with Live(top.screen(), console=top.console, screen=True, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            top.live = live
            session.run(top, duration)
            top.live = None
    finally:
        if old_attrs is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old_attrs)
        session.close()
    return 0
