"""SIGHUP: apply a re-read configuration to a running agent.

Signals whose settings did not change keep running untouched (their hooks,
tables and cumulative counts stay). A signal whose settings changed is asked
to take the change in place (:meth:`Signal.reconfigure`: flows attaches and
detaches interfaces this way); otherwise it is stopped (final drain and
export) and started again with the new settings. Signals added or removed
are started or stopped. The interval applies from the next export; settings
of the export itself (endpoint, headers, resource, queue size, health
address) apply at the next start, and the log says which were left.
A bad file is refused as a whole: the running configuration stays.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import fields
from typing import Protocol

from . import capabilities
from .config import AgentConfig, ConfigError
from .signals.base import Signal


class Agent(Protocol):
    """What :func:`apply` needs of the agent (only cli imports agent)."""

    config: AgentConfig
    ifindex: dict[str, int]
    signals: list[Signal]
    switched_off: dict[str, str]

    def start_signal(self, name: str, cfg: AgentConfig) -> Signal | None: ...

    def stop_signal(self, sig: Signal) -> None: ...

log = logging.getLogger(__name__)

# AgentConfig fields each signal's behaviour depends on
SIGNAL_KEYS = {
    "flows": ("ifaces", "max_flows", "flow_hook", "flow_attributes", "ringbuf_bytes"),
    "tcp": ("tcp_spans", "tcp_attributes", "cgroup_path", "ringbuf_bytes",
            "ringbuf_wakeup_bytes"),
    "dns": ("ifaces", "dns_ports", "dns_names", "dns_timeout_s", "dns_head_bytes",
            "dns_max_pending", "ringbuf_bytes", "ringbuf_wakeup_bytes"),
    "drops": ("drop_location", "drop_exclude_not_specified", "drop_logs", "max_drops",
              "ringbuf_bytes", "ringbuf_wakeup_bytes"),
}
APPLIED = {"signals", "interval_s", "config_file", "poll_interval_ms"}


def changed(old: AgentConfig, new: AgentConfig, keys: tuple[str, ...] | set[str]) -> set[str]:
    return {k for k in keys if getattr(old, k) != getattr(new, k)}


def apply(agent: Agent, new: AgentConfig) -> dict[str, str]:
    """Bring ``agent`` to ``new``; returns signal -> what happened to it.

    Raises :class:`ConfigError` (nothing changed) when ``new`` cannot run here.
    """
    old = agent.config
    if any(s in new.signals for s in ("flows", "dns")) and not new.ifaces:
        raise ConfigError("flows and dns need at least one iface")
    ifindex = {}
    for name in new.ifaces:
        try:
            ifindex[name] = socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"no such interface: {name}") from None
    try:
        capabilities.check(new)
    except capabilities.MissingCapabilities as e:
        raise ConfigError(str(e)) from None
    per_signal = {k for keys in SIGNAL_KEYS.values() for k in keys}
    left = sorted(changed(old, new, {f.name for f in fields(AgentConfig)})
                  - per_signal - APPLIED)
    if left:
        log.warning("SIGHUP: %s changed; applied at the next start", ", ".join(left))
    # export settings stay as they are; everything else follows the new file
    for k in left:
        setattr(new, k, getattr(old, k))
    done: dict[str, str] = {}
    for sig in list(agent.signals):
        if sig.name not in new.signals:
            agent.stop_signal(sig)
            done[sig.name] = "stopped"
            continue
        diff = changed(old, new, SIGNAL_KEYS.get(sig.name, ()))
        if not diff:
            sig.config = new
            done[sig.name] = "kept"
        elif sig.reconfigure(new, diff):
            done[sig.name] = "reconfigured (" + ", ".join(sorted(diff)) + ")"
        else:
            agent.stop_signal(sig)
            done[sig.name] = ("restarted (" + ", ".join(sorted(diff)) + ")"
                              if agent.start_signal(sig.name, new) else "off")
    for name in new.signals:
        if name not in done:
            done[name] = "started" if agent.start_signal(name, new) else "off"
    for name in list(agent.switched_off):
        if name not in new.signals:
            del agent.switched_off[name]
    agent.config = new
    agent.ifindex = ifindex
    return done
