"""Schemathesis checks of our own, loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks.

``refused_unauthenticated`` is used in the run that sends no credentials: every
operation the document marks as needing a member, venue or admin credential
must answer 401 with ``{"error": {"code": "unauthorized", ...}}`` (contract,
section 3), whatever else is wrong with the request.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.core.parameters import ParameterLocation


@schemathesis.check
def refused_unauthenticated(ctx, response, case) -> bool | None:  # type: ignore[no-untyped-def]
    """A credential-protected operation called without a valid credential answers 401."""
    security = case.operation.definition.raw.get("security") or []
    if not any(req for req in security):
        return None  # a public operation
    # Coverage probes with another method (TRACE, ...) meet the router's 405 first.
    if case.method.upper() != case.operation.method.upper():
        return None
    # A path made invalid on purpose may miss the route altogether (404 no route).
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH):
        return None
    if response.status_code != 401:
        raise AssertionError(f"{case.operation.label} without credentials answered "
                             f"{response.status_code}, not 401")
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError("401 without a contract error body") from None
    if code != "unauthorized":
        raise AssertionError(f"401 with code {code!r}, not 'unauthorized'")
    return True
