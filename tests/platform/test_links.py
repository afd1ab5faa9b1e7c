"""--iface names and globs, and the watcher that finds new and re-created interfaces
(a fake /sys/class/net: its truth is what the test wrote)."""

from __future__ import annotations

from pathlib import Path

from ebpf_otlp.platform.links import InterfaceWatcher, interfaces, is_pattern, match


def _iface(root: Path, name: str, idx: int) -> None:
    (root / name).mkdir(exist_ok=True)
    (root / name / "ifindex").write_text(f"{idx}\n")


def test_match_names_and_globs():
    present = {"lo": 1, "eth0": 2, "veth1a": 7, "veth2b": 9, "cali0": 11}
    assert match(["veth*"], present) == {"veth1a": 7, "veth2b": 9}
    assert match(["eth0", "cali?"], present) == {"eth0": 2, "cali0": 11}
    assert match(["veth[12]a"], present) == {"veth1a": 7}
    assert match(["eth*x"], present) == {}
    assert is_pattern("veth*") and not is_pattern("eth0")


def test_watcher_reports_new_recreated_and_gone(tmp_path: Path):
    _iface(tmp_path, "lo", 1)
    _iface(tmp_path, "veth1", 5)
    w = InterfaceWatcher(["veth*"], str(tmp_path))
    assert w.poll() == ({"veth1": 5}, {})
    assert w.poll() == ({}, {})
    _iface(tmp_path, "veth2", 6)
    assert w.poll() == ({"veth2": 6}, {})
    (tmp_path / "veth1" / "ifindex").unlink()
    (tmp_path / "veth1").rmdir()
    assert w.poll() == ({}, {"veth1": 5})
    _iface(tmp_path, "veth1", 12)  # created again: a new index
    _iface(tmp_path, "veth2", 13)  # re-created between two polls
    assert w.poll() == ({"veth1": 12, "veth2": 13}, {})
    (tmp_path / "junk").mkdir()  # no ifindex file: skipped, not an error
    assert interfaces(str(tmp_path)) == {"lo": 1, "veth1": 12, "veth2": 13}
