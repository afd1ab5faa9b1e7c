"""Ring buffer drain rate: ebpf-otlp's consumer against libbpf in C.

The producer is the self-test object's ``rb_produce`` XDP program, driven by
``BPF_PROG_TEST_RUN`` (64 records of 48 bytes per run) from another thread.
The C reference (bench/rb_consumer.c, compiled here with gcc -O2 -lbpf) runs
the same object with libbpf's own consumer; ebpf-otlp's ``RingBuffer`` /
``RingPoller`` decode each batch into the record dtype and check sequence
numbers. Then ours runs paced at 1,000,000 records/s for 10 s with the
agent's default ring (4 MiB) and wake-up policy: nothing may be lost.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import time
from typing import Any

import numpy as np

from .common import OBJ_DIR, WORK, Figure, Result, command_for, median

NAME = "ringbuf"
TITLE = "Ring buffer drain rate (records/s)"

PER_RUN = 64
NO_WAKEUP = 0xFFFFFFFF  # a threshold never reached: BPF_RB_NO_WAKEUP on every submit
AGENT_WAKEUP = 64 << 10  # AgentConfig.ringbuf_wakeup_bytes default
AGENT_RING = 4 << 20  # AgentConfig.ringbuf_bytes default
BIG_RING = 16 << 20


def build_c() -> str:
    """Compile the reference consumer; returns the binary's path."""
    src = OBJ_DIR.parent.parent.parent / "bench" / "rb_consumer.c"
    out = WORK / "rb_consumer"
    WORK.mkdir(parents=True, exist_ok=True)
    if not shutil.which("gcc"):
        raise RuntimeError("gcc not installed: apt-get install gcc libbpf-dev")
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src), "-lbpf", "-lpthread"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building rb_consumer failed:\n{res.stderr}")
    return str(out)


