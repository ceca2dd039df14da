"""Schemathesis against the live engine, as CI runs it (`.ci/run`).

Starts `coupon-engine serve` on a free loopback port with a private data
directory (embedded Redis) and a campaign with an open, a scheduled and a
closed round; mints a member JWT, a venue key (V01) and the operator token with
`coupon-engine token ...`; then runs schemathesis over every operation of
`GET /openapi.json` twice:

1. with valid credentials (member, venue and admin, matched to each
   operation's security scheme): no 5xx, every status, content type, header and
   body as documented, secured operations refuse missing or invalid credentials
   (``ignored_auth``), other methods answer 405 with ``Allow``;
2. with no credentials: the same conformance checks, and every secured
   operation answers the contract's 401 ``unauthorized`` (our own check,
   ``scripts/schemathesis_hooks.py``).

The server is stopped by its pid. Exit status: 0 when both runs pass.

Usage: .venv/bin/python scripts/schemathesis_run.py
Tunables: ST_MAX_EXAMPLES (200), ST_SEED (random), ST_TIMEOUT (per run, 150 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "engine.cli"]
CST = timezone(timedelta(hours=8))

CHECKS_COMMON = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
                 "response_schema_conformance", "response_headers_conformance"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iso(dt: datetime) -> str:
    return dt.astimezone(CST).isoformat(timespec="milliseconds")


def campaign(now: datetime) -> str:
    """R0 closed, R1 open for the next hour, R2 scheduled; three venues."""
    venues = ["V01", "V02", "V03"]
    rounds = [("R0", now - timedelta(hours=3), now - timedelta(hours=2)),
              ("R1", now - timedelta(minutes=5), now + timedelta(hours=1)),
              ("R2", now + timedelta(hours=2), now + timedelta(hours=3))]
    out = ["[campaign]", 'id = "schemathesis"', 'name = "接口模糊测试"',
           'timezone = "Asia/Shanghai"', "budget_fen = 1_000_000_000",
           "face_value_fen = 10_000", "member_price_fen = 100", "settlement_fen = 9_900",
           "member_campaign_quota = 500", ""]
    for v in venues:
        out += ["[[venues]]", f'id = "{v}"', f'name = "场馆{v}"', 'kind = "ski"',
                'city = "吉林市"', ""]
    for rid, opens, closes in rounds:
        out += ["[[rounds]]", f'id = "{rid}"', f"opens_at = {iso(opens)}",
                f"closes_at = {iso(closes)}", "member_round_quota = 200",
                f"valid_from = {iso(now - timedelta(days=1))}",
                f"valid_until = {iso(now + timedelta(days=30))}", "[rounds.stock]"]
        out += [f'{v} = {300 if v != "V03" else 0}' for v in venues]
        out.append("")
    return "\n".join(out)


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("engine did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid (serve drains, then shuts its Redis down); SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def token(env: dict[str, str], *args: str) -> str:
    return subprocess.run([*CLI, "token", *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def schemathesis(url: str, *, checks: list[str], config: Path | None, phases: str,
                 env: dict[str, str], cwd: Path, timeout: float) -> int:
    st = [str(BIN / "st")]
    if config is not None:
        st += ["--config-file", str(config)]
    cmd = [*st, "run", url, "--checks", ",".join(checks), "--phases", phases,
           "--max-examples", os.environ.get("ST_MAX_EXAMPLES", "200"),
           "--max-response-time", "2", "--request-timeout", "5",
           # One worker: with several, schemathesis's threads call ast.parse
           # concurrently (hypothesis describing lambdas) and CPython 3.11 before
           # 3.11.9 races on the AST recursion counter ("AST constructor
           # recursion depth mismatch", gh-106905), a runtime error that failed CI.
           "--workers", "1",
           "--max-failures", "20"]
    if seed := os.environ.get("ST_SEED"):
        cmd += ["--seed", seed]
    print("+", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"schemathesis: run exceeded {timeout:.0f} s", file=sys.stderr)
        return 1


def main() -> int:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="schemathesis-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update(COUPON_DATA_DIR=str(tmp / "var"), COUPON_LOG_LEVEL="WARNING",
               # Rate limits have their own tests (tests/test_abuse.py); here they would
               # only hide the paths behind them after the first few requests.
               COUPON_MEMBER_RATE="100000", COUPON_MEMBER_BURST="100000",
               COUPON_VENUE_BAD_CODE_LIMIT="1000000")
    camp = tmp / "campaign.toml"
    camp.write_text(campaign(datetime.now(UTC)), encoding="utf-8")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen([*CLI, "serve", "--campaign", str(camp), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            env=env, cwd=ROOT, stderr=log, stdout=log)
    rc = 1
    try:
        wait_ready(base, proc)
        member, venue, admin = (token(env, "member", "st-member", "--ttl", "7200"),
                                token(env, "venue", "V01"), token(env, "admin"))
        # The config lives apart from the runs' working folder: schemathesis looks for
        # schemathesis.toml in the working folder, and the run without credentials
        # must not find it.
        (tmp / "auth").mkdir()
        (tmp / "run").mkdir()
        config = tmp / "auth" / "schemathesis.toml"
        config.write_text("\n".join(
            f'[auth.openapi.{scheme}]\nbearer = "${{ST_{scheme.upper()}_TOKEN}}"'
            for scheme in ("member", "venue", "admin")) + "\n")
        st_env = {**env, "ST_MEMBER_TOKEN": member, "ST_VENUE_TOKEN": venue,
                  "ST_ADMIN_TOKEN": admin}
        timeout = float(os.environ.get("ST_TIMEOUT", "150"))
        print("== schemathesis with valid credentials", flush=True)
        authed = schemathesis(
            base + "/openapi.json", config=config, env=st_env, cwd=tmp / "run", timeout=timeout,
            phases="examples,coverage,fuzzing,stateful",
            checks=[*CHECKS_COMMON, "ignored_auth", "unsupported_method"])
        print("== schemathesis without credentials", flush=True)
        anon_env = {**env, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"),
                                                                env.get("PYTHONPATH")]))}
        anon = schemathesis(
            base + "/openapi.json", config=None, env=anon_env, cwd=tmp / "run", timeout=timeout,
            phases="examples,coverage,fuzzing",
            checks=[*CHECKS_COMMON, "refused_unauthenticated"])
        if proc.poll() is not None:
            print(f"schemathesis: serve died during the run ({proc.returncode})",
                  file=sys.stderr)
            authed = authed or 1
        rc = 1 if (authed or anon) else 0
        print(f"schemathesis: with credentials rc={authed}, without rc={anon}, "
              f"{time.monotonic() - t0:.0f} s in all", flush=True)
    finally:
        stop(proc)
        log.close()
        if rc != 0:
            print("schemathesis: engine log tail:", file=sys.stderr)
            lines = (tmp / "serve.log").read_text(errors="replace").splitlines()
            print("\n".join(lines[-40:]), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
