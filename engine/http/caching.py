"""Responses a million polling phones (and any proxy between) may cache for a second.

``cached_json`` adds ``Cache-Control: public, max-age=1`` and an ETag over the encoded
body, and answers a matching ``If-None-Match`` with 304 and no body. The body and
status of a 200 are exactly what they were without it.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from ..schemas import encoder

PUBLIC_MAX_AGE_S = 1


def etag_of(body: bytes) -> str:
    """A strong ETag: the same bytes always give the same tag, in every worker."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def matches(request: web.Request, etag: str) -> bool:
    """Whether the request's If-None-Match names ``etag`` (or ``*``)."""
    if "If-None-Match" not in request.headers:
        return False
    value = etag.strip('"')
    # Weak comparison (RFC 9110 13.1.2): W/"x" matches "x" for If-None-Match.
    return any(t.value == value or t.value == "*" for t in request.if_none_match or ())


def cacheable(request: web.Request, body: bytes, content_type: str,
              cache_control: str) -> web.Response:
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if matches(request, etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, headers=headers)


def cached_json(request: web.Request, payload: object,
                max_age_s: int = PUBLIC_MAX_AGE_S) -> web.Response:
    return cacheable(request, encoder.encode(payload), "application/json",
                     f"public, max-age={max_age_s}")
