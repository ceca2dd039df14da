"""Every Redis key the engine uses, in one place (see docs/keys.md).

All keys of a campaign carry the hash tag ``{<campaign id>}``, so every
script call touches one Redis Cluster slot and never raises CROSSSLOT.

A campaign loaded with S > 1 stock shards (docs/cluster.md, "Stock shards")
keeps, for each shard s >= 1, its own copy of the per-shard keys under the tag
``{<campaign id>:<s>}``: another slot, usually another primary. Shard 0 is the
tag ``{<campaign id>}`` itself, so a one-shard campaign is exactly the layout
of before, and campaign-wide keys (the document, venue keys, the notify
channel) live there only. Campaign ids cannot hold ':' (campaign.ID_RE), so
no shard's tag is another campaign's.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "cpn"
# The one key outside any campaign: which campaign this Redis serves.
ACTIVE = f"{PREFIX}:active"


@dataclass(frozen=True, slots=True)
class Keys:
    campaign_id: str
    shard: int = 0

    @property
    def tag(self) -> str:
        if self.shard == 0:
            return f"{PREFIX}:{{{self.campaign_id}}}"
        return f"{PREFIX}:{{{self.campaign_id}:{self.shard}}}"

    def of_shard(self, shard: int) -> Keys:
        """The same campaign's keys in stock shard ``shard``."""
        return Keys(self.campaign_id, shard)

    @property
    def campaign(self) -> str:
        """Hash: the campaign's economics, quota and its JSON document; 'shards' (absent:
        1). In shards s >= 1 only 'quota' and the 'fingerprint' applied to that shard."""
        return f"{self.tag}:campaign"

    def round(self, round_id: str) -> str:
        """Hash: opens/closes/valid times (ms) and member_round_quota."""
        return f"{self.tag}:round:{round_id}"

    @property
    def stock(self) -> str:
        """Hash: '<round>:<venue>' -> remaining stock (one field per stock line)."""
        return f"{self.tag}:stock"

    @property
    def stats(self) -> str:
        """Hash: '<counter>:<round>:<venue>' -> count, counter one of initial, issued,
        void, returned_open, returned_closed, redeemed."""
        return f"{self.tag}:stats"

    def member(self, member_id: str) -> str:
        """Hash: 'total' and 'r:<round>' -> coupons the member was granted; 'c' -> the
        member's codes, newest first, concatenated (17 characters each)."""
        return f"{self.tag}:member:{member_id}"

    def member_coupons(self, member_id: str) -> str:
        """List: the member's codes, newest first, as grab.lua kept them before issue 19
        (now the member hash's 'c'); only read, for members granted before then."""
        return f"{self.tag}:mcoupons:{member_id}"

    def coupon(self, code: str) -> str:
        """Hash: one coupon's record, by canonical code."""
        return f"{self.tag}:coupon:{code}"

    def idempotency(self, member_id: str, key: str) -> str:
        """String: '<fingerprint>|<code>' of a granted request, 24 h."""
        return f"{self.tag}:idem:{member_id}:{key}"

    def venue_redemptions(self, venue_id: str) -> str:
        """Sorted set: codes redeemed at the venue, scored by redemption time (ms)."""
        return f"{self.tag}:vredeemed:{venue_id}"

    def venue_keys(self, venue_id: str) -> str:
        """Hash: venue API key id -> sha256 of the key."""
        return f"{self.tag}:vkeys:{venue_id}"

    @property
    def xfer_out(self) -> str:
        """Hash, in the donor shard: transfer id -> '<to shard>|<round>:<venue>|<n>|<ms>',
        stock taken out and not yet known to be credited (docs/cluster.md)."""
        return f"{self.tag}:xfer_out"

    @property
    def xfer_in(self) -> str:
        """Hash, in the receiving shard: transfer id -> '<round>:<venue>|<n>', every
        transfer credited here (kept, so a repeated credit is a no-op)."""
        return f"{self.tag}:xfer_in"

    @property
    def sold_out(self) -> str:
        """Hash, shard 0 only: '<round>:<venue>' -> ms (Redis time) when a state poller
        first saw the line's stock, summed over shards, at 0 while its round was open.
        Monitoring only (HSETNX, never changed after); no script reads it."""
        return f"{self.tag}:soldout"

    @property
    def events(self) -> str:
        """Stream: every state change, read by the ledger archiver."""
        return f"{self.tag}:events"

    @property
    def archived(self) -> str:
        """String: the last entry id of this shard's stream that the ledger archiver
        committed to its ledger (and then trimmed). The guard (ledger/guard.py) reads it
        to tell an older ledger copy; the ledger's own cursor is what archiving uses."""
        return f"{self.tag}:archived"

    @property
    def notify_channel(self) -> str:
        """Pub/sub channel: stock returned / round changes, for worker caches."""
        return f"{self.tag}:notify"
