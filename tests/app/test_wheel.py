"""The wheel carries the compiled objects: a clean virtualenv that never saw
the source tree or clang installs it and the agent's doctor runs from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kernel


def test_wheel_installs_in_clean_venv_and_runs() -> None:
    require(Path("/usr/bin/python3").exists(), "Debian's python3 is needed for a clean venv")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", d,
                        str(ROOT)], check=True, capture_output=True)
        wheel = next(Path(d).glob("ebpf_otlp-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        for sig in ("selftest", "flows", "tcp", "dns", "drops"):
            if (ROOT / "bpf" / f"{sig}.bpf.c").exists():
                assert f"ebpf_otlp/bpf/{sig}.bpf.o" in names
                assert f"ebpf_otlp/bpf/{sig}.h" in names
        venv = Path(d, "venv")
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], check=True,
                       capture_output=True)
        # No source tree, no compiler on PATH: only the wheel and libbpf.so.1.
        env = {"PATH": f"{venv}/bin:/usr/sbin:/sbin", "HOME": d}
        res = subprocess.run([str(venv / "bin/ebpf-otlp"), "doctor", "--json"], cwd=d, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["hooks"]["tracepoint"] == "ok"
        where = subprocess.run([str(venv / "bin/python"), "-c",
                                "import ebpf_otlp; print(ebpf_otlp.__file__)"], cwd=d, env=env,
                               capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(venv)), where
        assert not os.path.exists(Path(where).parent.parent.parent / "bpf")
