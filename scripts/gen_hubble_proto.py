"""Generate the Hubble bridge's Python stubs from Cilium's .proto files.

    python scripts/gen_hubble_proto.py OUT_DIR

``proto/cilium/`` holds Cilium's own files (see its README for the version);
protoc (from grpcio-tools) writes ``flow/``, ``observer/`` and ``relay/``
modules into OUT_DIR. Cilium's files import each other as top-level packages
(``import "flow/flow.proto"`` -> ``from flow import flow_pb2``); inside our
package those imports are rewritten to relative ones, so the stubs live in
``ebpf_otlp.signals.hubble._proto`` without touching ``sys.path``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto" / "cilium"
FILES = ["flow/flow.proto", "relay/relay.proto", "observer/observer.proto"]
PACKAGES = ("flow", "relay", "observer")
_IMPORT = re.compile(r"^from (" + "|".join(PACKAGES) + r")(\.\w+)? import ", re.M)


def generate(out: Path) -> list[Path]:
    """Write the stubs into ``out``; returns the files written."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_hubble_proto: grpcio-tools is missing: pip install -e '.[test]'")
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", *FILES])
        if rc != 0:
            sys.exit(f"gen_hubble_proto: protoc failed ({rc})")
        written = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text(
            '"""Generated from proto/cilium by scripts/gen_hubble_proto.py; do not edit."""\n')
        written.append(out / "__init__.py")
        for src in sorted(Path(tmp).rglob("*.py")):
            rel = src.relative_to(tmp)
            text = _IMPORT.sub(lambda m: f"from ..{m.group(1)}{m.group(2) or ''} import ",
                               src.read_text())
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            init = dst.parent / "__init__.py"
            if not init.exists():
                init.write_text("")
                written.append(init)
            if not dst.exists() or dst.read_text() != text:
                dst.write_text(text)
            written.append(dst)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gen_hubble_proto.py OUT_DIR")
    generate(Path(sys.argv[1]))
