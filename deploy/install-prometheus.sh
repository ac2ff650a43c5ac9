#!/usr/bin/env bash
# Install Prometheus (server + promtool) from Debian's `prometheus` package, for the deploy tests.
#
# - Does nothing when `promtool` and `prometheus` are already on PATH.
# - Needs root and a working apt-get; runs non-interactively and does not start the service
#   (policy-rc.d forbids service starts while the package installs).
# - Exits non-zero with one clear line when it cannot install; `make test` tolerates that and
#   the tests that need promtool/prometheus skip with the reason.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have promtool && have prometheus; then
    echo "install-prometheus: promtool and prometheus already installed ($(command -v promtool))"
    exit 0
fi

fail() { echo "install-prometheus: $*; tests that need promtool/prometheus will be skipped" >&2; exit 1; }

have apt-get || fail "apt-get not found (not a Debian/Ubuntu system); install Prometheus 2.x by hand"
[ "$(id -u)" -eq 0 ] || fail "must run as root to apt-get install prometheus (try: sudo bash $0)"

export DEBIAN_FRONTEND=noninteractive
# Keep the package's postinst from starting prometheus.service (or anything else) on this machine.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install-prometheus: apt-get update"
apt-get update -qq || fail "apt-get update failed (no network or no package mirror reachable)"
echo "install-prometheus: apt-get install prometheus"
apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    prometheus >/dev/null || fail "apt-get install prometheus failed"

# Belt and braces: if an init system started it anyway, stop it again.
if have systemctl && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
if [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

have promtool || fail "package installed but promtool is not on PATH"
echo "install-prometheus: installed $(promtool --version 2>&1 | head -n1)"
