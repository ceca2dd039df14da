"""The member token verifier, checked against PyJWT on the same tokens."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.auth import DEFAULT_LEEWAY_S, MemberVerifier
from engine.campaign import ID_RE
from engine.errors import Unauthorized

SECRET = "member-secret-0123456789abcdef-0123"
# The engine's default clock-skew leeway, given to PyJWT and to the verifier alike.
LEEWAY = DEFAULT_LEEWAY_S


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


def raw_token_segments(header: bytes, claims: bytes) -> str:
    h, c = b64(header), b64(claims)
    return f"{h}.{c}.{sign(h, c)}"


def sign(h: str, c: str) -> str:
    import hashlib
    import hmac
    return b64(hmac.new(SECRET.encode(), f"{h}.{c}".encode(), hashlib.sha256).digest())


def non_canonical(token: str) -> str:
    """The same token with the claims segment's last character changed in its unused
    low bits only (it decodes to the same bytes), signed again."""
    h, c, _ = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused = {2: 4, 3: 2}[len(c) % 4]  # bits of the last character that carry nothing
    last = alphabet.index(c[-1])
    assert last % (1 << unused) == 0
    c = c[:-1] + alphabet[last + 1]
    return f"{h}.{c}.{sign(h, c)}"


def padded_claims(claims: dict) -> str:
    """A token whose claims segment keeps its base64 padding (signed over it)."""
    raw = json.dumps(claims).encode()
    while len(raw) % 3 == 0:
        raw += b" "
    h = b64(json.dumps({"alg": "HS256"}).encode())
    c = base64.urlsafe_b64encode(raw).decode()
    assert c.endswith("=")
    return f"{h}.{c}.{sign(h, c)}"


def hs(claims: dict) -> str:
    return raw_token({"alg": "HS256", "typ": "JWT"}, claims)


def tokens() -> dict[str, str]:
    now = int(time.time())
    L = int(LEEWAY)
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
        # The leeway, on both sides of it, for exp, nbf and iat alike.
        "exp_within_leeway": hs({**good, "exp": now - L + 5}),
        "exp_beyond_leeway": hs({**good, "exp": now - L - 5}),
        "nbf_within_leeway": hs({**good, "nbf": now + L - 5}),
        "nbf_beyond_leeway": hs({**good, "nbf": now + L + 5}),
        "iat_within_leeway": hs({**good, "iat": now + L - 5}),
        "iat_beyond_leeway": hs({**good, "iat": now + L + 5}),
        "iat_a_year_ahead": hs({**good, "iat": now + 365 * 86400}),
        "iat_past": hs({**good, "iat": now - 86400}),
        # NumericDates as PyJWT reads them: int() of the value.
        "exp_float": hs({**good, "exp": now + 600.75}),
        "exp_float_just_past": hs({**good, "exp": now - L + 0.9}),
        "exp_numeric_string": hs({**good, "exp": str(now + 600)}),
        "exp_text": hs({**good, "exp": "soon"}),
        "exp_null": hs({**good, "exp": None}),
        "exp_true": hs({**good, "exp": True}),
        "exp_list": hs({**good, "exp": [now + 600]}),
        "iat_text": hs({**good, "iat": "yesterday"}),
        "iat_null": hs({**good, "iat": None}),
        "nbf_numeric_string": hs({**good, "nbf": str(now - 5)}),
        "nbf_object": hs({**good, "nbf": {"t": now}}),
        "sub_null": hs({**good, "sub": None}),
        "aud_present": hs({**good, "aud": "union-app"}),
        "aud_empty": hs({**good, "aud": ""}),
        "jti_string": hs({**good, "jti": "abc"}),
        "jti_number": hs({**good, "jti": 7}),
        "iss_any": hs({**good, "iss": "anyone"}),
        "kid_number": raw_token({"alg": "HS256", "kid": 7}, good),
        "typ_other": raw_token({"alg": "HS256", "typ": "at+jwt"}, good),
        "no_typ": raw_token({"alg": "HS256"}, good),
        "alg_list": raw_token({"alg": ["HS256"]}, good),
        "no_alg": raw_token({"typ": "JWT"}, good),
        "b64_false": raw_token({"alg": "HS256", "b64": False}, good),
        "header_array": raw_token_segments(b"[1]", json.dumps(good).encode()),
        "claims_array": raw_token_segments(b'{"alg":"HS256"}', b"[1]"),
        "claims_duplicate_sub": raw_token_segments(
            b'{"alg":"HS256"}', b'{"sub":"m-2","sub":"m-1","exp":%d}' % (now + 600)),
        "non_canonical_claims": non_canonical(valid),
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
        "padded_claims": padded_claims(good),
        "crit_b64": raw_token({"alg": "HS256", "crit": ["b64"], "b64": True}, good),
        "claims_with_nan": raw_token_segments(
            b'{"alg":"HS256"}', b'{"sub":"m-1","exp":%d,"x":NaN}' % (now + 600)),
        "two_segments": f"{h}.{c}",
        "four_segments": f"{valid}.x",
        "garbage": "not a token",
        "header_not_json": f"{b64(b'{')}.{c}.{s}",
    }


# Refused here although PyJWT accepts them (docs/decisions.md): RFC 7515 compact JWS
# segments carry no padding; a critical header extension is refused whatever it names;
# JSON beyond RFC 8259 (NaN, Infinity) is not JSON.
STRICTER = {"padded_signature", "padded_claims", "crit_b64", "claims_with_nan"}


@pytest.mark.parametrize("name", list(tokens()))
def test_accepts_exactly_what_pyjwt_accepts(name: str) -> None:
    token = tokens()[name]
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]}, leeway=LEEWAY)
        want = claims["sub"] if isinstance(claims.get("sub"), str) else None
    except jwt.PyJWTError:
        want = None
    if name in STRICTER:
        assert want is not None, f"PyJWT now refuses {name}; drop it from STRICTER"
        want = None
    v = MemberVerifier(SECRET, ID_RE, leeway_s=LEEWAY)
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


def test_a_cached_token_stops_working_at_its_exp_plus_the_leeway() -> None:
    v = MemberVerifier(SECRET, ID_RE, leeway_s=1.0)
    exp = int(time.time()) + 1
    token = jwt.encode({"sub": "m-1", "exp": exp}, SECRET, algorithm="HS256")
    assert v.verify(token) == "m-1"
    # Still good (from the cache) after exp, within the leeway...
    while time.time() < exp + 0.3:
        time.sleep(0.05)
    assert v.verify(token) == "m-1"
    # ...and refused once the leeway has passed too.
    while time.time() < exp + 1.1:
        time.sleep(0.05)
    with pytest.raises(Unauthorized):
        v.verify(token)


def test_the_leeway_is_the_configured_one() -> None:
    """COUPON_MEMBER_JWT_LEEWAY reaches the verifier; 0 means none."""
    from engine.config import SettingsError, from_env
    assert from_env({}).member_jwt_leeway_s == LEEWAY == 30
    assert from_env({"COUPON_MEMBER_JWT_LEEWAY": "0"}).member_jwt_leeway_s == 0
    for bad in ("-1", "301", "soon", "nan"):
        with pytest.raises(SettingsError, match="COUPON_MEMBER_JWT_LEEWAY"):
            from_env({"COUPON_MEMBER_JWT_LEEWAY": bad})
    now = int(time.time())
    ahead = jwt.encode({"sub": "m-1", "exp": now + 600, "iat": now + 10}, SECRET,
                       algorithm="HS256")
    assert MemberVerifier(SECRET, ID_RE, leeway_s=30).verify(ahead) == "m-1"
    with pytest.raises(Unauthorized, match="iat"):
        MemberVerifier(SECRET, ID_RE, leeway_s=0).verify(ahead)


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
