"""``make bench``: run every benchmark, print a table, write bench/results.json
and bench/RESULTS.md.

    python -m bench               # everything (~10 minutes)
    python -m bench --quick       # one short iteration of each (smoke)
    python -m bench --only ringbuf,pktcost
    python -m bench --list

With ``--only``, the other benchmarks' previous results stay in
results.json, so RESULTS.md always describes every benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .common import REPO, Result, command_for, have_root, machine
from .report import print_table, write_markdown

# Run order: the cheap, self-contained ones first.
BENCHMARKS = ["ringbuf", "pktcost", "kmem", "export", "datapath", "alternatives", "soak",
              "attribution"]
HERE = Path(__file__).resolve().parent


def _modules() -> dict[str, str]:
    """Benchmark name -> module; helpers' bench/<signal>_*.py join when they define run()."""
    mods = {name: f"bench.{name}" for name in BENCHMARKS}
    for path in sorted(HERE.glob("*.py")):
        stem = path.stem
        signal = stem.split("_")[0]
        if signal in ("flows", "tcp", "dns", "drops", "hubble", "http") and stem not in mods:
            try:
                mod = importlib.import_module(f"bench.{stem}")
            except Exception:  # a helper's file mid-edit must not stop the others
                continue
            if callable(getattr(mod, "run", None)) and hasattr(mod, "NAME"):
                mods[mod.NAME] = f"bench.{stem}"
    return mods


def run_one(name: str, module: str, quick: bool) -> Result:
    t0 = time.monotonic()
    try:
        mod = importlib.import_module(module)
        if getattr(mod, "NEEDS_ROOT", True) and not have_root():
            res = Result(name, getattr(mod, "TITLE", name), command_for(name, quick),
                         status="skipped")
            res.note("needs root (BPF, namespaces)")
        else:
            res = mod.run(quick)
    except Exception as e:
        res = Result(name, name, command_for(name, quick), status="error")
        res.note(f"{type(e).__name__}: {e}")
        res.raw["traceback"] = traceback.format_exc()
        traceback.print_exc()
    res.seconds = round(time.monotonic() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short iteration of each")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--out", default=str(HERE), help="directory for results.json/RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mods = _modules()
    if args.list:
        for name, mod in mods.items():
            print(f"{name:14s} {importlib.import_module(mod).TITLE}")
        return 0
    names = list(mods)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in mods]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(mods)}")
    out = Path(args.out)
    json_path = out / "results.json"
    previous: dict = {}
    if args.only and json_path.exists():
        try:
            previous = json.loads(json_path.read_text())
        except ValueError:
            previous = {}
    mach = machine()
    print(f"# ebpf-otlp benchmarks on {mach['cpu_model']} x{mach['cpus']}, "
          f"{mach['uname']}, {mach['date_utc']}", flush=True)
    results: dict[str, dict] = dict(previous.get("benchmarks", {}))
    order = [n for n in mods if n in names]
    for name in order:
        print(f"## {name} ...", flush=True)
        load = os.getloadavg()[0]
        res = run_one(name, mods[name], args.quick)
        res.raw["loadavg_1min_before"] = round(load, 2)
        res.raw["quick"] = args.quick
        res.raw["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results[name] = res.to_json()
        print_table([results[name]])
        if not args.no_write:  # after each benchmark: a crash later keeps what we have
            _write(out, mach, results, mods)
    print()
    print_table([results[n] for n in order])
    failed = [n for n in order if results[n]["status"] == "error"]
    return 1 if failed else 0


def _write(out: Path, mach: dict, results: dict[str, dict], mods: dict[str, str]) -> None:
    ordered = {n: results[n] for n in list(mods) + list(results) if n in results}
    doc = {"machine": mach, "command": "make bench (.venv/bin/python -m bench)",
           "repo": str(REPO), "benchmarks": ordered}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_markdown(out / "RESULTS.md", doc)


if __name__ == "__main__":
    sys.exit(main())
