"""The ledger wing: the durable SQLite record money is paid from, and what works on it.

``db.py`` the ledger itself; ``archiver.py`` moves the event streams into it;
``reconcile.py`` venue claims, settlement and statement; ``replay.py`` and
``restore.py`` rebuild Redis from it; ``guard.py`` refuses to load or serve a
campaign over lost state; ``csvsafe.py`` writes spreadsheet-safe CSV; ``report.py``
the round report; ``cli.py`` its commands (argparse only).
Never imports aiohttp (tests/test_layout.py); reconcile, settle and statement
run with Redis down.
"""

from __future__ import annotations

from .db import CouponRow, EventRow, Ledger, LedgerError, Settlement, ledger_event_id

__all__ = ["CouponRow", "EventRow", "Ledger", "LedgerError", "Settlement", "ledger_event_id"]
