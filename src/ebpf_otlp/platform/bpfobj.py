"""BPF object lifecycle in libbpf's order.

``open`` (file or bytes) -> set ``.rodata`` constants -> choose which
programs autoload -> ``load`` -> attach -> ``close``. Closing destroys
every link and TC filter that was attached through the object.
"""

from __future__ import annotations

import errno
import logging
import os
from importlib import resources
from pathlib import Path

from . import btf as _btf
from . import tc as _tc
from .libbpf import BpfError, capture_log, check, check_ptr, ffi, lib
from .maps import Map

log = logging.getLogger(__name__)


def packaged_object(name: str) -> bytes:
    """The bytes of a compiled object shipped with the package (``flows``)."""
    ref = resources.files("ebpf_otlp") / "bpf" / f"{name}.bpf.o"
    try:
        return ref.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"BPF object {name}.bpf.o is missing from the package: run `make build` "
            "(needs clang) or install a wheel that ships it") from None


class Link:
    """An attachment that goes away when destroyed (or when the process exits)."""

    def __init__(self, ptr: object, description: str):
        self._ptr = ptr
        self.description = description

    @property
    def fd(self) -> int:
        return lib.bpf_link__fd(self._ptr)

    def destroy(self) -> None:
        if self._ptr is not None:
            lib.bpf_link__destroy(self._ptr)
            self._ptr = None

    def __repr__(self) -> str:
        return f"<Link {self.description}>"


