"""The export-file follower: the scripted stream written as a Hubble export
file while it is followed, across a rotation and a truncation, with garbage
lines among the events."""

from __future__ import annotations

import os
import time

import hubble_script as hs
from hubble_server import Running, append, export_line, wait_until

from ebpf_otlp.signals.hubble.mapping import Mapper
from ebpf_otlp.signals.hubble.source_file import FileFollower


def _run(path) -> Running:
    return Running(FileFollower(str(path), Mapper(), poll_s=0.02))


def test_growing_file_then_rotation(tmp_path):
    s = hs.build()
    lines = [export_line(e) for e in s.events]
    path = tmp_path / "hubble-events.log"
    append(path, lines[:6])
    with _run(path) as r:
        wait_until(lambda: r.follower.lines == 6, "the lines already there")
        # Growing, with a line written in two pieces (the writer's buffer split it).
        append(path, lines[6:12] + [lines[12][:40]])
        wait_until(lambda: r.follower.lines == 12, "the appended lines")
        append(path, [lines[12][40:]])
        wait_until(lambda: r.follower.lines == 13, "the completed line")
        # Rotation as the exporter does it: last lines into the old file, rename, new file.
        append(path, lines[13:16])
        os.rename(path, tmp_path / "hubble-events-2026.log")
        append(path, [b"this is not json\n", b'{"flow": {"verdict": "FROM_THE_FUTURE"}}\n',
                      b'{"flow": {"uuid": "n-1", "some_new_field": {"a": 1}}}\n', b"[1, 2]\n",
                      b"\xff\xfe\n"] + lines[16:])
        wait_until(lambda: r.follower.lines == len(lines) + 5, "the rotated file")
        out = r.mapper.drain()
    hs.assert_mapped(out)
    by = hs.sums_by_name(out)
    assert by["ebpf_otlp.hubble.reconnects"] == {(("reason", "rotated"),): 1}
    assert by["ebpf_otlp.hubble.malformed"] == {
        (("reason", "unknown_enum"), ("field", "drop_reason_desc")): 1,  # the script's own
        (("reason", "json"),): 2,          # not JSON; not UTF-8
        (("reason", "unknown_enum"), ("field", "json")): 1,
        (("reason", "unknown_field"),): 1,
        (("reason", "not_an_event"),): 1,  # a JSON array
        (("reason", "empty"),): 1,         # the unknown verdict was all the event had
        (("reason", "no_ip"),): 1,         # a flow with nothing but a uuid
    }
    # The two decodable odd lines are events: received and counted, not mapped.
    assert by["ebpf_otlp.events.received"] == {(("source", "hubble"),): len(lines) + 2}


def test_truncated_in_place_and_missing_file(tmp_path):
    s = hs.build()
    lines = [export_line(e) for e in s.events]
    path = tmp_path / "later.log"
    with _run(path) as r:  # the file does not exist yet: waited for
        time.sleep(0.1)
        append(path, lines[:10])
        wait_until(lambda: r.follower.lines == 10, "the file to appear")
        with open(path, "r+b") as f:  # copytruncate
            f.truncate(0)
        wait_until(lambda: r.follower.reopened == 1, "the truncation to be noticed")
        append(path, lines[10:])
        wait_until(lambda: r.follower.lines == len(lines), "the lines after truncation")
        out = r.mapper.drain()
    hs.assert_mapped(out)
    assert hs.sums_by_name(out)["ebpf_otlp.hubble.reconnects"] == {(("reason", "truncated"),): 1}
