"""deploy/otel-collector.yaml, read as the Collector's k8sattributes processor
reads it: which resources its pod_association rules would match."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG = Path(__file__).parent.parent / "deploy" / "otel-collector.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


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
    for names in associations(cfg):
        if all(resource.get(n) not in (None, "") for n in names):
            return names
    return None
