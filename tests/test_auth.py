"""The member token verifier, checked against PyJWT on the same tokens."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.auth import MemberVerifier
from engine.campaign import ID_RE
from engine.errors import Unauthorized

SECRET = "member-secret-0123456789abcdef-0123"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, claims: dict, key: bytes = SECRET.encode(),
              sig: str | None = None) -> str:
    import hashlib
    import hmac
    h = b64(json.dumps(header).encode())
    c = b64(json.dumps(claims).encode())
    if sig is None:
        sig = b64(hmac.new(key, f"{h}.{c}".encode(), hashlib.sha256).digest())
    return f"{h}.{c}.{sig}"


def tokens() -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "m-1", "iat": now, "exp": now + 600}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    valid = jwt.encode(good, SECRET, algorithm="HS256")
    h, c, s = valid.split(".")
    return {
        "valid": valid,
        "valid_with_kid": jwt.encode(good, SECRET, algorithm="HS256", headers={"kid": "k1"}),
        "valid_nbf_past": jwt.encode({**good, "nbf": now - 5}, SECRET, algorithm="HS256"),
        "expired": jwt.encode({**good, "exp": now - 1}, SECRET, algorithm="HS256"),
        "nbf_future": jwt.encode({**good, "nbf": now + 300}, SECRET, algorithm="HS256"),
        "no_exp": jwt.encode({"sub": "m-1"}, SECRET, algorithm="HS256"),
        "no_sub": jwt.encode({"exp": now + 600}, SECRET, algorithm="HS256"),
        "sub_not_string": raw_token({"alg": "HS256", "typ": "JWT"}, {**good, "sub": 7}),
        "exp_is_text": raw_token({"alg": "HS256", "typ": "JWT"}, {**good, "exp": "soon"}),
        "wrong_key": jwt.encode(good, "another-secret-0123456789abcdef-012", algorithm="HS256"),
        "alg_none": raw_token({"alg": "none", "typ": "JWT"}, good, sig=""),
        "alg_hs512": jwt.encode(good, SECRET + "-longer-for-512-bits-of-key-material-x",
                                algorithm="HS512"),
        "rs256": jwt.encode(good, rsa_key, algorithm="RS256"),
        # The classic confusion: HS256 keyed with the RSA public key.
        "hs256_with_public_key": raw_token({"alg": "HS256", "typ": "JWT"}, good,
                                           key=public_pem),
        "crit_header": raw_token({"alg": "HS256", "crit": ["exp"]}, good),
        "tampered_claims": f"{h}.{b64(json.dumps({**good, 'sub': 'm-2'}).encode())}.{s}",
        "padded_signature": f"{h}.{c}.{s}=",
        "two_segments": f"{h}.{c}",
        "four_segments": f"{valid}.x",
        "garbage": "not a token",
        "header_not_json": f"{b64(b'{')}.{c}.{s}",
    }


# Refused here although PyJWT accepts them: RFC 7515 compact JWS segments carry no padding.
STRICTER = {"padded_signature"}


@pytest.mark.parametrize("name", list(tokens()))
def test_accepts_exactly_what_pyjwt_accepts(name: str) -> None:
    token = tokens()[name]
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
        want = claims["sub"] if isinstance(claims.get("sub"), str) else None
    except jwt.PyJWTError:
        want = None
    if name in STRICTER:
        assert want is not None, f"PyJWT now refuses {name}; drop it from STRICTER"
        want = None
    v = MemberVerifier(SECRET, ID_RE)
    try:
        got = v.verify(token)
    except Unauthorized:
        got = None
    assert got == want, name
    # Asked again (cache or not), the answer is the same.
    try:
        again = v.verify(token)
    except Unauthorized:
        again = None
    assert again == want


def test_a_cached_token_stops_working_at_its_exp() -> None:
    v = MemberVerifier(SECRET, ID_RE)
    token = jwt.encode({"sub": "m-1", "exp": time.time() + 1.0}, SECRET, algorithm="HS256")
    assert v.verify(token) == "m-1"
    time.sleep(1.1)
    with pytest.raises(Unauthorized):
        v.verify(token)


def test_oversized_and_bad_subject_tokens_are_refused() -> None:
    v = MemberVerifier(SECRET, ID_RE)
    with pytest.raises(Unauthorized):
        v.verify("a" * 5000)
    bad_sub = jwt.encode({"sub": "has space", "exp": time.time() + 60}, SECRET,
                         algorithm="HS256")
    with pytest.raises(Unauthorized):
        v.verify(bad_sub)


@pytest.mark.parametrize("key_len", [1, 32, 63, 64, 65, 200])
def test_precomputed_hmac_matches_the_standard_one_for_every_key_length(key_len: int) -> None:
    """The verifier's HMAC from precomputed pads agrees with hmac.new, including keys
    longer than SHA-256's 64-byte block (hashed first) and exactly one block long;
    a token signed with a key one byte different is refused."""
    import hashlib
    import hmac
    secret = ("k" * key_len)[:key_len]
    v = MemberVerifier(secret, ID_RE)
    for msg in (b"", b"a.b", b"x" * 1000):
        assert v._mac(msg) == hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    token = jwt.encode({"sub": "m-1", "exp": time.time() + 60}, secret.ljust(32, "k"),
                       algorithm="HS256")
    if len(secret) >= 32:
        assert v.verify(token) == "m-1"
    other = secret[:-1] + "j"
    with pytest.raises(Unauthorized):
        MemberVerifier(other, ID_RE).verify(jwt.encode(
            {"sub": "m-1", "exp": time.time() + 60}, secret, algorithm="HS256"))
