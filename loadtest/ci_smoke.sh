#!/usr/bin/env bash
# Locust smoke test for CI: an embedded engine on 127.0.0.1, a round opening a few
# seconds in (300 coupons over 5 venues), a ~20 s headless spike, the end-of-run
# invariant check. Exit status is locust's: non-zero when a threshold or check fails.
#
# Usage: bash loadtest/ci_smoke.sh          (from anywhere; needs .venv with locust)
# Tunables: SMOKE_PEAK_USERS (400), SMOKE_STOCK (300), SMOKE_WORKERS (2), SMOKE_TIMEOUT (120)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LOCUST="${LOCUST:-$ROOT/.venv/bin/locust}"
REPORTS="$ROOT/loadtest/reports"
TMP="$(mktemp -d)"
ENGINE_PID=""

cleanup() {
  if [[ -n "$ENGINE_PID" ]] && kill -0 "$ENGINE_PID" 2>/dev/null; then
    kill -TERM "$ENGINE_PID"
    # serve drains its workers and shuts Redis down; give it a bounded time.
    for _ in $(seq 1 300); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$ENGINE_PID" 2>/dev/null && kill -KILL "$ENGINE_PID"
    wait "$ENGINE_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# Throwaway secrets unless the caller set them: the engine and locust read the same env.
export COUPON_MEMBER_JWT_SECRET="${COUPON_MEMBER_JWT_SECRET:-$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')}"
export COUPON_ADMIN_TOKEN="${COUPON_ADMIN_TOKEN:-$("$PY" -c 'import secrets; print("adm_" + secrets.token_urlsafe(24))')}"
export COUPON_DATA_DIR="$TMP/var"
unset COUPON_REDIS_URL COUPON_CAMPAIGN COUPON_HOST COUPON_PORT COUPON_WORKERS
# The smoke test is about correctness under a spike, not the per-member limiter.
export COUPON_LOG_LEVEL="${COUPON_LOG_LEVEL:-WARNING}"

PORT="$("$PY" "$ROOT/loadtest/support.py" free-port)"
HOST="http://127.0.0.1:$PORT"
# The round opens 8 s from now: ~3-5 s for the engine to come up, ~3 s of early birds.
"$PY" "$ROOT/loadtest/support.py" campaign "$TMP/campaign.toml" --opens-in 8 \
  --stock "${SMOKE_STOCK:-300}" --venues 5

cd "$ROOT"
"$PY" -m engine.cli serve --campaign "$TMP/campaign.toml" --host 127.0.0.1 --port "$PORT" \
  --workers "${SMOKE_WORKERS:-2}" 2>"$TMP/engine.log" &
ENGINE_PID=$!

ready=0
for _ in $(seq 1 200); do
  if ! kill -0 "$ENGINE_PID" 2>/dev/null; then break; fi
  if curl -fsS "$HOST/readyz" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.1
done
if [[ $ready != 1 ]]; then
  echo "ci_smoke: engine did not become ready" >&2
  cat "$TMP/engine.log" >&2
  exit 1
fi

mkdir -p "$REPORTS"
rc=0
LOCUST_PEAK_USERS="${SMOKE_PEAK_USERS:-400}" LOCUST_AFTER_OPEN="${SMOKE_AFTER_OPEN:-12}" \
LOCUST_VENUE_USERS=5 \
timeout --signal=INT --kill-after=15 "${SMOKE_TIMEOUT:-120}" \
  "$LOCUST" -f "$ROOT/loadtest/locustfile.py" --headless --host "$HOST" \
  --stop-timeout 5 --only-summary --loglevel WARNING \
  --csv "$REPORTS/smoke" --html "$REPORTS/smoke.html" || rc=$?

if [[ $rc != 0 ]]; then
  echo "ci_smoke: locust exited $rc; engine log tail:" >&2
  tail -n 30 "$TMP/engine.log" >&2
fi
exit "$rc"
