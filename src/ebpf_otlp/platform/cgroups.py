"""cgroup v2 ids (what ``bpf_get_current_cgroup_id()`` and a socket's cgroup
give the kernel side) to cgroup paths, and processes to their cgroup.

A cgroup v2 id is the kernfs node id of the cgroup's directory: the
directory's inode number, and the payload of its ``FILEID_KERNFS`` file
handle. :class:`CgroupPaths` opens the directory by that handle
(``open_by_handle_at``, CAP_DAC_READ_SEARCH) and reads the path back from
``/proc/self/fd``; where that is refused it walks the cgroup2 mount once per
miss (rate-limited) and indexes directories by inode. Ids are never reused
while the host runs, so a resolved id stays valid; the cache is bounded
(LRU) and counts its evictions.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import tempfile
import time
from collections import OrderedDict

from . import mounts
from .host import cgroup2_mount

FILEID_KERNFS = 0xFE
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


class BoundedCache(OrderedDict):
    """An LRU dict of at most ``cap`` entries that counts what it evicts."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap
        self.evictions = 0

    def get_lru(self, key: object) -> object:
        v = super().get(key)
        if v is not None:
            self.move_to_end(key)
        return v

    def put(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)
            self.evictions += 1


def cgroup_id(path: str) -> int:
    """The cgroup v2 id of a cgroup directory (its inode number)."""
    return os.stat(path).st_ino


def pid_cgroup(pid: int, proc: str = "/proc") -> str | None:
    """The cgroup v2 path of a process (``0::/...`` line), None if it is gone."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def pid_cgroup_id(pid: int, mount: str | None, proc: str = "/proc") -> int:
    """The cgroup v2 id of a process (what ``bpf_get_current_cgroup_id`` gives
    its threads), 0 if it or the cgroup is gone or v2 is not mounted here."""
    path = pid_cgroup(pid, proc) if mount else None
    if path is None:
        return 0
    try:
        return cgroup_id(os.path.join(mount, path.lstrip("/")))
    except OSError:
        return 0


def _open_root(mount: str | None) -> int:
    """An fd of the cgroup2 root: the visible mount, else (``ip netns exec`` and
    many containers remount /sys) a private mount detached right after opening,
    which leaves nothing mounted behind."""
    path = mount or cgroup2_mount()
    if path:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return -1
    tmp = tempfile.mkdtemp(prefix="ebpf-otlp-cg-")
    try:
        try:
            mounts.mount("cgroup2", tmp)
        except mounts.MountError:
            return -1
        try:
            return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return -1
        finally:
            mounts.unmount(tmp)
    finally:
        os.rmdir(tmp)


class CgroupPaths:
    """cgroup v2 id -> path relative to the cgroup2 mount ("/kubepods.slice/...")."""

    def __init__(self, mount: str | None = None, cap: int = 16384,
                 walk_every_s: float = 1.0, walk_max_dirs: int = 200_000):
        self.cache = BoundedCache(cap)
        self.lookups = 0
        self.misses = 0
        self.unresolved = 0  # ids neither the handle nor a walk found (cgroup gone)
        self.walks = 0
        self._walk_every = walk_every_s
        self._walk_max = walk_max_dirs
        self._last_walk = -1e9
        self._mount_fd = _open_root(mount)
        self._handles = True
        # Paths are read back through the root's fd, so a private mount that is
        # already detached from the tree works as well as the host's.
        self.mount = f"/proc/self/fd/{self._mount_fd}" if self._mount_fd >= 0 else ""
        self._prefix = ""
        if self._mount_fd >= 0:
            link = os.readlink(self.mount)
            self._prefix = "" if link == "/" else link.rstrip("/")

    def close(self) -> None:
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1

    def path(self, cgid: int) -> str | None:
        """The path of cgroup ``cgid``, or None (unknown, removed, no cgroup2 mount)."""
        self.lookups += 1
        hit = self.cache.get_lru(cgid)
        if hit is not None:
            return hit
        self.misses += 1
        p = self._by_handle(cgid) if self._handles else None
        if p is None:
            p = self._by_walk(cgid)
        if p is None:
            self.unresolved += 1
            return None
        self.cache.put(cgid, p)
        return p

    def _relative(self, full: str) -> str | None:
        for base in (self.mount, self._prefix):
            if full == base:
                return "/"
            if full.startswith(base + "/"):
                return full[len(base):]
        return None

    def _by_handle(self, cgid: int) -> str | None:
        if self._mount_fd < 0:
            return None
        buf = ctypes.create_string_buffer(struct.pack("IiQ", 8, FILEID_KERNFS, cgid))
        fd = _libc.open_by_handle_at(self._mount_fd, buf, os.O_RDONLY)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._handles = False  # not allowed here: walk instead from now on
            return None
        try:
            return self._relative(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return None
        finally:
            os.close(fd)

    def _by_walk(self, cgid: int) -> str | None:
        now = time.monotonic()
        if not self.mount or now - self._last_walk < self._walk_every:
            return None
        self._last_walk = now
        self.walks += 1
        found = None
        stack = [self.mount]
        seen = 0
        while stack and seen < self._walk_max:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    seen += 1
                    stack.append(e.path)
                    ino = e.inode()
                    if ino == cgid:
                        found = e.path
                    elif len(self.cache) < self.cache.cap:
                        rel = self._relative(e.path)
                        if rel is not None:
                            self.cache.put(ino, rel)
        return self._relative(found) if found else None
