"""deploy/otel-collector.yaml is a Collector configuration whose k8sattributes
association rules name attributes the agent emits (the end-to-end check,
against the resources the agent really sent, is in test_attribution.py)."""

from __future__ import annotations

from collector import associations, load, matching_rule

from ebpf_otlp.otlp.resources import RESOURCE_KEYS


def test_pipelines_run_k8sattributes_first_on_every_signal():
    cfg = load()
    assert "http" in cfg["receivers"]["otlp"]["protocols"]
    for kind in ("metrics", "traces", "logs"):
        p = cfg["service"]["pipelines"][kind]
        assert p["receivers"] == ["otlp"], p
        # before batch: the processor works per resource, batching would not hurt, but
        # the processor's README asks for it first
        assert p["processors"][0] == "k8sattributes", p
        assert set(p["exporters"]) <= set(cfg["exporters"]), p


def test_association_rules_use_only_what_the_agent_emits():
    cfg = load()
    metadata = set(cfg["processors"]["k8sattributes"]["extract"]["metadata"])
    for names in associations(cfg):
        for n in names:
            assert n in RESOURCE_KEYS, f"the agent never sets {n}"
            # the processor only associates by attributes it extracts itself
            assert n in metadata, n
    # the most specific first: a container's resource is matched by its container
    assert associations(cfg)[0] == ["container.id"]


def test_host_resource_matches_no_rule():
    assert matching_rule({"service.name": "ebpf-otlp", "host.name": "n1"}) is None
    assert matching_rule({"k8s.node.name": "n1"}) is None
