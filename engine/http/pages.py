"""The members' page (``/``) and the venues' scanner page (``/venue/``), served by the
engine from package data (docs/pages.md).

Assets are read, bundled, hashed and gzipped once, when the app is created (never at
import): each is served under a content-hashed name with a year-long immutable
lifetime, so a phone fetches it once; the two HTML pages, which name those hashed
files, are short-lived (and revalidated by ETag), so a new release reaches phones
within a minute.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from .. import errors
from .caching import etag_of, matches

STATIC_PACKAGE = "engine.http"
ASSET_PREFIX = "/static/"
# Served files: logical name -> the source files concatenated into it (one request each).
BUNDLES: dict[str, tuple[str, ...]] = {
    "member.js": ("js/common.js", "js/member.js"),
    "venue.js": ("js/common.js", "js/venue.js"),
    "app.css": ("app.css",),
    "vendor/jsQR.js": ("vendor/jsQR.js",),
    "vendor/jsQR-LICENSE.txt": ("vendor/jsQR-LICENSE.txt",),
}
PAGES = {"member": "member.html", "venue": "venue.html"}
TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain",
         ".html": "text/html"}
ASSET_CACHE = "public, max-age=31536000, immutable"
PAGE_CACHE = "public, max-age=60"
# The pages load only their own scripts and styles and talk only to this engine;
# QR codes arrive as blob: images, the camera as a media stream.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: "
            "mediastream:; object-src 'none'; base-uri 'none'; form-action 'self'")
DEMO_START, DEMO_END = "<!--demo-->", "<!--/demo-->"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def _asset(body: bytes, suffix: str) -> Asset:
    return Asset(body, gzip.compress(body, compresslevel=9, mtime=0), TYPES[suffix],
                 etag_of(body))


def hashed_name(name: str, body: bytes) -> str:
    """``vendor/jsQR.js`` -> ``vendor/jsQR.<12 hex of its SHA-256>.js``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}{dot}{ext}"


def render_page(template: str, urls: dict[str, str], *, demo_sign_in: bool) -> str:
    """Put the hashed URLs in, and keep the demo sign-in block only when it is offered
    (with configured secrets the page does not even contain it)."""
    while DEMO_START in template:
        start = template.index(DEMO_START)
        end = template.index(DEMO_END, start) + len(DEMO_END)
        inner = template[start + len(DEMO_START):end - len(DEMO_END)]
        template = template[:start] + (inner if demo_sign_in else "") + template[end:]
    for name, url in urls.items():
        template = template.replace("{{" + name + "}}", url)
    if "{{" in template:
        raise RuntimeError(f"page names an unknown asset: {template[template.index('{{'):][:60]}")
    return template


class Site:
    """Every page and asset, built once per app."""

    def __init__(self, *, demo_sign_in: bool) -> None:
        root = resources.files(STATIC_PACKAGE).joinpath("static")
        self.assets: dict[str, Asset] = {}
        urls: dict[str, str] = {}
        for name, sources in BUNDLES.items():
            body = b"\n".join(root.joinpath(s).read_bytes() for s in sources)
            served = hashed_name(name, body)
            self.assets[served] = _asset(body, posixpath.splitext(name)[1])
            urls[name] = ASSET_PREFIX + served
        self.urls = urls
        self.pages = {
            page: _asset(render_page(root.joinpath(file).read_text("utf-8"), urls,
                                     demo_sign_in=demo_sign_in).encode(), ".html")
            for page, file in PAGES.items()}


SITE: web.AppKey[Site] = web.AppKey("site", Site)


def _send(request: web.Request, asset: Asset, cache_control: str,
          extra: dict[str, str] | None = None) -> web.Response:
    headers = {"Cache-Control": cache_control, "ETag": asset.etag, "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff", **(extra or {})}
    if matches(request, asset.etag):
        return web.Response(status=304, headers=headers)
    body = asset.body
    if "gzip" in request.headers.get("Accept-Encoding", "") and len(asset.gzipped) < len(body):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers, content_type=asset.content_type,
                        charset="utf-8")


def _page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return _send(request, request.app[SITE].pages[name], PAGE_CACHE,
                     {"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer"})
    return handler


async def static_asset(request: web.Request) -> web.Response:
    asset = request.app[SITE].assets.get(request.match_info["asset"])
    if asset is None:
        raise errors.NotFound("no such asset")
    return _send(request, asset, ASSET_CACHE)


async def venue_redirect(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/venue/")


def add_routes(app: web.Application, *, demo_sign_in: bool) -> None:
    app[SITE] = Site(demo_sign_in=demo_sign_in)
    r = app.router
    r.add_get("/", _page("member"))
    r.add_get("/venue/", _page("venue"))
    r.add_get("/venue", venue_redirect)
    r.add_get(ASSET_PREFIX + "{asset:.+}", static_asset)
