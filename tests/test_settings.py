"""Every setting validated in one place (engine/config.py), refused as the contract
says (exit 2, one line naming the setting), from the command line as an operator
types it: flags, environment variables, secrets, --version."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from test_serve import env_for, free_port

from engine.cli import main
from engine.config import OPTIONS, Settings, from_env

CLI = [sys.executable, "-m", "engine.cli"]
# serve is pointed at a Redis that does not exist: were a refusal missing, it would
# fail to connect and exit (after its retries) instead of starting an engine.
NOWHERE = ["--redis-url", "unix:///nonexistent/redis.sock"]
STRONG = "s" * 32
TOKEN = "t" * 16


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coupon-engine: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def cli(tmp: Path, *args: str, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**env_for(tmp / "var"), **(env or {})},
                          capture_output=True, text=True, timeout=90)


def test_serve_refuses_a_port_it_cannot_listen_on(tmp_path: Path) -> None:
    """--port 99999 used to bind 34463 while the log said 99999."""
    for port, why in (("99999", "must be 1..65535"), ("0", "must be 1..65535"),
                      ("abc", "not an integer"), ("80.5", "not an integer")):
        refused(cli(tmp_path, "serve", *NOWHERE, "--port", port), f"--port {port}: {why}")
    refused(cli(tmp_path, "serve", *NOWHERE, "--port", str(free_port()), "--workers", "0"),
            "--workers 0: must be 1..256")
    refused(cli(tmp_path, "campaign", "load", "x.toml", "--stock-shards", "65"),
            "--stock-shards 65: must be 1..64")
    assert not (tmp_path / "var").exists()  # nothing was started, nothing written


def test_an_environment_value_that_is_not_a_number_is_one_line(tmp_path: Path) -> None:
    """COUPON_PORT=abc used to print a traceback."""
    refused(cli(tmp_path, "serve", *NOWHERE, env={"COUPON_PORT": "abc"}),
            "COUPON_PORT=abc: not an integer")
    refused(cli(tmp_path, "token", "admin", env={"COUPON_REDIS_TIMEOUT": "soon"}),
            "COUPON_REDIS_TIMEOUT=soon: not a number")
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("var, value, why", [
    ("COUPON_PORT", "65536", "must be 1..65535"),
    ("COUPON_PORT", "-1", "must be 1..65535"),
    ("COUPON_PORT", "８０８０", "not an integer"),
    ("COUPON_WORKERS", "0", "must be 1..256"),
    ("COUPON_WORKERS", "1_000", "not an integer"),
    ("COUPON_STOCK_SHARDS", "0", "must be 1..64"),
    ("COUPON_REDIS_TIMEOUT", "0", "must be a positive number"),
    ("COUPON_REDIS_TIMEOUT", "-1", "must be a positive number"),
    ("COUPON_REDIS_TIMEOUT", "nan", "not a number"),
    ("COUPON_REDIS_TIMEOUT", "inf", "not a number"),
    ("COUPON_MEMBER_RATE", "0", "must be a positive number"),
    ("COUPON_MEMBER_BURST", "0", "must be at least 1"),
    ("COUPON_VENUE_BAD_CODE_LIMIT", "0", "must be at least 1"),
    ("COUPON_PROGRESS_AFTER", "-1", "must be 0 or more"),
    ("COUPON_LOG_LEVEL", "loud", "not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("COUPON_ARCHIVER", "maybe", "not one of 1/0"),
    ("COUPON_EVENT_LOOP", "trio", "not one of uvloop, asyncio"),
    ("COUPON_GC_THRESHOLDS", "700,10", "must be three integers a,b,c"),
    ("COUPON_GC_THRESHOLDS", "0,10,10", "must be 100..10000000, 1..1000, 1..1000"),
    ("COUPON_GC_THRESHOLDS", "50000,20,0", "must be 100..10000000, 1..1000, 1..1000"),
    ("COUPON_REDIS_CLUSTER", "2", "not one of 1/0"),
    ("COUPON_ALLOW_UNSAFE_REDIS", "sure", "not one of 1/0"),
    ("COUPON_ALLOW_WEAK_SECRETS", "y", "not one of 1/0"),
    ("COUPON_REDIS_URL", "http://127.0.0.1:6379", "the scheme must be one of"),
    ("COUPON_REDIS_URL", "127.0.0.1:6379", "the scheme must be one of"),
    ("COUPON_HOST", "   ", "empty"),
    ("COUPON_DATA_DIR", "  ", "empty"),
    ("COUPON_REDIS_POOL_SIZE", "0", "must be 1..10000"),
    ("COUPON_CLIENT_TIMEOUT", "soon", "not a number"),
    ("COUPON_MAX_CONNECTIONS", "1000001", "must be 1..1000000"),
])
def test_every_setting_is_checked(var: str, value: str, why: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in [k for k in os.environ if k.startswith("COUPON_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(var, value)
    # `token admin` reads the settings and, were they accepted, would print a token.
    assert main(["token", "admin", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.splitlines()
    assert lines == [f"coupon-engine: {var}={value}: {why}" + lines[0].split(why, 1)[1]]


def test_every_variable_of_the_table_is_read() -> None:
    """The README's table and the code agree: each variable sets its field."""
    env = {"COUPON_DATA_DIR": "/srv/c", "COUPON_REDIS_URL": "redis+cluster://10.0.0.5:7000",
           "COUPON_REDIS_CLUSTER": "yes", "COUPON_STOCK_SHARDS": "3", "COUPON_HOST": "0.0.0.0",
           "COUPON_PORT": "9090", "COUPON_WORKERS": "4", "COUPON_CAMPAIGN": "c.toml",
           "COUPON_ALLOW_UNSAFE_REDIS": "on", "COUPON_MEMBER_JWT_SECRET": STRONG,
           "COUPON_ADMIN_TOKEN": TOKEN, "COUPON_ALLOW_WEAK_SECRETS": "0",
           "COUPON_REDIS_TIMEOUT": "0.25", "COUPON_MEMBER_RATE": "2.5",
           "COUPON_MEMBER_BURST": "4", "COUPON_VENUE_BAD_CODE_LIMIT": "7",
           "COUPON_ARCHIVER": "false", "COUPON_LOG_LEVEL": "warning",
           "COUPON_PROGRESS_AFTER": "0", "COUPON_REDIS_POOL_SIZE": "64",
           "COUPON_CLIENT_TIMEOUT": "5", "COUPON_KEEPALIVE_TIMEOUT": "30",
           "COUPON_MAX_CONNECTIONS": "500", "COUPON_MEMBER_JWT_LEEWAY": "0",
           "COUPON_METRICS_TOKEN": "m3trics", "COUPON_EVENT_LOOP": "AsyncIO",
           "COUPON_GC_THRESHOLDS": "700, 10,10",
           "COUPON_ADMIN_TOKENS": "alice:0123456789abcdef,bob:fedcba9876543210"}
    assert set(env) == {o.env for o in OPTIONS}
    s = from_env(env)
    assert s == Settings(
        data_dir=Path("/srv/c"), redis_url="redis+cluster://10.0.0.5:7000", redis_cluster=True,
        stock_shards=3, host="0.0.0.0", port=9090, workers=4, campaign_file=Path("c.toml"),
        allow_unsafe_redis=True, member_jwt_secret=STRONG, admin_token=TOKEN,
        redis_timeout=0.25, member_rate=2.5, member_burst=4, venue_bad_code_limit=7,
        archiver=False, log_level="WARNING", progress_after_s=0.0, redis_pool_size=64,
        client_timeout_s=5.0, keepalive_timeout_s=30.0, max_connections=500,
        member_jwt_leeway_s=0.0, metrics_token="m3trics", event_loop="asyncio",
        gc_thresholds=(700, 10, 10),
        admin_tokens=(("alice", "0123456789abcdef"), ("bob", "fedcba9876543210")))
    assert from_env({}) == Settings()


