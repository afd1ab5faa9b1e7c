"""HTTP agent CPU per request, replayed: real ring batches recorded once from a
live nginx + wrk run, then fed through ``HttpSignal.on_batch`` again and again.

What the live figure in bench/http_load.py mixes (ring drain, the poller, the
kernel's side, the other processes on 2 vCPUs) is left out: this is the
Python work per request of decoding records, parsing heads, pairing, the
histograms and the span encoding, on exactly the same input for the code
of this tree and for the code of a baseline commit (run in a child Python
from ``git archive`` of that commit, same machine, same run).

Used by bench/http_load.py (``record`` during its run, ``replay_cpu`` after);
``python -m bench.http_replay record FILE [tracepoints|uprobes] [close]`` /
``replay FILE`` / ``compare COMMIT FILE...`` (this tree against a commit's,
alternately) by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import PY, REPO, SRC

# The code before the per-batch rework of the HTTP signal: the baseline of
# the replay ratio.
BASELINE_COMMIT = "0dbdeac"

# Runs in a child Python with either tree on its path: loads the recording,
# builds an HttpSignal with an exporter that encodes spans (the real batch
# span path, not started) and folds histograms, replays every batch ``rounds``
# times and prints CPU seconds per round.
REPLAY = r"""
import gc, json, sys, time
import numpy as np
from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp.histogram import BatchHistogram
from ebpf_otlp.otlp.spans import SpanBatchExporter

class ReplayExporter:
    delta = True
    cardinality_limit = 100000
    def __init__(self):
        self.spans = SpanBatchExporter({"service.name": "replay"}, lambda *a: True,
                                       max_queue=1 << 30)
        self.hists = []
        self.counted = {}
    def histogram(self, name, unit, description, bounds=(1.0,)):
        h = BatchHistogram(name, unit, description, bounds, delta=True,
                           cardinality_limit=self.cardinality_limit)
        self.hists.append(h)
        return h
    def observe(self, name, unit, description, fn, kind="counter"):
        self.counted[name] = fn
    def submit_spans(self, spans):
        return self.spans.submit(spans)
    def submit_span_groups(self, *a, **k):
        return self.spans.submit_grouped(*a, **k)
    def drain(self):
        n = len(self.spans._queue)
        self.spans._queue.clear()
        self.spans.queued_bytes = 0
        measured = 0
        for h in self.hists:
            measured += sum(int(np.size(v)) for lst in h._pending.values() for v in lst)
            h._pending.clear()
        return n, measured

