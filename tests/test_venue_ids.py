"""Venue ids with dots (issue 14, item 4): the contract allows ``A-Za-z0-9_.-`` in ids,
so a scanner key minted by ``coupon-engine token venue ski.v1`` must redeem that
venue's coupons over HTTP, while keys of dot-free venues keep working unchanged.
End to end: a campaign file, ``serve``, the CLI, HTTP."""

from __future__ import annotations

from pathlib import Path

from conftest import campaign_toml, open_round
from servekit import http, serve

VENUES = ("V01", "ski.v1", "ski", "a..b.", "...")


def test_dotted_venue_ids_mint_keys_that_redeem(tmp_path: Path, redis_url: str) -> None:
    text = campaign_toml(venues=VENUES, quota=5, rounds=[open_round(
        redis_url, quota=5, stock={v: 3 for v in VENUES})])
    with serve(tmp_path, redis_url, text) as s:
        keys = {v: s.cli("token", "venue", v).stdout.strip() for v in VENUES}
        coupons = {}
        for v in VENUES:
            st, body = http("POST", s.base + "/v1/rounds/R1/grab", {"venue_id": v},
                            s.member("m1"))
            assert st == 201, (v, body)
            coupons[v] = body["coupon"]["code"]
        for v in VENUES:
            auth = {"Authorization": f"Bearer {keys[v]}"}
            st, me = http("GET", s.base + "/v1/venue/me", headers=auth)
            assert (st, me.get("venue", {}).get("venue_id")) == (200, v), (v, me)
            st, body = http("GET", s.base + f"/v1/venue/coupons/{coupons[v]}", headers=auth)
            assert (st, body["coupon"]["status"]) == (200, "issued"), (v, body)
            st, body = http("POST", s.base + "/v1/venue/redemptions", {"code": coupons[v]},
                            auth)
            assert (st, body["coupon"]["status"]) == (200, "redeemed"), (v, body)
            st, body = http("GET", s.base + "/v1/venue/redemptions", headers=auth)
            assert [c["code"] for c in body["redemptions"]] == [coupons[v]], v
        # A key acts for exactly its venue: "ski.v1"'s key is not one of "ski", and a
        # key whose venue part is edited to a prefix of its own is no key at all.
        ski_v1 = {"Authorization": f"Bearer {keys['ski.v1']}"}
        st, body = http("GET", s.base + f"/v1/venue/coupons/{coupons['ski']}", headers=ski_v1)
        assert (st, body["error"]["code"]) == (403, "wrong_venue")
        forged = keys["ski.v1"].replace("vk.ski.v1.", "vk.ski.", 1)
        st, body = http("GET", s.base + "/v1/venue/me",
                        headers={"Authorization": f"Bearer {forged}"})
        assert (st, body["error"]["code"]) == (401, "unauthorized")
        # The CLI lists and revokes a dotted venue's keys too.
        listed = s.cli("token", "venue", "ski.v1", "--list").stdout.split()
        assert len(listed) == 1 and listed[0] in keys["ski.v1"]
        assert "revoked 1" in s.cli("token", "venue", "ski.v1", "--revoke", listed[0]).stdout
        # Workers cache a good key for up to 5 s; a fresh key of the same venue is
        # checked against Redis, where the revoked one is gone.
        again = s.cli("token", "venue", "ski.v1").stdout.strip()
        st, _ = http("GET", s.base + "/v1/venue/me",
                     headers={"Authorization": f"Bearer {again}"})
        assert st == 200
