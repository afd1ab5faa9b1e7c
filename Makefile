# ebpf-otlp build. `make V=1` shows the commands.
.DELETE_ON_ERROR:
.PHONY: all build vmlinux wheel test test-unit test-kernel test-kernels bench demo clean lint

ARCH ?= x86
CLANG ?= $(shell command -v clang-19 || command -v clang)
LLVM_STRIP ?= $(shell command -v llvm-strip-19 || command -v llvm-strip)
BPFTOOL ?= bpftool
PYTHON ?= .venv/bin/python
OUT := src/ebpf_otlp/bpf
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.bpf.c,$(OUT)/%.bpf.o,$(BPF_SRCS))
BPF_HDRS := $(wildcard bpf/*.h)
# Record headers (not *.bpf.h) are package data too: Python reads its layouts from them.
REC_HDRS := $(patsubst bpf/%.h,$(OUT)/%.h,$(filter-out %.bpf.h,$(BPF_HDRS)))
# Hubble bridge: Python stubs generated from Cilium's .proto files (proto/cilium/README.md).
HUBBLE_PROTOS := $(wildcard proto/cilium/*/*.proto)
HUBBLE_STUBS := src/ebpf_otlp/signals/hubble/_proto
BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	-Wno-unused-function -I bpf -I vmlinux/$(ARCH)

ifeq ($(V),1)
Q :=
else
Q := @
endif

all: build

build: $(BPF_OBJS) $(REC_HDRS) $(HUBBLE_STUBS)/observer/observer_pb2_grpc.py

$(HUBBLE_STUBS)/observer/observer_pb2_grpc.py: $(HUBBLE_PROTOS) scripts/gen_hubble_proto.py
	@echo "  PROTO $(HUBBLE_STUBS)"
	$(Q)$(PYTHON) scripts/gen_hubble_proto.py $(HUBBLE_STUBS)
	$(Q)touch $@

$(OUT)/%.h: bpf/%.h
	@mkdir -p $(OUT)
	$(Q)cp $< $@

$(OUT)/%.bpf.o: bpf/%.bpf.c $(BPF_HDRS) vmlinux/$(ARCH)/vmlinux.h
	@test -n "$(CLANG)" || { echo "clang not found: apt-get install clang-19 llvm-19" >&2; exit 1; }
	@mkdir -p $(OUT)
	@echo "  BPF  $@"
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@.tmp
	$(Q)$(LLVM_STRIP) -g $@.tmp -o $@
	$(Q)rm -f $@.tmp

vmlinux:
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(ARCH)/vmlinux.h

wheel: build
	$(PYTHON) -m pip wheel --no-deps -w dist .

test: build
	$(PYTHON) -m pytest -q tests

test-unit:
	$(PYTHON) -m pytest -q tests -m "not kernel"

test-kernels: build
	$(PYTHON) -m pytest -q tests/kernels

bench: build
	$(PYTHON) -m bench

demo: build
	$(PYTHON) -m ebpf_otlp.demo

lint:
	$(PYTHON) -m ruff check src tests bench

clean:
	rm -rf $(OUT)/*.bpf.o $(HUBBLE_STUBS) dist build *.egg-info src/*.egg-info
