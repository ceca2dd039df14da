"""Long runs of archive and restore show their progress on stderr when it is a
terminal, and stdout keeps carrying only their result (reconcile and settle:
tests/test_claims_files.py). COUPON_PROGRESS_AFTER=0 shows it from the start, so
that the test does not depend on how fast the machine is."""

from __future__ import annotations

from pathlib import Path

import redis
from test_claims_files import run_child
from test_ledger import World, make_campaign, seed

from engine.ledger import archiver

NOW = {"COUPON_PROGRESS_AFTER": "0"}


def test_archive_and_restore_show_progress_on_a_terminal_only(redis_url: str,
                                                              tmp_path: Path) -> None:
    w = World(redis_url, make_campaign(stock=10_000))
    seed(w, 9 * archiver.BATCH // 5)  # with redeems and voids: three batches
    n = len(w.stream_ids())
    assert n > 2 * archiver.BATCH
    w.close()
    data = str(tmp_path / "data")
    _, out, err = run_child(["archive", "--redis-url", redis_url, "--data-dir", data],
                            tmp_path / "archive", tty=True, env_extra=NOW)
    assert out.startswith(f"archived {n} ") and out.count("\n") == 1, out
    assert f"\rcoupon-engine: archive: {archiver.BATCH:,} events" in err, err
    restore = ["restore", "--redis-url", redis_url, "--data-dir", data, "--batch", "1000"]
    for tty, again in ((True, "restore"), (False, "again")):
        r = redis.Redis.from_url(redis_url)
        r.flushall()  # Redis lost everything
        r.close()
        _, out, err = run_child(restore, tmp_path / again, tty=tty, env_extra=NOW)
        assert out.startswith(f"restored campaign test-c: {n} ") and "\r" not in out, out
        if tty:
            assert "\rcoupon-engine: restore: 1,000 commands" in err, err
        else:
            assert err == "", err  # not a terminal: not a byte of progress
    # By default a short run shows nothing, terminal or not.
    _, out, err = run_child(["archive", "--redis-url", redis_url, "--data-dir", data],
                            tmp_path / "short", tty=True)
    assert out.startswith("archived 0 ") and err == "", err
