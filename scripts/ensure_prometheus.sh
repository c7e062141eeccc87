#!/usr/bin/env bash
# Makes sure promtool and prometheus (Debian's `prometheus` package) are installed: the rules'
# unit tests run promtool, and the monitoring e2e test starts its own Prometheus on a free
# loopback port. The package's own service is never left running: nothing may listen on 9090
# system-wide because of the tests.
set -u

have() { command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; }

if have; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_prometheus: promtool/prometheus are missing and cannot be installed here (needs root and apt-get)" >&2
  if [[ "${CI:-}" == "true" || "${CI:-}" == "1" ]]; then
    exit 1
  fi
  echo "ensure_prometheus: the rules and monitoring tests will be skipped (they fail under CI=true)" >&2
  exit 0
fi

echo "ensure_prometheus: installing Debian's prometheus package (promtool and the server)"
export DEBIAN_FRONTEND=noninteractive
# Another apt run on the machine holds the lock for a while: wait for it rather than fail.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get update -qq >/dev/null
apt_get install -y -qq --no-install-recommends prometheus >/dev/null

# The package enables and may start its own server on :9090; the tests start their own.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [[ -x /etc/init.d/prometheus ]]; then
  /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

if ! have; then
  echo "ensure_prometheus: installing prometheus did not provide promtool and prometheus" >&2
  exit 1
fi
exit 0
