"""Boot a second kernel (Debian 12's 6.1 cloud kernel) under QEMU and run a
check script there with the project's own Python.

Pieces, all built on the host at test time:
- the kernel: the package ``linux-image-cloud-amd64`` depends on, resolved by
  name (its ABI number changes), fetched with ``apt-get download`` and
  unpacked with ``dpkg -x`` into ``cache/`` (never installed);
- a read-only ext4 image (``mke2fs -d``, no mounting needed) holding the
  host's Python interpreter, its standard library, the venv's packages and
  the shared libraries they need (libbpf.so.1 included); cached by a
  fingerprint of the interpreter and the installed packages. (The cloud
  kernel has no 9p to share the host tree, and a 140 MB initramfs would be
  unpacked in full under emulation; the disk is read only as imported.)
- a small uncompressed initramfs, rebuilt every run: busybox, the kernel
  modules the check needs (virtio for the disk, clsact and cls_bpf for TC),
  the project's ``src/ebpf_otlp`` with its compiled objects, the check
  script, and an ``/init`` that mounts the image and chroots into it.

QEMU exits 0 whatever happens inside, so the guest prints its results as
marked lines on the serial console and the host parses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = HERE / "cache"
META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
RESULT_PREFIX = "@@EBPF_OTLP@@ "

# Modules the guest needs from the kernel package: the virtio disk that holds
# Python, clsact and cls_bpf for TC. Their dependencies are added and ordered
# from each module's own `depends=` (a `dpkg -x` tree has no modules.dep, and
# busybox insmod resolves nothing).
MODULES = ["virtio_pci", "virtio_blk", "sch_ingress", "cls_bpf"]

# Parts of the standard library and of the venv that the agent never imports:
# leaving them out keeps the image small and quick to build.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "pydoc_data", "config-3.11-x86_64-linux-gnu", "unittest", "distutils"}
SITE_SKIP = {"pip", "setuptools", "_pytest", "pytest", "hypothesis", "pygments", "ruff",
             "pkg_resources", "_distutils_hack"}


# Bump when build_base_image changes what goes into the image.
IMAGE_LAYOUT = "1"


class Unavailable(RuntimeError):
    """A facility the tier needs (QEMU, the registry, a tool) is missing."""


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - t0


def _run(*cmd: str, cwd: Path | None = None, timeout: float = 300) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def missing_tools() -> list[str]:
    """Host tools the tier needs, with the Debian package that brings each."""
    need = {QEMU: "qemu-system-x86", "busybox": "busybox-static", "mke2fs": "e2fsprogs",
            "apt-get": "apt", "dpkg": "dpkg"}
    out = [f"{tool} ({pkg})" for tool, pkg in need.items() if shutil.which(tool) is None]
    if Path(BUSYBOX).exists() and "statically linked" not in _file_kind(BUSYBOX):
        out.append("a static busybox (busybox-static)")
    return out


def _file_kind(path: str) -> str:
    # `file` may be absent; the ELF program headers tell static vs dynamic.
    data = Path(path).read_bytes()[:4096]
    return "dynamically linked" if b"/lib64/ld-linux" in data else "statically linked"


# --- the kernel package ------------------------------------------------------------

def resolve_kernel_package() -> str:
    """The versioned package the cloud-kernel metapackage depends on."""

    def ask() -> str | None:
        r = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True,
                           text=True, timeout=60)
        m = re.search(r"Depends:\s*(linux-image-[\w.+-]+-cloud-amd64)\b", r.stdout)
        return m.group(1) if m else None

    pkg = ask()
    if pkg is None:  # apt knows nothing yet: its lists were never fetched
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=240)
        pkg = ask()
    if pkg is None:
        raise Unavailable(f"apt cannot resolve {META_PACKAGE} (no Debian registry reachable?)")
    return pkg


@dataclass
class Kernel:
    package: str
    root: Path  # the `dpkg -x` tree

    @property
    def vmlinuz(self) -> Path:
        return next((self.root / "boot").glob("vmlinuz-*"))

    @property
    def release(self) -> str:
        return self.vmlinuz.name.removeprefix("vmlinuz-")

    def module(self, name: str) -> bytes:
        """The plain ELF of module ``name`` (decompressed if the package compresses)."""
        base = self.root / "lib/modules" / self.release / "kernel"
        for ext in (".ko", ".ko.xz", ".ko.zst"):
            found = next(base.rglob(name + ext), None)
            if found is None:
                continue
            data = found.read_bytes()
            if ext == ".ko.xz":  # busybox insmod takes plain ELF only
                import lzma
                data = lzma.decompress(data)
            elif ext == ".ko.zst":
                data = subprocess.run(["zstd", "-dc", str(found)], capture_output=True,
                                      check=True).stdout
            return data
        raise FileNotFoundError(f"module {name} is not in {self.package}")

    def modules_in_order(self, names: list[str]) -> list[tuple[str, bytes]]:
        """``names`` and their dependencies, dependencies first."""
        out: dict[str, bytes] = {}

        def visit(name: str) -> None:
            if name in out:
                return
            data = self.module(name)
            m = re.search(rb"depends=([\w,-]*)\0", data)
            for dep in filter(None, (m.group(1).decode() if m else "").split(",")):
                visit(dep.replace("-", "_"))
            out[name] = data

        for n in names:
            visit(n)
        return list(out.items())


def fetch_kernel(timings: Timings) -> Kernel:
    """Resolve, download (once) and unpack the kernel package into the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        pkg = resolve_kernel_package()
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        # Offline but a kernel was fetched before: use the newest cached one.
        cached = sorted(CACHE.glob("linux-image-*/root/boot"), key=lambda p: p.stat().st_mtime)
        if not cached:
            raise Unavailable(str(e)) from None
        root = cached[-1].parent.parent / "root"
        return Kernel(cached[-1].parent.parent.name, root)
    finally:
        timings.add("resolve", t0)
    kdir = CACHE / pkg
    root = kdir / "root"
    if not (root / "boot").is_dir():
        t0 = time.monotonic()
        kdir.mkdir(exist_ok=True)
        for old in kdir.glob("*.deb"):
            old.unlink()
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", "-q", pkg], cwd=kdir,
                               capture_output=True, text=True, timeout=600)
            if r.returncode == 0 or attempt:
                break
            # Stale lists name a version the archive no longer has: refresh once.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=240)
        debs = list(kdir.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise Unavailable(f"apt-get download {pkg} failed: {r.stderr.strip()[-500:]}")
        timings.add("download", t0)
        t0 = time.monotonic()
        tmp = kdir / f"root.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _run("dpkg", "-x", str(debs[0]), str(tmp))
        try:
            tmp.rename(root)
        except OSError:  # a concurrent run unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
        debs[0].unlink()  # the unpacked tree is the cache
        timings.add("unpack", t0)
        for old in CACHE.glob("linux-image-*"):  # an older ABI the metapackage left
            if old != kdir:
                shutil.rmtree(old, ignore_errors=True)
    return Kernel(pkg, root)


# --- the root image ------------------------------------------------------------------

def _needed_libs(binaries: list[Path]) -> set[str]:
    """Shared libraries (resolved paths) that ``binaries`` load, via ldd."""
    libs: set[str] = set()
    for chunk in range(0, len(binaries), 200):
        r = subprocess.run(["ldd", *map(str, binaries[chunk:chunk + 200])],
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(m.group(1))
    return libs


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        if not dst.exists():
            os.symlink(os.readlink(src), dst)
        return
    shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names
                                             if n in skip or n.split("-")[0] in skip])


