#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine, as root:
# the network tools and strongSwan (the reference peer) from apt, and the project with its test
# extra into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/bootstrap.sh: run as root (the tests build network namespaces)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    iproute2 nftables iputils-ping iperf3 tcpdump procps \
    strongswan-charon strongswan-swanctl libcharon-extra-plugins >/dev/null

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "tests/bootstrap.sh: ready; run .venv/bin/pytest"
