import json, time, sys
t0=time.monotonic()
def ev(**k): print("@@EBPF_OTLP@@ "+json.dumps(k), flush=True)
ev(event="py-start")
import numpy; ev(event="numpy", t=time.monotonic()-t0)
import ebpf_otlp.bpfobj; ev(event="bpfobj", t=time.monotonic()-t0)
import ebpf_otlp.agent; ev(event="agent", t=time.monotonic()-t0)
import ebpf_otlp.receiver; ev(event="receiver", t=time.monotonic()-t0)
from ebpf_otlp.bpfobj import BpfObject
o = BpfObject.open_file("/src/ebpf_otlp/bpf/selftest.bpf.o")
o.load(); ev(event="loaded", progs=list(o.programs), t=time.monotonic()-t0)
