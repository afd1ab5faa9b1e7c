"""Kernel memory of BPF maps, as a function of their size and of the number of
possible CPUs.

Since Linux 6.4 the kernel reports what each map costs (``memlock`` in the
map fd's ``/proc/PID/fdinfo`` entry, ``bytes_memlock`` in ``bpftool map
show``). :func:`map_bytes` reproduces that figure for the map kinds
ebpf-otlp uses; the constants are those of this machine kind's kernel (6.18,
x86_64), and ``tests/test_kmem.py`` checks the formula against every map of
a running agent, to the byte. Only per-CPU maps and the hash tables'
per-CPU spare elements grow with the number of CPUs; README "Kernel memory"
tabulates :func:`total_bytes` for the default settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, SK_STORAGE, RINGBUF = 1, 2, 5, 6, 9, 24, 27
F_MMAPABLE = 0x400
PAGE = 4096

# Fixed parts (bytes) measured on 6.18 x86_64 through fdinfo memlock.
_HTAB = 832          # struct bpf_htab
_HTAB_ELEM = 48      # struct htab_elem before the key
_BUCKET = 16         # struct bucket
_LOCKS_PER_CPU = 32  # map_locked: 8 ints per CPU
_ARRAY = 312         # struct bpf_array
_RINGBUF = 12616     # struct bpf_ringbuf pages and bookkeeping
_SK_STORAGE = 448    # struct bpf_local_storage_map
_SK_BUCKET = 16      # struct bpf_local_storage_map_bucket
# Socket storage itself (one element per socket that has one) is charged to the
# socket, not to the map: struct bpf_local_storage_elem (128) + the value, plus one
# struct bpf_local_storage (176) per socket, freed with the socket.
SK_STORAGE_PER_SOCKET = 128 + 176


def _r8(n: int) -> int:
    return (n + 7) & ~7


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class MapSpec:
    """What a map's kernel memory depends on (fdinfo names)."""

    name: str
    map_type: int
    max_entries: int
    key_size: int
    value_size: int
    flags: int = 0


def map_bytes(m: MapSpec, cpus: int) -> int:
    """Kernel memory of map ``m`` with ``cpus`` possible CPUs (preallocated maps)."""
    t, n, k, v = m.map_type, m.max_entries, m.key_size, m.value_size
    if t in (HASH, LRU_HASH, PERCPU_HASH):
        base = _HTAB + _BUCKET * _pow2(n) + _LOCKS_PER_CPU * cpus
        if t == PERCPU_HASH:
            return base + n * (_HTAB_ELEM + _r8(k) + 8) + n * _r8(v) * cpus
        elem = _HTAB_ELEM + _r8(k) + _r8(v)
        if t == LRU_HASH:
            return base + n * elem
        # plain hash: one spare element (and its pointer) per CPU
        return base + (n + cpus) * elem + cpus * 8
    if t == PERCPU_ARRAY:
        return _ARRAY + n * 8 + n * _r8(v) * cpus
    if t == ARRAY:
        if m.flags & F_MMAPABLE:
            return PAGE + -(-n * _r8(v) // PAGE) * PAGE
        return _ARRAY + n * _r8(v)
    if t == RINGBUF:
        return n + n // PAGE * 16 + _RINGBUF
    if t == SK_STORAGE:  # buckets: possible CPUs rounded up to a power of two, at least 2
        return _SK_STORAGE + _SK_BUCKET * max(2, _pow2(cpus))
    raise ValueError(f"map {m.name}: type {t} not modelled")


def total_bytes(maps: list[MapSpec], cpus: int) -> int:
    return sum(map_bytes(m, cpus) for m in maps)


def fdinfo_maps(pid: int | str = "self") -> list[tuple[MapSpec, int]]:
    """Every BPF map process ``pid`` holds open: (spec, memlock the kernel reports)."""
    out, seen = [], set()
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(f"{base}/{fd}") as f:
                info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue
        info = {k.strip(): v.strip() for k, v in info.items()}
        if "map_type" not in info or "memlock" not in info:
            continue
        mid = info.get("map_id", fd)
        if mid in seen:
            continue
        seen.add(mid)
        spec = MapSpec(name=f"id {mid}", map_type=int(info["map_type"]),
                       max_entries=int(info["max_entries"]), key_size=int(info["key_size"]),
                       value_size=int(info["value_size"]), flags=int(info["map_flags"], 16))
        out.append((spec, int(info["memlock"])))
    return out
