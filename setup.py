"""Builds the BPF objects into the package when installing from source."""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildWithBpf(build_py):
    def run(self) -> None:
        objs = ROOT / "src" / "ebpf_otlp" / "bpf"
        have = list(objs.glob("*.bpf.o"))
        if (ROOT / "bpf").is_dir() and shutil.which("make"):
            clang = shutil.which("clang-19") or shutil.which("clang")
            if clang:
                subprocess.check_call(["make", "-C", str(ROOT), "build"])
            elif not have:
                raise SystemExit("ebpf-otlp: the BPF objects are not built and clang is missing: "
                                 "apt-get install clang-19 llvm-19, or install a built wheel")
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
