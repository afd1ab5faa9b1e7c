"""The Hubble stubs in the package are what grpcio-tools makes of proto/cilium now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
STUBS = ROOT / "src/ebpf_otlp/signals/hubble/_proto"


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.py"))}


def test_generated_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_hubble_proto.py"), str(tmp_path)],
                   check=True, capture_output=True)
    fresh, ours = _tree(tmp_path), _tree(STUBS)
    assert fresh, "generator wrote nothing"
    stale = sorted(k for k in fresh.keys() | ours.keys() if fresh.get(k) != ours.get(k))
    assert not stale, f"stubs differ from proto/cilium (run `make build`): {stale}"


def test_protos_keep_their_license_and_pin():
    for p in (ROOT / "proto/cilium").rglob("*.proto"):
        assert "SPDX-License-Identifier: Apache-2.0" in p.read_text().splitlines()[0], p
    assert "v1.19.4" in (ROOT / "proto/cilium/README.md").read_text()


def test_stubs_import_inside_the_package():
    from ebpf_otlp.signals.hubble._proto.observer import observer_pb2, observer_pb2_grpc

    assert observer_pb2.GetFlowsResponse.DESCRIPTOR.full_name == "observer.GetFlowsResponse"
    assert hasattr(observer_pb2_grpc, "ObserverServicer")
    assert "flow" not in sys.modules and "observer" not in sys.modules  # no top-level packages
