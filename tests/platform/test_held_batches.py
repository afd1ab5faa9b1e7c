"""HeldBatches: ring batches held for bigger decodes, handed over whole and in order."""

from __future__ import annotations

import time

import numpy as np

from ebpf_otlp.platform.ringbuf import HeldBatches


def test_held_until_the_limit_then_taken_in_order() -> None:
    h = HeldBatches(limit=10)
    assert h.take() is None and h.waited() == 0.0
    assert not h.add(np.arange(4))
    t0 = time.monotonic()
    assert not h.add(np.arange(4, 9))
    assert h.count == 9
    assert h.add(np.arange(9, 12))  # 12 >= 10: the caller decodes now
    got = h.take()
    assert got.tolist() == list(range(12))
    assert h.count == 0 and h.take() is None and h.waited() == 0.0
    h.add(np.arange(3))
    assert 0.0 <= h.waited() <= time.monotonic() - t0 + 1.0
    one = h.take()
    assert one.tolist() == [0, 1, 2]  # a single batch is handed over as it came
