"""deploy/otel-collector.yaml, read as the Collector's k8sattributes processor
reads it: which resources its pod_association rules would match."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

CONFIG = Path(__file__).parent.parent / "deploy" / "otel-collector.yaml"


@functools.lru_cache(maxsize=1)
def _parsed() -> str:
    return CONFIG.read_text()


def load() -> dict:
    return yaml.safe_load(_parsed())


def associations(cfg: dict | None = None) -> list[list[str]]:
    """Each rule as the resource attribute names it needs (all must be present)."""
    cfg = cfg or load()
    rules = cfg["processors"]["k8sattributes"]["pod_association"]
    out = []
    for rule in rules:
        names = []
        for src in rule["sources"]:
            assert src["from"] == "resource_attribute", src  # no `connection` rule
            names.append(src["name"])
        out.append(names)
    return out


def matching_rule(resource: dict, cfg: dict | None = None) -> list[str] | None:
    """The first rule the processor would associate ``resource`` by (None: no enrichment)."""
    for names in (associations(cfg) if cfg is not None else _rules()):
        if all(resource.get(n) not in (None, "") for n in names):
            return list(names)
    return None


@functools.lru_cache(maxsize=1)
def _rules() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(r) for r in associations())
