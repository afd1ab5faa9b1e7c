"""The import rule of the four layers, read from the source (no import runs):
platform and otlp are leaves, signals see platform, otlp and config, and only
the CLI imports the agent."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "ebpf_otlp"

ALLOWED = {
    "platform": {"platform"},
    "otlp": {"otlp"},
    "signals": {"signals", "platform", "otlp", "config"},
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, first component under ebpf_otlp) of every import of our own code."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # "from . import x" at the top
                    target = [a.name for a in node.names][:1]
            elif node.module and node.module.split(".")[0] == "ebpf_otlp":
                target = node.module.split(".")[1:]
            else:
                continue
            out.append((node.lineno, target[0] if target else ""))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ebpf_otlp" and "." in a.name:
                    out.append((node.lineno, a.name.split(".")[1]))
    return out


def test_layers_import_only_what_they_may() -> None:
    bad = []
    files = sorted(p for p in PKG.rglob("*.py") if "bpf" not in p.relative_to(PKG).parts[:1])
    assert len(files) > 20
    for path in files:
        mod = _module(path)
        layer = mod[0] if mod else ""
        for line, target in _imports(path):
            rel = f"{path.relative_to(PKG)}:{line} imports {target}"
            if layer in ALLOWED and target not in ALLOWED[layer]:
                bad.append(rel)
            if target == "agent" and mod != ["cli"]:
                bad.append(rel + " (only cli may import agent)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_absolute_imports() -> None:
    probe = PKG / "platform" / "probe.py"  # not written: parsed from the text below
    text = "from ..otlp import exporter\nfrom . import maps\nimport ebpf_otlp.agent\n"
    assert _imports(probe, text) == [(1, "otlp"), (2, "platform"), (3, "agent")]
