"""Coupon QR codes as SVG (segno)."""

from __future__ import annotations

import io

import segno


def svg(display_code: str) -> bytes:
    """The displayed code (XXXX-XXXX-XXXX-XXXX-C) as an SVG QR code.

    Encoded as the dashed display form: scanners type it back, and the
    engine's parser ignores the dashes.
    """
    buf = io.BytesIO()
    segno.make(display_code, error="m", micro=False).save(buf, kind="svg", scale=8, border=4,
                                                         xmldecl=True)
    return buf.getvalue()
