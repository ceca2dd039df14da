"""The HTTP wing: the only importers of aiohttp (tests/test_layout.py).

``app.py`` the application factory and its one error middleware;
``handlers.py`` the contract's routes (parse, authenticate, call the Engine, encode);
``public.py`` the read-only routes the web pages need beside them; ``pages.py``
the members' and venues' pages and their hashed static assets (``static/``,
docs/pages.md); ``caching.py`` short-lived caching of public data;
``openapi.py`` the OpenAPI document; ``qr.py`` coupon QR codes;
``worker.py`` one serving process.
"""
