#!/bin/bash
# Set up a Debian 12 machine (as root) for ebpf-otlp, then run the demo or the tests.
#   bash scripts/bootstrap.sh demo    # packages, venv, build, then the demo
#   bash scripts/bootstrap.sh test    # packages, venv, build, then every test
# Safe to run again: each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"

if [ "$(id -u)" != 0 ]; then
    echo "bootstrap.sh: run as root (BPF, namespaces and apt need it)" >&2
    exit 1
fi

# Runtime: python3 + libbpf1. Build: clang, llvm-strip, make, libbpf headers.
# Tests: the real peers (dnsmasq, dig, nft, iperf3, ping), bpftool, QEMU for
# the second-kernel tier.
PKGS="python3 python3-venv python3-dev libbpf1 libbpf-dev make clang-19 llvm-19 gcc libc6-dev
      iproute2 procps ca-certificates"
if [ "$what" = test ] || [ "$what" = bench ]; then
    PKGS="$PKGS bpftool nftables iperf3 dnsutils dnsmasq-base iputils-ping ethtool bpftrace
          tcpdump libelf-dev zlib1g-dev qemu-system-x86 busybox-static e2fsprogs util-linux
          cpio xz-utils zstd kmod openssl nginx-light curl wrk libssl-dev"
fi
if [ "$what" = demo ]; then
    PKGS="$PKGS dnsmasq-base dnsutils iputils-ping"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $PKGS >/dev/null

# Debian's own python3: independent of whatever else is on PATH.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Install first: the build generates the Hubble stubs with grpcio-tools (a test extra).
.venv/bin/python -m pip install -q -e '.[test]'
make build

case "$what" in
    demo) exec .venv/bin/ebpf-otlp demo ;;
    test)
        .venv/bin/python -m ruff check src tests bench
        set +e
        .venv/bin/python -m pytest -q -p no:cacheprovider tests
        rc=$?
        # The lowest version of every dependency pyproject.toml allows: the unit tests again.
        if [ ! -x .venv-floor/bin/python ]; then
            /usr/bin/python3 -m venv .venv-floor
        fi
        .venv-floor/bin/python -m pip install -q --upgrade pip
        .venv-floor/bin/python -m pip install -q -c constraints/floor.txt -e '.[test]'
        .venv-floor/bin/python -m pytest -q -p no:cacheprovider -m "not kernel" tests
        rc2=$?
        # pytest's 5 means "no tests collected": that is a failure here too.
        [ $rc -eq 0 ] && rc=$rc2
        exit $rc ;;
    bench) exec make bench ;;
    setup) ;;
    *) echo "usage: bootstrap.sh demo|test|bench|setup" >&2; exit 2 ;;
esac
