"""The contract between the agent and each signal."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from ..platform.bpfobj import BpfObject, Program
from ..platform.ringbuf import RingBuffer

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..otlp.sdk import Telemetry


class Signal(ABC):
    """A signal owns its BPF object(s), its decoders and its instruments.

    Lifecycle, driven by the agent: ``__init__`` (create instruments, no
    kernel work) -> ``start()`` (open, configure, load, attach) -> the poller
    thread drains ``rings()`` continuously -> the export thread calls
    ``collect()`` once per interval, just before metrics are exported ->
    ``close()`` (detach everything; idempotent).

    Ring callbacks run on the poller thread and ``collect`` on the export
    thread: guard shared state.
    """

    name: str = ""

    def __init__(self, config: AgentConfig, telemetry: Telemetry):
        self.config = config
        self.telemetry = telemetry
        self.objects: list[BpfObject] = []

    @abstractmethod
    def start(self) -> None:
        """Open, configure, load and attach. Raise BpfError on failure."""

    def rings(self) -> list[RingBuffer]:
        return []

    def collect(self) -> None:  # noqa: B027 (optional hook)
        """Drain maps and expire state; called once per export interval."""

    def programs(self) -> list[Program]:
        return [p for o in self.objects if o.loaded for p in o.programs.values()
                if p.autoload]

    def close(self) -> None:
        for obj in self.objects:
            obj.close()
        self.objects.clear()
