"""The engine's HTTP wing: the members' and venues' pages, their static assets and the
read-only routes they need beside the contract's API (docs/pages.md).

Deliberately empty: ``engine.handlers`` imports ``engine.http.caching`` at import time
and registers ``engine.http.public`` routes lazily, so nothing here may import them.
"""
