"""Drop reason names from the running kernel's BTF (``enum skb_drop_reason``).

The enum changes with every kernel release (values are renumbered, reasons
added), so names are never hard-coded: they are read at start-up, and a
kernel with new reasons just works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...platform.btf import kernel_enum

ENUM = "skb_drop_reason"
SUBSYS_ENUM = "skb_drop_reason_subsys"
PREFIXES = ("SKB_DROP_REASON_", "SKB_")
# Enumerators that bound or mask the enum rather than name a reason.
SENTINELS = frozenset({"MAX", "SUBSYS_MASK"})
SUBSYS_SHIFT = 16
UNKNOWN = "UNKNOWN"
# What drops.h records when the tracepoint has no reason field.
REASON_UNKNOWN = 0xFFFFFFFF
# A reason value no kernel reports: what the BPF filter gets for a reason
# the running kernel does not have.
NEVER = REASON_UNKNOWN - 1


def strip_name(name: str) -> str:
    """``SKB_DROP_REASON_NO_SOCKET`` -> ``NO_SOCKET``; ``SKB_CONSUMED`` -> ``CONSUMED``."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@dataclass(frozen=True)
class DropReasons:
    """The reason table of one kernel: value -> short name."""

    names: dict[int, str]
    subsystems: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_enum(cls, values: dict[int, str], subsys: dict[int, str] | None = None
                  ) -> DropReasons:
        """Build from raw enumerators as :func:`ebpf_otlp.platform.btf.kernel_enum` returns them."""
        names = {}
        for value, name in values.items():
            short = strip_name(name)
            if short not in SENTINELS:
                names[value & 0xFFFFFFFF] = short  # BTF may hand back a signed value
        subsystems = {}
        for value, name in (subsys or {}).items():
            short = name.removeprefix("SKB_DROP_REASON_SUBSYS_")
            if short not in ("NUM", "CORE"):
                subsystems[value & 0xFFFF] = short
        return cls(names, subsystems)

    @classmethod
    def from_kernel(cls) -> DropReasons:
        """The running kernel's table; empty on kernels without the enum."""
        return cls.from_enum(kernel_enum(ENUM), kernel_enum(SUBSYS_ENUM))

    def value(self, short_name: str) -> int | None:
        for v, n in self.names.items():
            if n == short_name:
                return v
        return None

    @property
    def consumed(self) -> int:
        """The value of SKB_CONSUMED, or a value never reported."""
        v = self.value("CONSUMED")
        return NEVER if v is None else v

    @property
    def not_specified(self) -> int:
        v = self.value("NOT_SPECIFIED")
        return NEVER if v is None else v

    def name(self, value: int) -> str:
        """The short name of a reason value; never raises.

        Subsystem reasons (mac80211, openvswitch: high 16 bits set) are
        named ``<SUBSYSTEM>_<code>``; values this kernel's BTF does not list
        ``UNKNOWN_<value>``; the no-reason-field marker ``UNKNOWN``.
        """
        value = int(value)
        name = self.names.get(value)
        if name is not None:
            return name
        if value == REASON_UNKNOWN:
            return UNKNOWN
        subsys = value >> SUBSYS_SHIFT
        if subsys and subsys in self.subsystems:
            return f"{self.subsystems[subsys]}_{value & 0xFFFF}"
        return f"{UNKNOWN}_{value}"