@dataclass
class PythonLayout:
    interpreter: Path
    stdlib: Path
    site: Path

    @classmethod
    def current(cls) -> PythonLayout:
        return cls(Path(os.path.realpath(sys.executable)),
                   Path(sysconfig.get_paths()["stdlib"]),
                   Path(sysconfig.get_paths()["purelib"]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(IMAGE_LAYOUT.encode())
        for p in (self.interpreter, self.stdlib, self.site):
            h.update(str(p).encode())
        h.update(str(self.interpreter.stat().st_mtime_ns).encode())
        for d in sorted(self.site.glob("*.dist-info")):
            h.update(d.name.encode())
        for lib in ("/usr/lib/x86_64-linux-gnu/libbpf.so.1", BUSYBOX):
            if os.path.exists(lib):
                h.update(str(os.stat(os.path.realpath(lib)).st_mtime_ns).encode())
        return h.hexdigest()[:16]


def build_base_image(timings: Timings) -> Path:
    """The interpreter, libraries and packages as an ext4 image, cached by fingerprint.

    The project's own code is not in it (it changes every run); it travels in
    the initramfs instead.
    """
    py = PythonLayout.current()
    img = CACHE / f"pyroot-{py.fingerprint()}.ext4"
    if img.exists():
        return img
    t0 = time.monotonic()
    for old in CACHE.glob("pyroot-*.ext4"):
        old.unlink(missing_ok=True)
    stage = CACHE / f"pyroot.stage.{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("proc", "sys", "dev", "tmp", "run", "src", "bin", "etc", "root"):
        (stage / d).mkdir(parents=True)
    _copy(Path(BUSYBOX), stage / "bin/busybox")
    for applet in ("sh", "ip", "mount", "cat", "ls"):
        os.symlink("busybox", stage / "bin" / applet)
    _copy(py.interpreter, stage / py.interpreter.relative_to("/"))
    os.symlink(py.interpreter.name, stage / "usr/bin/python3")
    _copy_tree(py.stdlib, stage / py.stdlib.relative_to("/"), STDLIB_SKIP)
    site = stage / "site-packages"
    _copy_tree(py.site, site, SITE_SKIP)
    binaries = [py.interpreter, Path(os.path.realpath("/usr/lib/x86_64-linux-gnu/libbpf.so.1"))]
    binaries += [p for p in stage.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    libs = _needed_libs(binaries)
    libs.add(os.path.realpath("/usr/lib/x86_64-linux-gnu/libbpf.so.1"))
    for lib in libs:
        if lib.startswith(str(stage)):
            continue
        real = Path(os.path.realpath(lib))
        # Keep both the name the loader asks for and the file it points to.
        _copy(real, stage / real.relative_to("/"))
        dst = stage / Path(lib).relative_to("/")
        if not dst.exists() and not dst.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(real, dst)
    # libbpf is opened by name (dlopen "libbpf.so.1"): the loader's search path.
    so1 = stage / "usr/lib/x86_64-linux-gnu/libbpf.so.1"
    if not so1.exists():
        os.symlink(os.path.realpath("/usr/lib/x86_64-linux-gnu/libbpf.so.1"), so1)
    # Debian's merged /usr: /lib and /lib64 are symlinks into /usr.
    for link in ("lib", "lib64"):
        if not (stage / link).exists() and (stage / "usr" / link).exists():
            os.symlink(f"usr/{link}", stage / link)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (stage / "etc/resolv.conf").write_text("nameserver 127.0.0.1\n")
    size_mb = int(sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()
                      and not p.is_symlink()) / 1e6 * 1.25) + 64
    tmp = img.with_suffix(f".tmp.{os.getpid()}")
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "pyroot",
         "-E", "root_owner=0:0", "-d", str(stage), str(tmp), f"{size_mb}M")
    tmp.rename(img)
    shutil.rmtree(stage, ignore_errors=True)
    timings.add("image", t0)
    return img


# --- the initramfs -------------------------------------------------------------------

class Cpio:
    """An uncompressed ``newc`` archive, as the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        self.ino += 1
        blob = hdr.encode() + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4) + data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def tree(self, src: Path, dest: str, skip: set[str] = frozenset()) -> None:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if any(part in skip for part in rel.parts):
                continue
            if p.is_dir():
                self.dir(f"{dest}/{rel}")
            elif p.is_file():
                self.file(f"{dest}/{rel}", p.read_bytes(), p.stat().st_mode & 0o777)

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


INIT = r"""#!/bin/busybox sh
# PID 1 of the guest: modules, the Python image, then the check, then power off.
/bin/busybox mkdir -p /proc /sys /dev /new
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in %(modules)s; do
    /bin/busybox insmod /modules/$m ||
        echo "@@EBPF_OTLP@@ {\"event\": \"insmod-failed\", \"module\": \"$m\"}"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox usleep 50000; i=$((i+1)); done
/bin/busybox mount -t ext4 -o ro /dev/vda /new || echo '@@EBPF_OTLP@@ {"event": "no-root-image"}'
/bin/busybox mount -t proc proc /new/proc
/bin/busybox mount -t sysfs sysfs /new/sys
/bin/busybox mount -t devtmpfs devtmpfs /new/dev
/bin/busybox mount -t tmpfs tmpfs /new/tmp
/bin/busybox mount -t tmpfs tmpfs /new/run
/bin/busybox mount -t tmpfs tmpfs /new/root
/bin/busybox mount --bind /src /new/src
/bin/busybox mount -t tracefs tracefs /new/sys/kernel/tracing
/bin/busybox mount -t bpf bpf /new/sys/fs/bpf
/bin/busybox mkdir -p /new/sys/fs/cgroup
/bin/busybox mount -t tmpfs cgroup /new/sys/fs/cgroup
/bin/busybox mkdir -p /new/sys/fs/cgroup/unified
/bin/busybox mount -t cgroup2 cgroup2 /new/sys/fs/cgroup/unified
/bin/busybox ip link set lo up
/bin/busybox hostname guest
echo '@@EBPF_OTLP@@ {"event": "userspace-up"}'
/bin/busybox chroot /new /bin/busybox env -i PATH=/bin:/usr/bin HOME=/root \
    PYTHONPATH=/src:/site-packages PYTHONDONTWRITEBYTECODE=1 %(env)s \
    /usr/bin/python3 -u /src/guest_check.py %(args)s
echo "@@EBPF_OTLP@@ {\"event\": \"check-exited\", \"rc\": $?}"
/bin/busybox poweroff -f
"""


def build_initramfs(kernel: Kernel, check_args: list[str], extra_objects: dict[str, bytes],
                    env: dict[str, str], timings: Timings) -> Path:
    """busybox + modules + /init + the project's package and check script."""
    t0 = time.monotonic()
    c = Cpio()
    c.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    names = []
    for name, data in kernel.modules_in_order(MODULES):
        c.file(f"modules/{name}.ko", data)
        names.append(f"{name}.ko")
    c.tree(ROOT / "src/ebpf_otlp", "src/ebpf_otlp", skip={"__pycache__"})
    c.file("src/guest_check.py", (HERE / "guest_check.py").read_bytes())
    for name, data in extra_objects.items():
        c.file(f"src/extra/{name}", data)
    c.dir("src/extra")
    envs = " ".join(f"{k}={v}" for k, v in env.items())
    c.file("init", (INIT % {"modules": " ".join(names), "args": " ".join(check_args),
                            "env": envs}).encode(), 0o755)
    out = CACHE / f"initramfs.{os.getpid()}.cpio"  # per run: runs may overlap
    out.write_bytes(c.bytes())
    timings.add("initramfs", t0)
    return out


# --- booting -------------------------------------------------------------------------

@dataclass
class GuestRun:
    kernel: Kernel
    console: str
    events: list[dict]
    timings: Timings

    def find(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]


def parse_events(console: str) -> list[dict]:
    out = []
    for line in console.splitlines():
        i = line.find(RESULT_PREFIX)
        if i < 0:
            continue
        try:
            out.append(json.loads(line[i + len(RESULT_PREFIX):]))
        except json.JSONDecodeError:
            out.append({"event": "garbled", "line": line})
    return out


def boot(check_args: list[str], *, extra_objects: dict[str, bytes] | None = None,
         env: dict[str, str] | None = None, timeout_s: float = 240) -> GuestRun:
    """Fetch and boot the second kernel, run guest_check.py there, collect its events."""
    missing = missing_tools()
    if missing:
        raise Unavailable("missing host tools: " + ", ".join(missing))
    timings = Timings()
    kernel = fetch_kernel(timings)
    image = build_base_image(timings)
    initrd = build_initramfs(kernel, check_args, extra_objects or {}, env or {}, timings)
    t0 = time.monotonic()
    # -cpu max: numpy's wheels need x86-64-v2 instructions the default model lacks.
    cmd = [QEMU, "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1", "-nographic",
           "-no-reboot",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
           "-drive", f"file={image},format=raw,if=virtio,readonly=on",
           "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        console = r.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        console = (e.stdout or b"").decode("utf-8", "replace")
        console += f"\n[host] QEMU killed after {timeout_s:.0f} s\n"
    timings.add("boot+check", t0)
    initrd.unlink(missing_ok=True)
    return GuestRun(kernel, console, parse_events(console), timings)


# --- the tier's own negative control ---------------------------------------------------

def tracepoint_field_offset(category: str, name: str, field_name: str) -> int:
    """Offset of ``field_name`` in this host's tracepoint record (tracefs format)."""
    from ebpf_otlp.platform.mounts import ensure_tracefs

    fmt = Path(ensure_tracefs(), "events", category, name, "format").read_text()
    m = re.search(rf"field:[^;]*\b{field_name};\s*offset:(\d+);", fmt)
    if not m:
        raise RuntimeError(f"{category}:{name} has no field {field_name}")
    return int(m.group(1))


def build_nonportable(out_dir: Path) -> Path:
    """Compile nonportable.bpf.c with the host's kfree_skb ``reason`` offset baked in."""
    clang = shutil.which("clang-19") or shutil.which("clang")
    if clang is None:
        raise Unavailable("clang is missing (clang-19)")
    off = tracepoint_field_offset("skb", "kfree_skb", "reason")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "nonportable.bpf.o"
    _run(clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", f"-DREASON_OFF={off}",
         "-Wall", "-Werror", "-I", str(ROOT / "vmlinux/x86"), "-c",
         str(HERE / "nonportable.bpf.c"), "-o", str(out))
    return out


def main(argv: list[str]) -> int:
    """Boot the guest by hand: ``python tests/kernels/guestvm.py [--add FILE.bpf.o]...
    [guest_check args]``; added objects land in the guest's /src/extra (check
    them with ``--objects /src/extra``)."""
    sys.path.insert(0, str(HERE))
    import results

    extra: dict[str, bytes] = {}
    while len(argv) >= 2 and argv[0] == "--add":
        extra[Path(argv[1]).name] = Path(argv[1]).read_bytes()
        argv = argv[2:]
    try:
        g = boot(argv, extra_objects=extra)
    except Unavailable as e:
        print(f"second kernel unavailable: {e}", file=sys.stderr)
        return 2
    if os.environ.get("V") == "1":
        print(g.console)
    run = results.KernelRun("guest", g.events, g.timings.steps)
    print(results.table(run))
    return 0 if run.finished else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
