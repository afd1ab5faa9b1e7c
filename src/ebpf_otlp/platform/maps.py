"""BPF maps: single-element ops, iteration, batch drain, per-CPU values."""

from __future__ import annotations

import errno
from typing import Iterator

import numpy as np

from .libbpf import BpfError, ffi, lib, num_possible_cpus

# enum bpf_map_type values that hold one value slot per possible CPU.
PERCPU_TYPES = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
TYPE_RINGBUF = 27
BPF_NOEXIST, BPF_EXIST, BPF_ANY = 1, 2, 0
# Errors that mean "this kernel has no batch ops for this map type".
_NO_BATCH = {errno.EINVAL, errno.ENOTSUP, 524, errno.EOPNOTSUPP}


def _round8(n: int) -> int:
    return (n + 7) & ~7


class Map:
    """A BPF map. Keys and values are ``bytes`` or numpy arrays of raw records."""

    def __init__(self, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, fd: int = -1, ptr: object = None):
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.fd = fd
        self._ptr = ptr
        self.percpu = map_type in PERCPU_TYPES
        self.ncpus = num_possible_cpus() if self.percpu else 1
        self._batch_ok = True

    @classmethod
    def from_libbpf(cls, ptr: object) -> Map:
        return cls(ffi.string(lib.bpf_map__name(ptr)).decode(), lib.bpf_map__type(ptr),
                   lib.bpf_map__key_size(ptr), lib.bpf_map__value_size(ptr),
                   lib.bpf_map__max_entries(ptr), lib.bpf_map__fd(ptr), ptr)

    @property
    def value_stride(self) -> int:
        """Bytes one value takes in user-space buffers (per-CPU slots are 8-aligned)."""
        return _round8(self.value_size) * self.ncpus if self.percpu else self.value_size

    def _check(self, ret: int, op: str) -> None:
        if ret < 0:
            raise BpfError(-ret, f"{op} on map {self.name}")

    def _key(self, key: bytes | int) -> object:
        if isinstance(key, int):
            key = key.to_bytes(self.key_size, "little")
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name} keys are {self.key_size} bytes, got {len(key)}")
        return ffi.from_buffer(key)

    # --- single elements ------------------------------------------------
    def lookup(self, key: bytes | int) -> bytes | None:
        """The raw value (all CPU slots for a per-CPU map), or None."""
        out = ffi.new("char[]", self.value_stride)
        ret = lib.bpf_map_lookup_elem(self.fd, self._key(key), out)
        if ret == -errno.ENOENT:
            return None
        self._check(ret, "lookup")
        return ffi.buffer(out)[:]

    def update(self, key: bytes | int, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_stride:
            raise ValueError(f"map {self.name} values are {self.value_stride} bytes")
        self._check(lib.bpf_map_update_elem(self.fd, self._key(key), ffi.from_buffer(value),
                                            flags), "update")

    def delete(self, key: bytes | int) -> bool:
        ret = lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            return False
        self._check(ret, "delete")
        return True

    def keys(self) -> Iterator[bytes]:
        cur = ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        while True:
            ret = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                return
            self._check(ret, "get_next_key")
            k = ffi.buffer(nxt)[:]
            yield k
            cur = ffi.new("char[]", k)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # --- per-CPU and numeric helpers ---------------------------------------
    def per_cpu(self, value: bytes, dtype: np.dtype | str = "<u8") -> np.ndarray:
        """Split a per-CPU value into one element per CPU."""
        dt = np.dtype(dtype)
        raw = np.frombuffer(value, dtype=np.uint8).reshape(self.ncpus, _round8(self.value_size))
        return raw[:, : dt.itemsize].copy().view(dt).reshape(self.ncpus)

    def sum_u64(self, key: bytes | int = 0) -> int:
        """A u64 value, summed over CPUs for per-CPU maps; 0 when absent."""
        v = self.lookup(key)
        if v is None:
            return 0
        if self.percpu:
            return int(self.per_cpu(v).sum())
        return int.from_bytes(v[:8], "little")

    # --- batches ------------------------------------------------------------
    def drain(self, delete: bool = True, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Read (and by default delete) every entry in batches.

        Returns (keys, values) as uint8 arrays of shape (n, key_size) and
        (n, value_stride); view them with the record dtypes. Falls back to
        per-element iteration on kernels without batch ops.
        """
        if self._batch_ok:
            try:
                return self._drain_batch(delete, chunk)
            except BpfError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        return self._drain_iter(delete)

    def _drain_batch(self, delete: bool, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        fn = lib.bpf_map_lookup_and_delete_batch if delete else lib.bpf_map_lookup_batch
        opts = ffi.new("struct bpf_map_batch_opts *")
        opts.sz = ffi.sizeof("struct bpf_map_batch_opts")
        chunk = max(1, min(chunk, self.max_entries))
        tok_in = ffi.new("char[]", max(self.key_size, 8))
        tok_out = ffi.new("char[]", max(self.key_size, 8))
        count = ffi.new("__u32 *")
        keys_parts, vals_parts = [], []
        first = True
        while True:
            keys = np.empty((chunk, self.key_size), np.uint8)
            vals = np.empty((chunk, self.value_stride), np.uint8)
            count[0] = chunk
            ret = fn(self.fd, ffi.NULL if first else tok_in, tok_out, ffi.from_buffer(keys),
                     ffi.from_buffer(vals), count, opts)
            n = count[0]
            if ret < 0 and ret != -errno.ENOENT:
                if ret == -errno.ENOSPC and n == 0:  # one bucket holds more than chunk
                    chunk *= 2
                    continue
                self._check(ret, "lookup_and_delete_batch" if delete else "lookup_batch")
            if n:
                keys_parts.append(keys[:n])
                vals_parts.append(vals[:n])
            if ret == -errno.ENOENT:
                break
            ffi.memmove(tok_in, tok_out, len(ffi.buffer(tok_out)))
            first = False
        if not keys_parts:
            return (np.empty((0, self.key_size), np.uint8),
                    np.empty((0, self.value_stride), np.uint8))
        return np.concatenate(keys_parts), np.concatenate(vals_parts)

    def _drain_iter(self, delete: bool) -> tuple[np.ndarray, np.ndarray]:
        ks, vs = [], []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is None:
                continue
            if delete:
                self.delete(k)
            ks.append(k)
            vs.append(v)
        keys = np.frombuffer(b"".join(ks), np.uint8).reshape(len(ks), self.key_size)
        vals = np.frombuffer(b"".join(vs), np.uint8).reshape(len(vs), self.value_stride)
        return keys.copy(), vals.copy()

    def __repr__(self) -> str:
        return f"<Map {self.name} type={self.type} max_entries={self.max_entries}>"
