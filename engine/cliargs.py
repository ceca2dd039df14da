"""What every ``coupon-engine`` subcommand shares: the flags that say which engine it
acts on, and the one-line refusal (contract section 4: exit 2, one line)."""

from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--redis-url, --redis-cluster, --data-dir: the same engine as a running ``serve``."""
    p.add_argument("--redis-url", help="Redis URL (else COUPON_REDIS_URL, else embedded);"
                   " redis+cluster://HOST:PORT names a Redis Cluster seed node")
    p.add_argument("--redis-cluster", action="store_true",
                   help="the --redis-url is a seed node of a Redis Cluster"
                        " (else COUPON_REDIS_CLUSTER)")
    p.add_argument("--data-dir", help="data directory (else COUPON_DATA_DIR, ./var)")


def fail(reason: str, status: int = 2) -> int:
    """Print ``reason`` as one line on stderr; return the exit status."""
    print(f"coupon-engine: {reason}", file=sys.stderr)
    return status
