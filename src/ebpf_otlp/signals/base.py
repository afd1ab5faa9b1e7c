"""The contract between the agent and each signal."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

from ..platform.bpfobj import BpfObject, Program
from ..platform.ringbuf import RingBuffer

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..otlp import Exporter


class Signal(ABC):
    """A signal owns its BPF object(s), its decoders and its instruments.

    It is given the configuration and the :class:`~ebpf_otlp.otlp.Exporter`
    (the only way out: instruments, bulk histograms, spans, sums, logs).

    Lifecycle, driven by the agent: ``__init__`` (create instruments, no
    kernel work) -> ``start()`` (open, configure, load, attach) -> the poller
    thread drains ``rings()`` continuously and calls ``tick()`` after each
    poll -> once per interval, on the export thread, ``collect()`` (drain
    maps, expire state) then ``export()`` (hand batches to the exporter) ->
    ``close()`` (final drain, detach everything; idempotent), after which the
    agent exports once more.

    Ring callbacks and ``tick`` run on the poller thread, ``collect`` and
    ``export`` on the export thread: guard shared state.
    """

    name: str = ""

    def __init__(self, config: AgentConfig, exporter: Exporter):
        self.config = config
        self.exporter = exporter
        self.objects: list[BpfObject] = []
        # Listeners of decoded rows (the live views); the agent adds none.
        self.taps: list[Callable[[str, object], None]] = []

    @abstractmethod
    def start(self) -> None:
        """Open, configure, load and attach. Raise BpfError on failure."""

    def rings(self) -> list[RingBuffer]:
        return []

    def tick(self) -> None:  # noqa: B027 (optional hook)
        """Timers (e.g. DNS timeouts); called on the poller thread after each poll."""

    def collect(self) -> None:  # noqa: B027 (optional hook)
        """Drain maps and expire state; called once per export interval."""

    def export(self) -> None:  # noqa: B027 (optional hook)
        """Hand what ``collect`` gathered to the exporter's batch paths."""

    def tap(self, what: str, rows: object) -> None:
        """Hand decoded rows to the listeners (``observe``/``top``), if any: ``what``
        names the row kind, each signal documents its rows where it calls this."""
        for fn in self.taps:
            fn(what, rows)

    def bpf_objects(self) -> list[BpfObject]:
        """Every BPF object whose hooks this signal holds (shared ones included)."""
        return list(self.objects)

    def reconfigure(self, config: AgentConfig, changed: set[str]) -> bool:
        """Take a reloaded configuration in place (SIGHUP), keeping hooks and counts;
        ``changed`` names the fields that differ. False: the agent restarts the signal."""
        return False

    def add_interface(self, name: str, ifindex: int) -> None:  # noqa: B027 (optional hook)
        """Attach to an interface that appeared while running (a new ``--iface`` glob
        match, or a watched interface created again with a new index); export thread."""

    def programs(self) -> list[Program]:
        return [p for o in self.objects if o.loaded for p in o.programs.values()
                if p.autoload]

    def close(self) -> None:
        """Detach and free; a final drain belongs in the subclass, before this."""
        for obj in self.objects:
            obj.close()
        self.objects.clear()
