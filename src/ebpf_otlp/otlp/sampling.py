"""Head sampling of spans, as the OpenTelemetry SDK's built-in samplers decide it,
for whole batches at once.

``OTEL_TRACES_SAMPLER`` names the sampler (``always_on``, ``always_off``,
``traceidratio``, ``parentbased_always_on`` (the SDK's default),
``parentbased_always_off``, ``parentbased_traceidratio``) and
``OTEL_TRACES_SAMPLER_ARG`` the ratio of the ``traceidratio`` ones (default
1.0). ``traceidratio`` keeps a span when the low 64 bits of its trace id,
read big-endian, are below ``ratio * 2**64``: the same trace id gives the
same decision here as in every SDK that samples by trace id ratio.
``parentbased_*`` follow the parent's sampled flag (a ``traceparent`` seen
in the request) and use the named sampler for spans without a parent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .settings import SettingsError

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")
DEFAULT_SAMPLER = "parentbased_always_on"

# parent column values
NO_PARENT, PARENT_NOT_SAMPLED, PARENT_SAMPLED = -1, 0, 1


@dataclass(frozen=True)
class Sampler:
    """One of :data:`SAMPLERS`; ``ratio`` matters for the ``traceidratio`` ones."""

    name: str = DEFAULT_SAMPLER
    ratio: float = 1.0

    @property
    def root(self) -> str:
        """The sampler used for spans without a parent."""
        return self.name.removeprefix("parentbased_")

    @property
    def parent_based(self) -> bool:
        return self.name.startswith("parentbased_")

    @property
    def keeps_all(self) -> bool:
        """Whether every span is kept whatever its parent says (no decision needed)."""
        return self.name == "always_on" or (self.name == "traceidratio" and self.ratio >= 1.0)

    def describe(self) -> str:
        return f"{self.name}({self.ratio:g})" if "traceidratio" in self.name else self.name

    def decide(self, trace_ids: np.ndarray, parent: np.ndarray) -> np.ndarray:
        """Which spans to keep: ``trace_ids`` (n, 16) uint8, ``parent`` (n,) of
        NO_PARENT / PARENT_NOT_SAMPLED / PARENT_SAMPLED. Returns a bool array."""
        n = len(parent)
        root = self.root
        if root == "always_on":
            keep = np.ones(n, bool)
        elif root == "always_off":
            keep = np.zeros(n, bool)
        else:
            keep = _by_ratio(trace_ids, self.ratio)
        if self.parent_based:
            has = parent != NO_PARENT
            keep = np.where(has, parent == PARENT_SAMPLED, keep)
        return keep

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Sampler:
        """The sampler ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` name
        (unset: the SDK's default); raises :class:`SettingsError` on a bad value."""
        name = (env.get("OTEL_TRACES_SAMPLER") or "").strip().lower() or DEFAULT_SAMPLER
        if name not in SAMPLERS:
            raise SettingsError(f"OTEL_TRACES_SAMPLER={name!r}: one of {', '.join(SAMPLERS)}")
        ratio = 1.0
        raw = (env.get("OTEL_TRACES_SAMPLER_ARG") or "").strip()
        if "traceidratio" in name and raw:
            ratio = parse_ratio(raw, "OTEL_TRACES_SAMPLER_ARG")
        return cls(name, ratio)


def parse_ratio(raw: str | float, source: str) -> float:
    """A sampling ratio within [0, 1]; raises :class:`SettingsError` otherwise."""
    try:
        v = float(raw)
    except ValueError:
        raise SettingsError(f"{source}={raw!r}: expected a ratio within 0..1") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise SettingsError(f"{source}={raw!r}: expected a ratio within 0..1")
    return v


def _by_ratio(trace_ids: np.ndarray, ratio: float) -> np.ndarray:
    n = len(trace_ids)
    if ratio >= 1.0:
        return np.ones(n, bool)
    if ratio <= 0.0:
        return np.zeros(n, bool)
    bound = round(ratio * 2 ** 64)  # as the SDKs' TraceIdRatioBased computes it
    if bound >= 2 ** 64:
        return np.ones(n, bool)
    low = np.ascontiguousarray(trace_ids[:, 8:16]).view(">u8").ravel()
    return low < np.uint64(bound)


__all__ = ["DEFAULT_SAMPLER", "NO_PARENT", "PARENT_NOT_SAMPLED", "PARENT_SAMPLED", "SAMPLERS",
           "Sampler", "parse_ratio"]
