"""The HTTP wing: the only importers of aiohttp (tests/test_layout.py).

``app.py`` the application factory and its one error middleware;
``handlers.py`` the routes (parse, authenticate, call the Engine, encode);
``openapi.py`` the OpenAPI document; ``qr.py`` coupon QR codes;
``worker.py`` one serving process.
"""
