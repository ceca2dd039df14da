"""TLS to Redis on every connection, the hot path's included (issue 14, item 8).

A real redis-server listening only on a TLS port, with a certificate from a CA made
here. ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=CA`` must carry grabs (the
pipelined wire) as well as reads (redis-py); a wrong CA is refused on both, and
``ssl_cert_reqs=none`` means what redis-py makes it mean on both.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import campaign_toml, open_round
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servekit import free_port, http, serve

from engine.config import Settings
from engine.store.connection import cluster_wire_for, open_client, wire_for
from engine.store.embedded import EmbeddedRedis
from engine.store.wire import WireError


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, ca_key: ec.EllipticCurvePrivateKey,
                     ca: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("redis")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsRedis:
    def __init__(self, tmp: Path) -> None:
        certs = tmp / "certs"
        certs.mkdir()
        self.ca, ca_key, ca_cert = make_ca(certs, "test-ca")
        self.wrong_ca, _, _ = make_ca(certs, "other-ca")
        cert, key = make_server_cert(certs, ca_key, ca_cert)
        self.port = free_port()
        self.server = EmbeddedRedis(tmp / "redis")
        # No plain TCP port: only TLS (and the unix socket the fixture's check uses).
        self.server.start(extra={"tls-port": str(self.port), "tls-cert-file": str(cert),
                                 "tls-key-file": str(key), "tls-ca-cert-file": str(self.ca),
                                 "tls-auth-clients": "no"})

    def url(self, ca: Path | None = None, reqs: str = "required") -> str:
        q = f"ssl_cert_reqs={reqs}"
        if ca is not None:
            q += f"&ssl_ca_certs={quote(str(ca))}"
        return f"rediss://127.0.0.1:{self.port}/0?{q}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    r = TlsRedis(tmp_path_factory.mktemp("tls"))
    try:
        yield r
    finally:
        r.server.stop()


def test_grabs_and_reads_over_tls_with_the_configured_ca(tls_redis: TlsRedis,
                                                          tmp_path: Path) -> None:
    url = tls_redis.url(tls_redis.ca)
    text = campaign_toml(rounds=[open_round(tls_redis.server.url, quota=2)])
    with serve(tmp_path, url, text, workers=1) as s:
        st, body = http("POST", s.base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                        {**s.member("m1"), "Idempotency-Key": "tls-1"})
        assert st == 201, body
        code = body["coupon"]["code"]
        st, again = http("POST", s.base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                         {**s.member("m1"), "Idempotency-Key": "tls-1"})
        assert (st, again) == (201, body)
        st, mine = http("GET", s.base + "/v1/me/coupons", headers=s.member("m1"))
        assert st == 200 and [c["code"] for c in mine["coupons"]] == [code]
        vkey = s.cli("token", "venue", "V01").stdout.strip()
        st, red = http("POST", s.base + "/v1/venue/redemptions", {"code": code},
                       {"Authorization": f"Bearer {vkey}"})
        assert (st, red["coupon"]["status"]) == (200, "redeemed"), red
        st, stats = http("GET", s.base + "/v1/admin/rounds/R1/stats", headers=s.admin)
        assert st == 200 and stats["totals"]["redeemed"] == 1
        assert http("GET", s.base + "/readyz")[0] == 200


async def _wire_answers(url: str) -> bool:
    client = open_client(url, timeout=2.0, connect_timeout=2.0)
    wire = wire_for(client, Settings(redis_timeout=2.0))
    try:
        return await wire.call("PING") == "PONG"
    except WireError:
        return False
    finally:
        await wire.close()
        await client.aclose()


async def _redis_py_answers(url: str) -> bool:
    client = open_client(url, timeout=2.0, connect_timeout=2.0)
    try:
        return bool(await client.ping())
    except Exception:  # noqa: BLE001 - any refusal counts as "no"
        return False
    finally:
        await client.aclose()


def test_the_wire_verifies_as_redis_py_does(tls_redis: TlsRedis) -> None:
    """Right CA: both connect. Wrong CA, or no CA (the system's do not know ours): both
    refuse. ``ssl_cert_reqs=none``: redis-py does not verify, and neither does the wire."""
    cases = {"right CA": tls_redis.url(tls_redis.ca),
             "wrong CA": tls_redis.url(tls_redis.wrong_ca),
             "system CAs": tls_redis.url(),
             "no verification": tls_redis.url(reqs="none")}
    want = {"right CA": True, "wrong CA": False, "system CAs": False, "no verification": True}

    async def run() -> dict[str, tuple[bool, bool]]:
        return {name: (await _redis_py_answers(u), await _wire_answers(u))
                for name, u in cases.items()}

    got = asyncio.run(run())
    assert got == {k: (v, v) for k, v in want.items()}, got


def test_cluster_seeds_carry_the_same_tls_settings(tls_redis: TlsRedis) -> None:
    """A Redis Cluster URL's seed nodes get the context redis-py made for them (built
    before any connection, so no cluster is needed to check it)."""
    from redis.asyncio.cluster import RedisCluster
    url = tls_redis.url(tls_redis.ca).replace("rediss://", "rediss+cluster://")
    client = open_client(url, timeout=1.0)
    assert isinstance(client, RedisCluster)
    wire = cluster_wire_for(client, Settings())
    ctx = wire.seeds[0].ssl_context
    assert wire.seeds[0].tls and ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # The configured CA (beside the system's, as redis-py loads them).
    assert ((("commonName", "test-ca"),),) in [c["subject"] for c in ctx.get_ca_certs()]
