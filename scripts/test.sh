#!/usr/bin/env bash
# Run beckon's whole test suite: unit tests (no root needed) and the lab tests, which build
# real-NAT topologies in network namespaces (root, nftables, conntrack, python3).
#   sudo ./scripts/test.sh            # everything
#   sudo ./scripts/test.sh lab_udp    # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the lab tests need root (network namespaces, TUN, nftables): run it with sudo" >&2
  exit 1
fi
missing=""
for c in ip nft conntrack ping python3 cargo; do command -v "$c" >/dev/null || missing="$missing $c"; done
[ -e /usr/bin/python3 ] || missing="$missing /usr/bin/python3"
if [ -n "$missing" ]; then
  echo "test.sh: missing:$missing (apt-get install nftables conntrack iproute2 iputils-ping python3; cargo from rustup)" >&2
  exit 1
fi

# Release profile: the lab tests move real traffic; one build serves unit and lab tests.
before=$(ip netns list | awk '{print $1}' | grep '^bk-' | sort || true)
status=0
cargo test --release --no-fail-fast --all-targets "$@" || status=$?

# Namespaces the tests created and left (another lab running beside the tests is not ours).
left=$(comm -13 <(echo "$before") <(ip netns list | awk '{print $1}' | grep '^bk-' | sort) || true)
if [ -n "$left" ]; then
  echo "test.sh: namespaces left behind by the tests: $left" >&2
  status=1
fi
exit $status
