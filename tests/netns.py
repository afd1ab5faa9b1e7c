"""Test hosts for the kernel tests (the implementation is shared with the demo)."""

from ebpf_otlp.lab import Topology, sh

__all__ = ["Topology", "sh"]
