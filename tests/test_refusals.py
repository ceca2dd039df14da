"""One refusal table: each script's Lua header, its outcome enum, the contract's error
classes and the dict between them agree, and OpenAPI documents every refusal of the
route that runs the script (docs/architecture.md, "Adding a refusal")."""

from __future__ import annotations

import json
import re
from enum import IntEnum

import pytest

from engine import errors, service
from engine.http import openapi
from engine.store import scripts

# script -> (its refusal dict, outcomes that are not refusals, the route that runs it)
TABLES: dict[str, tuple[dict, set[str], tuple[str, str]]] = {
    "grab": (service.GRAB_REFUSALS, {"GRANTED", "REPLAYED", "CODE_COLLISION", "BAD_ARGUMENT"},
             ("/v1/rounds/{round_id}/grab", "post")),
    "redeem": (service.REDEEM_REFUSALS, {"REDEEMED"}, ("/v1/venue/redemptions", "post")),
    "void": (service.VOID_REFUSALS, {"VOIDED"}, ("/v1/me/coupons/{code}", "delete")),
    "pause": (service.PAUSE_REFUSALS, {"PAUSED"}, ("/v1/admin/rounds/{round_id}/pause", "post")),
    "resume": (service.RESUME_REFUSALS, {"RESUMED"},
               ("/v1/admin/rounds/{round_id}/resume", "post")),
    "close": (service.CLOSE_REFUSALS, {"CLOSED"}, ("/v1/admin/rounds/{round_id}/close", "post")),
    "add_stock": (service.ADD_STOCK_REFUSALS, {"ADDED", "BAD_ARGUMENT"},
                  ("/v1/admin/rounds/{round_id}/stock", "post")),
    "reverse": (service.REVERSE_REFUSALS, {"REVERSED", "BAD_ARGUMENT"},
                ("/v1/admin/redemptions/{code}/reverse", "post")),
}
# The contract's error codes of each operator control (section 3), exactly.
CONTROL_CODES = {
    "pause": {"round_not_found", "round_not_open", "round_closed"},
    "resume": {"round_not_found", "round_not_paused"},
    "close": {"round_not_found", "round_closed"},
    "add_stock": {"round_not_found", "venue_not_found", "over_budget", "round_closed"},
    "reverse": {"coupon_not_found", "not_redeemed", "already_settled"},
}


def header_codes(name: str) -> dict[int, str]:
    src = scripts.load(name).source
    out = {}
    for line in src[src.index("-- RETURNS"):].splitlines():
        if not line.startswith("--"):
            break
        m = re.match(r"^--\s+(\d+)\s+([A-Z_]+)\b", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("name", sorted(TABLES))
def test_header_enum_classes_and_dict_agree(name: str) -> None:
    table, not_refusals, _ = TABLES[name]
    enum: type[IntEnum] = scripts.OUTCOMES[name]
    assert header_codes(name) == {e.value: e.name for e in enum}
    refusals = {e for e in enum if e.name not in not_refusals}
    # Every refusal the script can return maps to exactly one contract error, and
    # nothing else is in the dict.
    assert set(table) == refusals
    for outcome, cls in table.items():
        assert issubclass(cls, errors.EngineError) and cls is not errors.EngineError
        assert 400 <= cls.status < 500, (outcome, cls)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_openapi_documents_every_refusal_with_its_extra_field(name: str) -> None:
    table, _, (path, method) = TABLES[name]
    responses = json.loads(openapi.document())["paths"][path][method]["responses"]
    for cls in table.values():
        body = responses[str(cls.status)]["content"]["application/json"]["schema"]
        props = body["properties"]["error"]["properties"]
        assert cls.code in props["code"]["enum"], (cls.code, path)
        if cls.extra:
            assert props[cls.extra] == {"type": "string", "format": "date-time"}


@pytest.mark.parametrize("name", sorted(CONTROL_CODES))
def test_each_control_answers_the_contracts_codes(name: str) -> None:
    table, _, (path, method) = TABLES[name]
    assert {cls.code for cls in table.values()} == CONTROL_CODES[name]
    responses = json.loads(openapi.document())["paths"][path][method]["responses"]
    documented = {c for status, r in responses.items() if status[0] == "4"
                  for c in r["content"]["application/json"]["schema"]["properties"]["error"][
                      "properties"]["code"]["enum"]}
    assert documented == CONTROL_CODES[name] | {"invalid_request", "unauthorized"}
    assert set(responses) >= {"200", "400", "401", "503"}


def test_round_paused_is_documented_with_its_retry_after() -> None:
    grab = json.loads(openapi.document())["paths"]["/v1/rounds/{round_id}/grab"]["post"]
    conflict = grab["responses"]["409"]
    assert "round_paused" in conflict["content"]["application/json"]["schema"]["properties"][
        "error"]["properties"]["code"]["enum"]
    # Present on round_paused, absent on the other 409s: documented, not required.
    assert conflict["headers"]["Retry-After"]["required"] is False
    assert errors.RoundPaused().headers == {"Retry-After": "30"}


def test_every_error_class_is_a_plain_class_with_a_distinct_meaning() -> None:
    seen: dict[tuple[str, int], type[errors.EngineError]] = {}
    for cls in errors.contract_errors():
        assert re.fullmatch(r"[a-z_]+", cls.code) and 400 <= cls.status <= 503
        if issubclass(cls, errors.Unavailable):
            continue  # NotReady is the 503 of /readyz with its own message
        assert (cls.code, cls.status) not in seen, (cls, seen.get((cls.code, cls.status)))
        seen[(cls.code, cls.status)] = cls


def test_a_refusal_carries_its_extra_field() -> None:
    err = service.refusal(errors.AlreadyRedeemed, 1_700_000_000_000, "Asia/Shanghai")
    assert err.body() == {"error": {"code": "already_redeemed", "message": err.message,
                                    "redeemed_at": "2023-11-15T06:13:20+08:00"}}
    assert service.refusal(errors.SoldOut, 123, "Asia/Shanghai").body()["error"].keys() == {
        "code", "message"}