path, rounds = sys.argv[1], int(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
data = np.load(path)
recs, sizes = data["recs"], data["sizes"]
# the poll (one drain of the ring, then the signal's tick) each batch came in
polls = data["polls"] if "polls" in data.files else np.arange(len(sizes))
bounds = np.concatenate([[0], np.cumsum(sizes)])
from ebpf_otlp.signals.http.signal import HttpSignal
cfg = AgentConfig(attribution="none", **extra)
times, spans, measured = [], 0, 0
for r in range(rounds):
    ex = ReplayExporter()
    sig = HttpSignal(cfg, ex)
    feed = getattr(sig, "ring_batch", sig.on_batch)  # what the ring calls, as in the agent
    batches = [recs[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    ends = set(np.flatnonzero(np.diff(polls)).tolist()) | {len(sizes) - 1}
    gc.collect()
    t0 = time.process_time()
    for i, b in enumerate(batches):
        feed(b)
        if i in ends:
            sig.tick()
    times.append(time.process_time() - t0)
    spans, measured = ex.drain()
print(json.dumps({"cpu_s": times, "spans": spans, "exchanges": measured,
                  "records": int(len(recs))}))
"""


def record(url_run, which: str = "tracepoints", max_records: int = 150_000,
           head_bytes: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """Ring batches as the HTTP object delivers them while ``url_run()`` runs (wrk):
    (records, batch sizes, the poll of each batch, what ``url_run`` returned).
    ``which``: ``tracepoints`` (plaintext) or ``uprobes`` (the SSL probes on the
    system libssl). Records of other processes on the host are kept: the agent
    sees them too."""
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.ringbuf import RingBuffer
    from ebpf_otlp.signals.http.capture import capture_mode, unused_programs
    from ebpf_otlp.signals.http.signal import event_dtype
    from ebpf_otlp.signals.http.tls import PROGRAMS, TlsAttacher, system_tls_library

    obj = BpfObject.open_packaged("http")
    try:
        obj.rodata["self_tgid"] = os.getpid()
        obj.rodata["head_bytes"] = head_bytes
        obj.rodata["ringbuf_wakeup_bytes"] = 64 << 10
        obj.set_max_entries("http_events", 16 << 20)
        for name in unused_programs(capture_mode("auto")):
            obj.programs[name].autoload = False
        obj.load()
        if which == "uprobes":
            TlsAttacher(obj).attach_path(system_tls_library(), required=True)
        for p in obj.programs.values():
            if p.name not in PROGRAMS and p.autoload:
                p.attach()  # TLS records need the socket calls too (the SSL object's socket)
        saved: list[np.ndarray] = []
        polls: list[int] = []
        count = [0]
        poll = [0]

        def keep(recs: np.ndarray) -> None:
            if count[0] < max_records:
                saved.append(recs.copy())
                polls.append(poll[0])
                count[0] += len(recs)

        ring = RingBuffer(obj.maps["http_events"], event_dtype(head_bytes), on_batch=keep)
        stop = threading.Event()

        def drain() -> None:
            while not stop.wait(0.05):  # the agent's default poll interval
                ring.drain()
                poll[0] += 1

        th = threading.Thread(target=drain, daemon=True)
        th.start()
        try:
            out = url_run()
        finally:
            stop.set()
            th.join()
            ring.drain()
            ring.close()
    finally:
        obj.close()
    if not saved:
        raise RuntimeError("no HTTP records recorded")
    return (np.concatenate(saved), np.array([len(s) for s in saved], np.int64),
            np.array(polls, np.int64), out)


def save(path: Path, recs: np.ndarray, sizes: np.ndarray, polls: np.ndarray) -> None:
    np.savez(path, recs=recs, sizes=sizes, polls=polls)


def baseline_tree(work: Path, commit: str = BASELINE_COMMIT) -> Path | None:
    """``src`` of ``commit`` unpacked under ``work`` (None without git history)."""
    if not shutil.which("git") or not (REPO / ".git").exists():
        return None
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"],
                       capture_output=True)
    if r.returncode:
        return None
    dest = work / f"base-{commit}"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=r.stdout, check=True)
    return dest / "src"


def replay_cpu(path: Path, src: Path = SRC, rounds: int = 5, extra: dict | None = None) -> dict:
    """{"cpu_s": [per round], "spans": spans of the last round, "records": n} of
    replaying the recording at ``path`` with the package under ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    r = subprocess.run([PY, "-c", REPLAY, str(path), str(rounds), json.dumps(extra or {})],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"replay failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(paths: list[Path], commit: str = BASELINE_COMMIT, rounds: int = 3,
            repeats: int = 3) -> dict:
    """Per recording: ms of agent CPU per 1,000 requests (the best round) of this
    tree and of ``commit``, replayed alternately ``repeats`` times (the machine's
    load drifts), and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="eo-replay-"))
    try:
        base = baseline_tree(work, commit)
        if base is None:
            raise RuntimeError(f"no git tree of {commit}")
        out = {}
        for path in paths:
            cpu: dict[str, list[float]] = {"current": [], commit: []}
            for _ in range(repeats):
                b = replay_cpu(path, base, rounds=rounds)
                c = replay_cpu(path, rounds=rounds)
                cpu[commit] += b["cpu_s"]
                cpu["current"] += c["cpu_s"]
            requests = c["exchanges"] / 2  # a CLIENT and a SERVER exchange each
            ms = {k: round(min(v) / requests * 1e6, 2) for k, v in cpu.items()}
            out[str(path)] = {**ms, "ratio": round(ms["current"] / ms[commit], 3),
                              "requests": int(requests), "spans": c["spans"]}
            print(f"{path}: {json.dumps(out[str(path)])}", flush=True)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "compare":
        compare([Path(p) for p in argv[2:]], argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "replay":
        src = Path(argv[2]) if len(argv) > 2 else SRC
        out = replay_cpu(Path(argv[1]), src)
        print(json.dumps(out))
        return 0
    if len(argv) >= 2 and argv[0] == "record":
        sys.path.insert(0, str(REPO / "tests" / "signals" / "http"))
        from http_env import HTTP_PORT, HTTPS_PORT, Nginx
        from netns import Topology

        from .http_load import _wrk

        which = argv[2] if len(argv) > 2 else "tracepoints"
        close = len(argv) > 3 and argv[3] == "close"
        with Topology() as t, Nginx(t, t.b, t.b_ip4):
            url = (f"http://{t.b_ip4}:{HTTP_PORT}/ok.txt" if which == "tracepoints"
                   else f"https://{t.b_ip4}:{HTTPS_PORT}/ok.txt")
            recs, sizes, polls, (rps, n) = record(lambda: _wrk(t, url, 2, close), which)
        save(Path(argv[1]), recs, sizes, polls)
        print(f"{len(recs)} records in {len(sizes)} batches; wrk {n} requests, {rps:.0f}/s")
        return 0
    print("usage: python -m bench.http_replay record FILE [tracepoints|uprobes] [close] | "
          "replay FILE [SRC] | compare COMMIT FILE...")
    return 2


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main(sys.argv[1:])
    sys.exit(rc)