def test_short_secrets_are_refused_unless_development_says_so(tmp_path: Path) -> None:
    secret31, secret32 = "k" * 31, "k" * 32
    line = refused(cli(tmp_path, "token", "member", "alice",
                       env={"COUPON_MEMBER_JWT_SECRET": secret31}),
                   "COUPON_MEMBER_JWT_SECRET", "at least 32 bytes, got 31",
                   "COUPON_ALLOW_WEAK_SECRETS=1")
    assert secret31 not in line  # a secret is never echoed
    refused(cli(tmp_path, "token", "admin", env={"COUPON_ADMIN_TOKEN": "x" * 15}),
            "COUPON_ADMIN_TOKEN", "at least 16 characters, got 15")
    refused(cli(tmp_path, "serve", *NOWHERE, "--port", str(free_port()),
                env={"COUPON_MEMBER_JWT_SECRET": "abc", "COUPON_ADMIN_TOKEN": TOKEN}),
            "COUPON_MEMBER_JWT_SECRET")
    # Bytes, not characters: eleven Chinese characters are 33 bytes.
    ok = cli(tmp_path, "token", "member", "alice", env={"COUPON_MEMBER_JWT_SECRET": "冰" * 11})
    assert ok.returncode == 0, ok.stderr
    ok = cli(tmp_path, "token", "member", "alice", env={"COUPON_MEMBER_JWT_SECRET": secret32})
    assert ok.returncode == 0 and ok.stdout.count(".") == 2, ok.stderr
    ok = cli(tmp_path, "token", "admin", env={"COUPON_ADMIN_TOKEN": "x" * 16})
    assert ok.returncode == 0 and ok.stdout.strip() == "x" * 16
    # The development waiver, by variable or (for serve) by flag.
    ok = cli(tmp_path, "token", "admin",
             env={"COUPON_ADMIN_TOKEN": "x", "COUPON_ALLOW_WEAK_SECRETS": "1"})
    assert ok.returncode == 0 and ok.stdout.strip() == "x"
    proc = cli(tmp_path, "serve", *NOWHERE, "--allow-weak-secrets", "--port", "0",
               env={"COUPON_ADMIN_TOKEN": "x"})
    refused(proc, "--port 0")  # past the secrets: the next check is the one refused


def test_version_and_unknown_flags(tmp_path: Path) -> None:
    proc = cli(tmp_path, "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"coupon-engine {metadata.version('coupon-engine')}"
    refused(cli(tmp_path, "serve", *NOWHERE, "--prot", "8080"), "unrecognized arguments: --prot")
    refused(cli(tmp_path, "reconcile", "--venue", "V01"), "reconcile: the following arguments"
            " are required: --claims")


def test_a_worker_sizes_the_collector_from_its_settings() -> None:
    """The worker's start-up applies COUPON_GC_THRESHOLDS (and freezes what start-up
    built); the default is the crowd's, not CPython's 700."""
    import gc

    from engine.http.worker import tune_collector

    before = gc.get_threshold()
    try:
        tune_collector(Settings())
        assert gc.get_threshold() == (50_000, 20, 10)
        assert gc.get_freeze_count() > 0
        tune_collector(from_env({"COUPON_GC_THRESHOLDS": "1234,5,6"}))
        assert gc.get_threshold() == (1234, 5, 6)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
