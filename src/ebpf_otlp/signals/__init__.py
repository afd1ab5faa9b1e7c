"""One module per signal; each defines a :class:`~.base.Signal` subclass.

Imported lazily so that a broken or unsupported signal never stops the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Signal

_MODULES = {
    "flows": ("flows", "FlowsSignal"),
    "tcp": ("tcp", "TcpSignal"),
    "dns": ("dns", "DnsSignal"),
    "drops": ("drops", "DropsSignal"),
    "http": ("http", "HttpSignal"),
}


def available() -> list[str]:
    return list(_MODULES)


def load(name: str) -> type[Signal]:
    try:
        module, cls = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; known: {', '.join(_MODULES)}") from None
    return getattr(importlib.import_module(f".{module}", __name__), cls)
