#!/usr/bin/env bash
# Installs the Debian packages the engine and its tests need, when missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null || need+=(redis-tools)  # redis-cli builds the test cluster
command -v curl >/dev/null || need+=(curl)
# Fault tests (tests/test_faults.py): strace traces the AOF's fsyncs, libfaketime skews clocks.
command -v strace >/dev/null || need+=(strace)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(faketime)
# Browser tests (tests/test_browser.py, tests/test_report.py): Debian's Chromium, driven
# by Playwright (never a downloaded browser), and a CJK font so the zh-CN pages and the
# round report render (and screenshot) as members and operators see them.
command -v chromium >/dev/null || need+=(chromium)
[ -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || need+=(fonts-noto-cjk)
if [ "${WITH_OPS_TOOLS:-0}" = 1 ]; then
  command -v prometheus >/dev/null || need+=(prometheus)
  command -v wrk >/dev/null || need+=(wrk)
  # loadtest/ir_probe.py counts instructions per request under cachegrind.
  command -v valgrind >/dev/null || need+=(valgrind)
  # Dashboards and alerts (tests/test_dashboards.py, tests/test_alerting.py).
  command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
  command -v prometheus-redis-exporter >/dev/null || need+=(prometheus-redis-exporter)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts a system redis-server on install; the engine never uses it.
else
  echo "missing: ${need[*]}; install with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