def run_c(binary: str, mode: str, wakeup_bytes: int, records: int, ring_bytes: int = BIG_RING,
          rate: float = 0, timer_us: int = 1000) -> dict[str, Any]:
    cmd = [binary, str(OBJ_DIR / "selftest.bpf.o"), "--mode", mode, "--wakeup-bytes",
           str(wakeup_bytes), "--records", str(records), "--per-run", str(PER_RUN),
           "--ring-bytes", str(ring_bytes), "--rate", str(rate), "--timer-us", str(timer_us)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    out = json.loads(res.stdout)
    out["command"] = " ".join(cmd)
    return out


class _SeqCheck:
    """What the batch callback does: keep the records, check the sequence."""

    def __init__(self) -> None:
        self.received = 0
        self.gaps = 0
        self.next_seq = -1
        self.last_at = 0.0

    def __call__(self, recs: np.ndarray) -> None:
        seq = recs["seq"]
        if self.next_seq >= 0 and int(seq[0]) != self.next_seq:
            self.gaps += abs(int(seq[0]) - self.next_seq)
        if len(seq) > 1:
            d = np.diff(seq)
            bad = d != 1
            if bad.any():
                self.gaps += int(np.abs(d[bad].astype(np.int64) - 1).sum())
        self.next_seq = int(seq[-1]) + 1
        self.received += len(seq)
        self.last_at = time.monotonic()


def run_python(binary: str, records: int, wakeup_bytes: int, ring_bytes: int, rate: float = 0,
               poll_ms: int = 50, timer_drain: bool = False) -> dict[str, Any]:
    """ebpf-otlp's consumer. The producer is the C program in producer-only
    mode on the inherited program fd, so it paces exactly as for the C
    consumer and never competes for the GIL.

    ``timer_drain``: drain with ``RingBuffer.drain`` every ``poll_ms`` without
    epoll (the no-wakeup policy); otherwise ``RingPoller.poll`` as the agent does.
    """
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.layout import record_dtype
    from ebpf_otlp.platform.ringbuf import RingBuffer, RingPoller

    obj = BpfObject.open_packaged("selftest")
    try:
        obj.only_programs(["rb_produce"])
        obj.rodata["records_per_run"] = PER_RUN
        obj.rodata["ringbuf_wakeup_bytes"] = wakeup_bytes
        obj.set_max_entries("test_events", ring_bytes)
        obj.load()
        fd = obj.programs["rb_produce"].fd
        check = _SeqCheck()
        rb = RingBuffer(obj.maps["test_events"], record_dtype("selftest", "selftest_event"),
                        on_batch=check, lost_map=obj.maps["test_events_lost"])
        poller = RingPoller([rb])
        backlog = 0  # high-water mark of bytes waiting when the consumer looked
        waiter = select.epoll()
        waiter.register(rb.map.fd, select.EPOLLIN | select.EPOLLET)  # as RingPoller does
        cpu0 = time.thread_time()
        t0 = time.monotonic()
        check.last_at = t0
        producer = subprocess.Popen(
            [binary, "-", "--prog-fd", str(fd), "--records", str(records), "--per-run",
             str(PER_RUN), "--rate", str(rate)],
            pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = None
            produced = None
            while True:
                # RingPoller.poll(poll_ms) spelt out, to see the backlog first.
                if timer_drain:
                    time.sleep(poll_ms / 1000)
                else:
                    waiter.poll(poll_ms / 1000)
                backlog = max(backlog, rb.pending_bytes())
                poller.drain()
                if produced is None and producer.poll() is not None:
                    out, err = producer.communicate()
                    if producer.returncode != 0 or not out.strip():
                        raise RuntimeError(f"producer failed: {err.strip()}")
                    produced = json.loads(out)["produced"]
                    deadline = time.monotonic() + 2
                if produced is not None and (check.received + rb.lost() >= produced
                                             or time.monotonic() > deadline):
                    break
        finally:
            if producer.poll() is None:
                producer.kill()
                producer.wait()
        poller.drain()
        elapsed = check.last_at - t0
        out = {
            "mode": "drain on timer" if timer_drain else "RingPoller.poll",
            "wakeup_bytes": wakeup_bytes, "records_per_run": PER_RUN, "ring_bytes": ring_bytes,
            "offered_rate": rate, "produced": produced, "received": check.received,
            "lost": rb.lost(), "gaps": check.gaps, "batches": rb.batches,
            "seconds": elapsed, "records_per_s": check.received / elapsed if elapsed else 0,
            "consumer_cpu_s": time.thread_time() - cpu0, "poll_ms": poll_ms,
            "max_backlog_bytes": backlog,
        }
        waiter.close()
        poller.close()
        return out
    finally:
        obj.close()


def _policy(wakeup_bytes: int) -> str:
    if wakeup_bytes == NO_WAKEUP:
        return "no wake-up (BPF_RB_NO_WAKEUP), consumer drains on a 1 ms timer"
    if wakeup_bytes == 0:
        return "wake-up on every record"
    return f"one wake-up per {wakeup_bytes // 1024} KiB queued, plus a timer"


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    binary = build_c()
    records = 200_000 if quick else 5_000_000
    slow_records = 20_000 if quick else 300_000  # wake-up per record runs at ~0.1 M/s
    trials = 1 if quick else 3
    cases: dict[str, list[dict]] = {k: [] for k in
                                     ("c_consume", "c_poll", "c_poll_batched", "py_poll",
                                      "py_timer")}
    # Alternate the consumers so drifting background load hits all of them alike.
    for _ in range(trials):
        cases["c_consume"].append(run_c(binary, "consume", NO_WAKEUP, records))
        cases["py_poll"].append(run_python(binary, records, AGENT_WAKEUP, BIG_RING, poll_ms=50))
        cases["c_poll_batched"].append(run_c(binary, "poll", AGENT_WAKEUP, records))
        cases["py_timer"].append(run_python(binary, records, NO_WAKEUP, BIG_RING, poll_ms=1,
                                            timer_drain=True))
    cases["c_poll"].append(run_c(binary, "poll", 0, slow_records))
    rate = {k: median([r["records_per_s"] for r in v]) for k, v in cases.items()}
    res.raw["trials"] = cases
    ref_key = max(("c_consume", "c_poll"), key=lambda k: rate[k])
    ref_name = {"c_consume": "C libbpf ring_buffer__consume, " + _policy(NO_WAKEUP),
                "c_poll": "C libbpf ring_buffer__poll, " + _policy(0)}[ref_key]
    labels = {
        "c_consume": "C libbpf ring_buffer__consume; " + _policy(NO_WAKEUP),
        "c_poll": "C libbpf ring_buffer__poll; " + _policy(0),
        "c_poll_batched": "C libbpf ring_buffer__poll; " + _policy(AGENT_WAKEUP),
        "py_poll": "ebpf-otlp RingPoller.poll(50 ms) + numpy decode; " + _policy(AGENT_WAKEUP),
        "py_timer": "ebpf-otlp RingBuffer.drain + numpy decode; " + _policy(NO_WAKEUP),
    }
    for key in ("c_consume", "c_poll", "c_poll_batched"):
        lost = sum(r["lost"] for r in cases[key])
        res.add(Figure(labels[key], rate[key], "records/s",
                       note=f"lost {lost}, sequence gaps {sum(r['gaps'] for r in cases[key])}"))
    for key in ("py_poll", "py_timer"):
        lost = sum(r["lost"] for r in cases[key])
        gaps = sum(r["gaps"] for r in cases[key])
        res.add(Figure.compare(labels[key], rate[key], "records/s", rate[ref_key], ref_name,
                               target=0.5, note=f"lost {lost}, sequence gaps {gaps}"))
    best_c_same_policy = rate["c_poll_batched"]
    res.add(Figure.compare("ebpf-otlp vs C with the same policy (a wake-up per 64 KiB)",
                           rate["py_poll"], "records/s", best_c_same_policy,
                           labels["c_poll_batched"]))

    # Sustained: the agent's ring size and wake-up policy, paced producer.
    seconds = 1 if quick else 10
    sus = run_python(binary, 1_000_000 * seconds, AGENT_WAKEUP, AGENT_RING, rate=1_000_000,
                     poll_ms=50)
    res.raw["sustained"] = sus
    ok = sus["lost"] == 0 and sus["gaps"] == 0 and sus["received"] == sus["produced"]
    res.add(Figure(f"sustained 1,000,000 records/s for {seconds} s (4 MiB ring, a wake-up "
                   "per 64 KiB, 50 ms poll): records lost", sus["lost"] + sus["gaps"], "records",
                   target="0 lost, 0 gaps, received == produced", met=ok,
                   note=f"produced {sus['produced']}, received {sus['received']}, gaps "
                        f"{sus['gaps']}, achieved {sus['records_per_s']:.0f}/s, consumer CPU "
                        f"{sus['consumer_cpu_s']:.2f} s"))
    csus = run_c(binary, "poll", AGENT_WAKEUP, 1_000_000 * seconds, ring_bytes=AGENT_RING,
                 rate=1_000_000)
    res.raw["sustained_c"] = csus
    res.add(Figure.compare("consumer CPU seconds at 1 M records/s sustained (ours vs C, "
                           "same policy)", sus["consumer_cpu_s"], "s",
                           csus["consumer_cpu_s"], "C libbpf ring_buffer__poll, same ring "
                           "and policy", higher_is_better=False,
                           note=f"C lost {csus['lost']}"))
    res.note("Producer: the self-test object's rb_produce XDP program via BPF_PROG_TEST_RUN "
             "(64 records of 48 bytes per run) from bench/rb_consumer.c, a thread of the C "
             "consumer or a separate process for ours; 16 MiB ring for the rate figures, "
             "flat out in one call. Paced runs use one run (64 records) per call: an XDP test "
             "run with repeat > 1 costs a fixed ~20 ms here, more under load (the XDP "
             "dispatcher is swapped in and out), which would turn pacing into ring-sized "
             "bursts.")
    res.note("Every consumer checks sequence numbers (gaps) and reads the kernel's own count "
             "of failed reservations (lost); medians of the trials, run alternately.")
    res.note("The C consume figure is bounded by the producer (its consumer thread uses a "
             "fraction of a CPU); a ratio near 1 means ours keeps up with the kernel too.")
    return res