class Program:
    def __init__(self, obj: BpfObject, ptr: object):
        self._obj = obj
        self._ptr = ptr
        self.name = ffi.string(lib.bpf_program__name(ptr)).decode()
        self.section = ffi.string(lib.bpf_program__section_name(ptr)).decode()

    @property
    def autoload(self) -> bool:
        return bool(lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        check(lib.bpf_program__set_autoload(self._ptr, bool(value)),
              f"set autoload of {self.name}")

    @property
    def fd(self) -> int:
        fd = lib.bpf_program__fd(self._ptr)
        if fd < 0:
            raise BpfError(errno.EBADF, f"program {self.name} is not loaded")
        return fd

    def _link(self, ptr_fn, what: str) -> Link:
        with capture_log() as lines:
            ptr = ptr_fn()
        check_ptr(ptr, f"attach {self.name} to {what}", lines)
        link = Link(ptr, f"{self.name} -> {what}")
        self._obj._links.append(link)
        return link

    def attach(self) -> Link:
        """Attach by the program's section name (``tracepoint/cat/name`` ...)."""
        return self._link(lambda: lib.bpf_program__attach(self._ptr), self.section)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        from .mounts import ensure_tracefs

        ensure_tracefs()
        return self._link(
            lambda: lib.bpf_program__attach_tracepoint(self._ptr, category.encode(),
                                                       name.encode()),
            f"tracepoint {category}:{name}")

    def attach_raw_tracepoint(self, name: str) -> Link:
        return self._link(
            lambda: lib.bpf_program__attach_raw_tracepoint(self._ptr, name.encode()),
            f"raw tracepoint {name}")

    def attach_uprobe(self, binary: str, symbol: str | None, *, retprobe: bool = False,
                      pid: int = -1, offset: int = 0) -> Link:
        """Attach to ``symbol`` + ``offset`` in ``binary`` (a path, or a library name libbpf
        resolves); with ``symbol`` None, ``offset`` is a file offset in ``binary``."""
        opts = ffi.new("struct bpf_uprobe_opts *")
        opts.sz = ffi.sizeof("struct bpf_uprobe_opts")
        opts.retprobe = retprobe
        fname = ffi.new("char[]", symbol.encode()) if symbol else ffi.NULL
        opts.func_name = fname
        kind = "uretprobe" if retprobe else "uprobe"
        where = f"{symbol}+{offset:#x}" if symbol else f"{offset:#x}"
        return self._link(
            lambda: lib.bpf_program__attach_uprobe_opts(self._ptr, pid, binary.encode(), offset,
                                                        opts),
            f"{kind} {binary}:{where}")

    def attach_xdp(self, ifindex: int) -> Link:
        return self._link(lambda: lib.bpf_program__attach_xdp(self._ptr, ifindex),
                          f"xdp ifindex {ifindex}")

    def attach_tc(self, ifindex: int, direction: str) -> _tc.TcFilter:
        """Attach as a TC clsact filter, ``direction`` being ``ingress`` or ``egress``."""
        filt = _tc.attach(self.fd, ifindex, direction, self.name)
        self._obj._tc_filters.append(filt)
        return filt

    def attach_tcx(self, ifindex: int, direction: str, first: bool = False) -> object:
        """Attach through a TCX link (6.6+), after the programs already there
        (before them with ``first``)."""
        from .tcx import attach

        link = attach(self.fd, ifindex, direction, self.name, first)
        self._obj._links.append(link)
        return link

    def attach_cgroup(self, path: str) -> Link:
        """Attach (sock_ops, cgroup_skb ...) to the cgroup v2 directory ``path``."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._link(lambda: lib.bpf_program__attach_cgroup(self._ptr, fd),
                              f"cgroup {path}")
        finally:
            os.close(fd)

    def test_run(self, *args, **kwargs):
        from .testrun import test_run

        return test_run(self, *args, **kwargs)

    def run_stats(self) -> tuple[int, int]:
        """(run_time_ns, run_cnt) from fdinfo; zeros unless BPF stats are enabled."""
        ns = cnt = 0
        try:
            with open(f"/proc/self/fdinfo/{self.fd}") as f:
                for line in f:
                    if line.startswith("run_time_ns:"):
                        ns = int(line.split()[1])
                    elif line.startswith("run_cnt:"):
                        cnt = int(line.split()[1])
        except (OSError, BpfError):
            pass
        return ns, cnt

    def recursion_misses(self) -> int:
        """Runs the kernel skipped because a BPF program was already running on that
        CPU (a tracepoint hit from an interrupt inside another program): events lost."""
        try:
            with open(f"/proc/self/fdinfo/{self.fd}") as f:
                for line in f:
                    if line.startswith("recursion_misses:"):
                        return int(line.split()[1])
        except (OSError, BpfError):
            pass
        return 0

    def __repr__(self) -> str:
        return f"<Program {self.name} ({self.section})>"


class GlobalData:
    """Named variables of one data section (``.rodata``, ``.bss``, ``.data``).

    Before load the values are libbpf's initial image; after load ``.bss`` and
    ``.data`` are the live kernel memory, ``.rodata`` is frozen.
    """

    def __init__(self, obj: BpfObject, section: str):
        self._obj = obj
        self.section = section
        self._vars = _btf.datasec_vars(lib.bpf_object__btf(obj._ptr), section)
        self._map = None
        for m in obj.maps.values():
            if m.name.endswith(section):
                self._map = m
        self._size = ffi.new("size_t *")

    def _buf(self) -> object:
        if self._map is None:
            raise KeyError(f"object {self._obj.name} has no {self.section} section")
        p = lib.bpf_map__initial_value(self._map._ptr, self._size)
        if p == ffi.NULL:
            raise BpfError(errno.EINVAL, f"map {self.section} has no memory image")
        return ffi.buffer(p, self._size[0])

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def _live(self) -> bool:
        # After load, .bss/.data are read through the map itself: libbpf 1.1
        # does not always leave its memory image mapped onto the kernel map.
        return self._obj.loaded and self.section != ".rodata" and self._map is not None

    def __getitem__(self, name: str) -> int:
        off, size = self._var(name)
        data = self._map.lookup(0) if self._live() else self._buf()
        return int.from_bytes(data[off:off + size], "little", signed=False)

    def __setitem__(self, name: str, value: int | bytes) -> None:
        if self.section == ".rodata" and self._obj.loaded:
            raise BpfError(errno.EPERM, f"set {name}: .rodata is frozen after load")
        off, size = self._var(name)
        data = value if isinstance(value, bytes) else int(value).to_bytes(size, "little",
                                                                            signed=value < 0)
        if len(data) != size:
            raise ValueError(f"{name} takes {size} bytes, got {len(data)}")
        if self._live():
            whole = bytearray(self._map.lookup(0))
            whole[off:off + size] = data
            self._map.update(0, bytes(whole))
        else:
            self._buf()[off:off + size] = data

    def _var(self, name: str) -> tuple[int, int]:
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(f"{self.section} of {self._obj.name} has no variable {name!r}; "
                           f"it has {sorted(self._vars)}") from None


class BpfObject:
    """One compiled BPF object; use as a context manager."""

    def __init__(self, ptr: object, name: str):
        self._ptr = ptr
        self.name = name
        self.loaded = False
        self._links: list[Link] = []
        self._tc_filters: list[_tc.TcFilter] = []
        self.programs: dict[str, Program] = {}
        p = lib.bpf_object__next_program(ptr, ffi.NULL)
        while p != ffi.NULL:
            prog = Program(self, p)
            self.programs[prog.name] = prog
            p = lib.bpf_object__next_program(ptr, p)
        self.maps: dict[str, Map] = {}
        m = lib.bpf_object__next_map(ptr, ffi.NULL)
        while m != ffi.NULL:
            mp = Map.from_libbpf(m)
            self.maps[mp.name] = mp
            m = lib.bpf_object__next_map(ptr, m)
        self.rodata = GlobalData(self, ".rodata")
        self.bss = GlobalData(self, ".bss")

    # --- opening ---------------------------------------------------------
    @classmethod
    def open_file(cls, path: str | Path, name: str | None = None) -> BpfObject:
        path = str(path)
        with capture_log() as lines:
            ptr = lib.bpf_object__open_file(path.encode(), ffi.NULL)
        check_ptr(ptr, f"open BPF object {path}", lines)
        return cls(ptr, name or Path(path).name.split(".")[0])

    @classmethod
    def open_bytes(cls, data: bytes, name: str) -> BpfObject:
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        cname = ffi.new("char[]", name.encode())
        opts.object_name = cname
        buf = ffi.from_buffer(data)
        with capture_log() as lines:
            ptr = lib.bpf_object__open_mem(buf, len(data), opts)
        check_ptr(ptr, f"open BPF object {name}", lines)
        obj = cls(ptr, name)
        obj._keep = (buf, cname)
        return obj

    @classmethod
    def open_packaged(cls, name: str) -> BpfObject:
        """Open an object shipped in the package, e.g. ``open_packaged("flows")``."""
        return cls.open_bytes(packaged_object(name), name)

    # --- loading ---------------------------------------------------------
    def set_max_entries(self, map_name: str, n: int) -> None:
        check(lib.bpf_map__set_max_entries(self.maps[map_name]._ptr, n),
              f"set max_entries of {map_name}")
        self.maps[map_name].max_entries = n

    def only_programs(self, names: set[str] | list[str]) -> None:
        """Autoload exactly ``names``; the others stay unloaded."""
        wanted = set(names)
        unknown = wanted - set(self.programs)
        if unknown:
            raise KeyError(f"object {self.name} has no programs {sorted(unknown)}")
        for prog in self.programs.values():
            prog.autoload = prog.name in wanted

    def load(self) -> BpfObject:
        from .mounts import ensure_tracefs

        if any(p.section.startswith("tracepoint") and p.autoload
               for p in self.programs.values()):
            ensure_tracefs()
        with capture_log() as lines:
            ret = lib.bpf_object__load(self._ptr)
        check(ret, f"load BPF object {self.name}", lines)
        self.loaded = True
        for m in self.maps.values():
            m.fd = lib.bpf_map__fd(m._ptr)
        return self

    def hooks(self) -> list[str]:
        """What this object has attached now (links and TC filters), readable."""
        return [link.description for link in self._links] + [repr(f) for f in self._tc_filters]

    def tc_filters(self) -> list[_tc.TcFilter]:
        """The TC filters attached now (they outlive the process, unlike links)."""
        return [f for f in self._tc_filters if f.attached]

    # --- teardown ---------------------------------------------------------
    def detach_all(self) -> None:
        for link in reversed(self._links):
            link.destroy()
        self._links.clear()
        for filt in reversed(self._tc_filters):
            try:
                filt.detach()
            except BpfError as e:
                log.warning("detaching %s: %s", filt, e)
        self._tc_filters.clear()

    def detach(self, attachment: object) -> None:
        """Detach one link, TCX link or TC filter of this object (gone interfaces
        included: their filters went with them)."""
        if attachment in self._links:
            self._links.remove(attachment)
            attachment.destroy()
        elif attachment in self._tc_filters:
            self._tc_filters.remove(attachment)
            attachment.detach()

    def close(self) -> None:
        if self._ptr is None:
            return
        self.detach_all()
        lib.bpf_object__close(self._ptr)
        self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

