"""Key-based access tokens: ES256 and RS256 with a PEM public key or a JWKS served over real HTTP
(rotation, refetch limits, an identity provider that is down), iss/aud/leeway, algorithm
confusion, `mqchat token --private-key`, and a CONNECT to the real broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import aiomqtt
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mqchat.clock import Clock
from mqchat.config import AuthConfig
from mqchat.errors import AuthError
from mqchat.jwks import JwksCache
from mqchat.tokens import TokenVerifier, issue_token, service_password
from tests.conftest import make_config, open_stack
from tests.helpers import connect_device, repo_env, unique, wait_until

SECRET = "s" * 40

# --- keys, made here -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    algorithm: str  # ES256 or RS256
    private: Any

    def jwk(self, kid: str) -> dict[str, Any]:
        """The public key as a JWKS entry."""
        algorithm = jwt.algorithms.ECAlgorithm if self.algorithm == "ES256" else jwt.algorithms.RSAAlgorithm
        entry: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**entry, "kid": kid, "use": "sig", "alg": self.algorithm}

    def token(self, user: str = "alice", device: str = "a1", *, kid: str | None = None, **kwargs: Any) -> str:
        return issue_token(user=user, device=device, ttl_s=600, private_key=self.private_pem, kid=kid, **kwargs)


def make_pair(algorithm: str) -> KeyPair:
    private: Any = (
        ec.generate_private_key(ec.SECP256R1())
        if algorithm == "ES256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_pem=private_pem, public_pem=public_pem, algorithm=algorithm, private=private)


@pytest.fixture(scope="module")
def ec_pair() -> KeyPair:
    return make_pair("ES256")


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return make_pair("RS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: HS256 under any key (PyJWT refuses a PEM as an HMAC secret), or unsigned."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "dev": "a1", "iat": now, "exp": now + 600, **extra}


async def refused(verifier: TokenVerifier, token: str, match: str = "") -> str:
    """verify() refuses token; the reason, which never holds the token."""
    with pytest.raises(AuthError, match=match) as caught:
        await verifier.verify(token)
    assert token not in str(caught.value)
    return str(caught.value)


# --- a JWKS over real HTTP, and a clock the test moves ----------------------------------------------


class JwksServer:
    """An HTTP server on 127.0.0.1 answering every GET with the JWKS of ``keys`` (or ``status``),
    counting the requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.requests = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = json.dumps({"keys": self.keys}).encode() if self.status == 200 else b"down"
            head = (
                f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class ManualClock(Clock):
    """Monotonic time that moves only when the test says; sleepers wake once it has moved past them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            await asyncio.sleep(0.005)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    async with JwksServer() as server:
        yield server


def jwks_verifier(url: str, clock: ManualClock, **kwargs: Any) -> TokenVerifier:
    """A verifier over the JWKS at url, on the test's clock: refetched at most every 10 s,
    refreshed every 300 s."""
    return TokenVerifier(secret=SECRET, jwks=JwksCache(url=url, clock=clock, min_refetch_s=10, refresh_s=300), **kwargs)


# --- a PEM public key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ES256", "RS256"])
async def test_a_pem_public_key_verifies_tokens_of_its_private_key(kind: str) -> None:
    pair, other = make_pair(kind), make_pair(kind)
    verifier = TokenVerifier(secret=SECRET, public_key=pair.public_pem)
    assert verifier.algorithms == ("HS256", "ES256", "RS256")
    token = pair.token(kid="any")
    assert jwt.get_unverified_header(token)["alg"] == kind
    identity = await verifier.verify(token)
    assert (identity.user, identity.device) == ("alice", "a1")
    assert identity.issued_at is not None
    assert abs(identity.issued_at - time.time()) < 5
    assert identity.expires_at == int(identity.issued_at) + 600
    await refused(verifier, other.token(), "InvalidSignatureError")
    wrong_kind = make_pair("RS256" if kind == "ES256" else "ES256")
    await refused(verifier, wrong_kind.token(), "its algorithm is not its key's")
    # The shared secret keeps working, for HS256 tokens and the bridge's credential.
    assert (await verifier.verify(issue_token(secret=SECRET, user="bob", device="b1", ttl_s=60))).user == "bob"
    assert verifier.verify_service(service_password(SECRET))


async def test_algorithm_confusion_and_unsigned_tokens_are_refused(rsa_pair: KeyPair, ec_pair: KeyPair) -> None:
    verifier = TokenVerifier(secret=SECRET, public_key=rsa_pair.public_pem)
    # HS256 "signed" with the public key's PEM text as the HMAC secret: checked against the secret only.
    await refused(verifier, hand_made({"alg": "HS256", "typ": "JWT"}, claims(), rsa_pair.public_pem), "invalid token")
    for none in ("none", "None", "NONE"):
        await refused(verifier, hand_made({"alg": none, "typ": "JWT"}, claims(), None), "algorithm not accepted")
    await refused(verifier, hand_made({"alg": "HS384"}, claims(), SECRET.encode()), "algorithm not accepted")
    await refused(verifier, hand_made({"typ": "JWT"}, claims(), SECRET.encode()), "algorithm not accepted")
    # A verifier for key-signed tokens only refuses HS256 ones, even under the right secret.
    only_keys = TokenVerifier(secret=SECRET, public_key=ec_pair.public_pem, algorithms=["ES256"])
    assert (await only_keys.verify(ec_pair.token())).user == "alice"
    await refused(only_keys, issue_token(secret=SECRET, user="alice", device="a1", ttl_s=60), "not accepted")
    for bad in (["none"], ["HS512"], [], ["ES256"]):
        with pytest.raises(ValueError, match=r"none|HS512|no token algorithm|public key"):
            TokenVerifier(secret=SECRET, algorithms=bad)


async def test_issuer_and_audience(ec_pair: KeyPair) -> None:
    verifier = TokenVerifier(
        secret=SECRET, public_key=ec_pair.public_pem, issuer="https://id.example", audience="mqchat"
    )
    ok = ec_pair.token(issuer="https://id.example", audience="mqchat")
    assert (await verifier.verify(ok)).user == "alice"
    listed = jwt.encode(claims(iss="https://id.example", aud=["other", "mqchat"]), ec_pair.private, algorithm="ES256")
    assert (await verifier.verify(listed)).user == "alice", "aud may be a list that contains ours"
    await refused(verifier, ec_pair.token(audience="mqchat"), "MissingRequiredClaimError")
    await refused(verifier, ec_pair.token(issuer="https://evil.example", audience="mqchat"), "InvalidIssuerError")
    await refused(verifier, ec_pair.token(issuer="https://id.example"), "MissingRequiredClaimError")
    await refused(verifier, ec_pair.token(issuer="https://id.example", audience="else"), "InvalidAudienceError")
    # Without a configured audience, a token meant for someone else is not ours either.
    plain = TokenVerifier(secret=SECRET, public_key=ec_pair.public_pem)
    await refused(plain, ec_pair.token(audience="else"), "InvalidAudienceError")


async def test_leeway(ec_pair: KeyPair) -> None:
    now = int(time.time())
    late = jwt.encode(claims(iat=now - 60, exp=now - 3), ec_pair.private, algorithm="ES256")
    lenient = TokenVerifier(secret=SECRET, public_key=ec_pair.public_pem, leeway_s=5)
    assert (await lenient.verify(late)).user == "alice"
    strict = TokenVerifier(secret=SECRET, public_key=ec_pair.public_pem, leeway_s=0)
    await refused(strict, late, "expired")  # remembered by the lenient verifier only
    later = jwt.encode(claims(iat=now - 60, exp=now - 10), ec_pair.private, algorithm="ES256")
    await refused(lenient, later, "expired")
    from_the_future = jwt.encode(claims(iat=now + 60), ec_pair.private, algorithm="ES256")
    await refused(lenient, from_the_future, "ImmatureSignatureError")


# --- a JWKS -----------------------------------------------------------------------------------------


async def test_jwks_rotation_refetches_once_per_new_kid_and_never_per_connect(
    jwks_server: JwksServer, ec_pair: KeyPair, rsa_pair: KeyPair
) -> None:
    clock = ManualClock()
    jwks_server.keys = [ec_pair.jwk("k1")]
    async with jwks_verifier(jwks_server.url, clock) as verifier:
        assert jwks_server.requests == 1, "fetched once at start"
        for device in ("a1", "a2", "a3"):
            assert (await verifier.verify(ec_pair.token(device=device, kid="k1"))).device == device
        assert jwks_server.requests == 1, "a known kid is never fetched for"

        # The provider rotates: a token naming the new kid makes exactly one fetch.
        jwks_server.keys = [ec_pair.jwk("k1"), rsa_pair.jwk("k2")]
        clock.advance(11)
        new = rsa_pair.token(kid="k2")
        assert (await verifier.verify(new)).user == "alice"
        assert (await verifier.verify(rsa_pair.token(device="a2", kid="k2"))).device == "a2"
        assert jwks_server.requests == 2

        # Random kids (a forger's) make no fetch within 10 s of the last one ...
        forger = make_pair("ES256")
        for i in range(20):
            await refused(verifier, forger.token(kid=f"random-{i}"), "unknown key")
        assert jwks_server.requests == 2
        # ... and, arriving together after it, share one.
        clock.advance(11)
        tokens = [forger.token(kid=f"again-{i}") for i in range(20)]
        results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
        assert all(isinstance(r, AuthError) for r in results)
        assert jwks_server.requests == 3

        # A key the provider withdraws: the background refresh drops it, and its tokens (even
        # remembered ones) are refused from then on.
        old = ec_pair.token(device="a1", kid="k1")
        assert (await verifier.verify(old)).device == "a1"
        jwks_server.keys = [rsa_pair.jwk("k2")]
        clock.advance(300)
        await wait_until(lambda: jwks_server.requests == 4, what="the periodic refresh")
        await asyncio.sleep(0.05)  # the refresh's answer is taken
        await refused(verifier, old, "unknown key")
        assert (await verifier.verify(new)).user == "alice"
        assert jwks_server.requests == 4


async def test_a_jwks_that_is_down_refuses_its_tokens_until_it_answers(
    jwks_server: JwksServer, ec_pair: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    jwks_server.keys = [ec_pair.jwk("k1")]
    jwks_server.status = 503
    token = ec_pair.token(kid="k1")
    async with jwks_verifier(jwks_server.url, clock) as verifier:  # starts anyway
        await refused(verifier, token, "signing keys unavailable")
        assert jwks_server.requests == 1, "no refetch within 10 s of the last"
        hs256 = issue_token(secret=SECRET, user="bob", device="b1", ttl_s=60)
        assert (await verifier.verify(hs256)).user == "bob", "HS256 tokens do not need the JWKS"
        jwks_server.status = 200
        clock.advance(11)
        assert (await verifier.verify(token)).user == "alice"
        assert jwks_server.requests == 2
        # Down again: the refresh fails, and the keys held are kept.
        jwks_server.status = 500
        clock.advance(300)
        await wait_until(lambda: jwks_server.requests == 3, what="the periodic refresh")
        assert (await verifier.verify(ec_pair.token(device="a2", kid="k1"))).device == "a2"
    for record in caplog.records:
        assert jwks_server.keys[0]["x"] not in record.getMessage(), "key material is never logged"


async def test_a_jwks_url_where_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pair = make_pair("ES256")
    async with jwks_verifier(f"http://127.0.0.1:{port}/jwks", ManualClock()) as verifier:
        await refused(verifier, pair.token(kid="k1"), "signing keys unavailable")
        assert verifier.dead_workers() == []


async def test_a_jwks_holding_unusable_keys(jwks_server: JwksServer, ec_pair: KeyPair) -> None:
    """Keys for encryption, private keys, symmetric keys and other curves are left out."""
    clock = ManualClock()
    p384 = ec.generate_private_key(ec.SECP384R1())
    symmetric = {"kty": "oct", "k": _b64(SECRET.encode()), "kid": "oct", "alg": "HS256"}
    private = {**ec_pair.jwk("priv"), "d": _b64(b"\1" * 32)}
    jwks_server.keys = [
        {**ec_pair.jwk("enc"), "use": "enc"},
        private,
        symmetric,
        {**jwt.algorithms.ECAlgorithm.to_jwk(p384.public_key(), as_dict=True), "kid": "p384"},
        ec_pair.jwk("good"),
    ]
    async with jwks_verifier(jwks_server.url, clock) as verifier:
        assert (await verifier.verify(ec_pair.token(kid="good"))).user == "alice"
        for kid in ("enc", "priv", "p384"):
            await refused(verifier, ec_pair.token(device=f"d-{kid}", kid=kid), "unknown key")
        hs_with_jwks_key = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "oct"})
        assert (await verifier.verify(hs_with_jwks_key)).user == "alice", "HS256 is the secret's, kid or not"


# --- `mqchat token --private-key` -------------------------------------------------------------------


def _mqchat_token(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "mqchat"
    return subprocess.run(
        [str(command), "token", *args], capture_output=True, text=True, env=repo_env(), cwd=cwd, timeout=60
    )


async def test_token_command_signs_with_a_private_key(tmp_path: Path, ec_pair: KeyPair, rsa_pair: KeyPair) -> None:
    (tmp_path / "ec.pem").write_bytes(ec_pair.private_pem)
    (tmp_path / "rsa.pem").write_bytes(rsa_pair.private_pem)
    out = _mqchat_token(
        *("--user", "alice", "--device", "a1", "--ttl", "10m", "--private-key", "ec.pem", "--kid", "dev-1"),
        *("--iss", "https://id.example", "--aud", "mqchat"),
        cwd=tmp_path,  # no data dir, no secret: none is needed
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    token = out.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "dev-1", "typ": "JWT"}
    verifier = TokenVerifier(
        secret=SECRET, public_key=ec_pair.public_pem, issuer="https://id.example", audience="mqchat"
    )
    identity = await verifier.verify(token)
    assert (identity.user, identity.device) == ("alice", "a1")
    assert identity.issued_at is not None
    assert identity.expires_at == int(identity.issued_at) + 600
    assert not (tmp_path / "data").exists()

    rs = _mqchat_token("--user", "bob", "--device", "b1", "--private-key", "rsa.pem", "--alg", "RS256", cwd=tmp_path)
    assert rs.returncode == 0, rs.stderr
    assert (await TokenVerifier(secret=SECRET, public_key=rsa_pair.public_pem).verify(rs.stdout.strip())).user == "bob"

    (tmp_path / "public.pem").write_bytes(ec_pair.public_pem)
    for bad in (
        ("--private-key", "rsa.pem", "--alg", "ES256"),
        ("--private-key", "public.pem"),
        ("--private-key", "missing.pem"),
    ):
        done = _mqchat_token("--user", "alice", "--device", "a1", *bad, cwd=tmp_path)
        assert done.returncode == 2, done
        assert done.stderr.startswith("mqchat:"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "PRIVATE KEY" not in done.stderr
        assert "PUBLIC KEY" not in done.stderr


# --- a CONNECT to the real broker ----------------------------------------------------------------------


async def _connect_refused(port: int, *, user: str, device: str, token: str) -> None:
    client = aiomqtt.Client("127.0.0.1", port, username=user, password=token, identifier=device, timeout=10)
    with pytest.raises(aiomqtt.MqttCodeError) as refused_connect:
        async with client:
            pass
    assert str(refused_connect.value.rc) in ("Not authorized", "5"), refused_connect.value.rc


@pytest.mark.parametrize(("adapter", "source"), [("inbroker", "pem"), ("mqtt", "jwks")])
async def test_an_es256_token_connects_to_the_broker(
    tmp_path: Path, jwks_server: JwksServer, ec_pair: KeyPair, adapter: str, source: str
) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(ec_pair.public_pem)
    jwks_server.keys = [ec_pair.jwk("k1")]
    config = make_config(tmp_path)
    where = {"jwt_public_key": str(pem)} if source == "pem" else {"jwks_url": jwks_server.url}
    config = dataclasses.replace(config, auth=AuthConfig(jwt_secret=config.auth.jwt_secret, **where))
    alice = unique("alice")
    async with open_stack(config, adapter) as stack:
        token = ec_pair.token(alice, "a1", kid="k1")
        async with connect_device(stack.mqtt_port, alice, "a1", token):
            pass
        async with stack.http() as http:  # the HTTP API takes the same token
            answer = await http.get("/v1/conversations", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        forged = make_pair("ES256").token(alice, "a2", kid="k1")
        await _connect_refused(stack.mqtt_port, user=alice, device="a2", token=forged)
        async with stack.http() as http:
            answer = await http.get("/v1/conversations", headers={"Authorization": f"Bearer {forged}"})
            assert answer.status_code == 401
            assert forged not in answer.text
        # The shared secret's tokens still connect, and the bridge (its credential) is up.
        async with connect_device(stack.mqtt_port, alice, "a3", stack.token(alice, "a3")):
            pass
    if source == "jwks":
        assert jwks_server.requests == 2, "one fetch per process that verifies: the broker's and the bridge's"


def test_short_rsa_keys_are_refused() -> None:
    from mqchat.jwks import algorithm_of

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(ValueError, match="1024 bits"):
        algorithm_of(weak)
    assert algorithm_of(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()) == "RS256"
