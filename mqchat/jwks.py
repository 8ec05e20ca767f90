"""Public signing keys: one from a PEM file (``load_public_key``), or an identity provider's, from
its JWKS URL, kept in memory (``JwksCache``).

::

    JwksCache (a service)
      enter ──▶ fetch once (a failure is logged; the server starts anyway)
      worker "jwks-refresh": fetch every refresh_s; a failure is logged and the keys held are kept
      key_for(kid) ──▶ a kid held: its key, from memory (never a fetch)
                   └─▶ a kid not held: one fetch, then the answer; at most one such fetch per
                       min_refetch_s (random kids cannot make it fetch per CONNECT), and callers
                       that miss at once share it

Until a fetch has succeeded, every token that needs these keys is refused ("signing keys
unavailable"). Only EC P-256 (ES256) and RSA (RS256) public signing keys are taken: a key for
encryption, of another algorithm, symmetric, or carrying private parts is left out. Key material,
and what the provider answered, are never logged; the URL is logged without its credentials or
query.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from prometheus_client import Counter

from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import AuthError, MqchatError
from mqchat.service import Service, ServiceStatistics

logger = logging.getLogger(__name__)

JWKS_FETCHES = Counter("mqchat_jwks_fetches_total", "Fetches of the JWKS signing keys", ["outcome"])

MAX_JWKS_BYTES = 1024 * 1024
"""A larger answer from the JWKS URL is refused."""


class UnusableJwks(MqchatError):
    """The JWKS URL answered, but not with a JWKS of usable keys. The message names only the
    status, the size or what is missing, never what was answered."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One public key of the set: what verifies a token, and a fingerprint that names it."""

    kid: str | None
    algorithm: str  # ES256 or RS256
    key: EllipticCurvePublicKey | RSAPublicKey
    fingerprint: bytes  # changes when the key published under this kid changes


PublicKey = EllipticCurvePublicKey | RSAPublicKey


def load_public_key(pem: bytes) -> PublicKey:
    """The EC P-256 or RSA public key in a PEM text; ValueError otherwise (naming nothing it holds)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, EllipticCurvePublicKey | RSAPublicKey):
        raise ValueError("not an EC P-256 or RSA public key")
    algorithm_of(key)  # an EC key on another curve is refused here
    return key


MIN_RSA_BITS = 2048
"""Shorter RSA keys are refused (they can be factored)."""


def algorithm_of(key: object) -> str:
    """The token algorithm a public key verifies: ES256 (EC P-256) or RS256 (RSA); ValueError for
    any other key."""
    if isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1):
        return "ES256"
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        return "RS256"
    raise ValueError("not an EC P-256 or RSA public key")


def shown_url(url: str) -> str:
    """The URL as logs show it: scheme, host, port and path (no credentials, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_jwks(document: object) -> dict[str | None, SigningKey]:
    """The usable signing keys of a JWKS document, by kid; UnusableJwks when it is not a JWKS or
    holds no usable key."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise UnusableJwks("not a JWKS document (an object with a list of keys)")
    found: dict[str | None, SigningKey] = {}
    for entry in document["keys"]:
        key = _signing_key(entry)
        if key is not None and key.kid not in found:
            found[key.kid] = key
    if not found:
        raise UnusableJwks("no usable signing key (ES256 on P-256, or RS256)")
    return found


def _signing_key(entry: object) -> SigningKey | None:
    if not isinstance(entry, dict) or "d" in entry or entry.get("use", "sig") != "sig":
        return None  # not a JWK, a private key, or a key for encryption
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        jwk = jwt.PyJWK(entry)
    except Exception:  # an unknown key type or curve, or parameters of any wrong shape: left out
        return None
    key = jwk.key
    try:
        if algorithm_of(key) != jwk.algorithm_name:
            return None  # e.g. an RSA key published for RS512
    except ValueError:
        return None
    fingerprint = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).digest()
    return SigningKey(kid=kid, algorithm=jwk.algorithm_name, key=key, fingerprint=fingerprint)


def _fingerprints(keys: Mapping[str | None, SigningKey]) -> dict[str | None, bytes]:
    return {kid: key.fingerprint for kid, key in keys.items()}


class JwksCache(Service):
    """The keys published at ``url``, fetched at start, every ``refresh_s``, and when a token
    names a kid not held (at most once per ``min_refetch_s``). Used before it is entered, it
    fetches at the first token instead, and never in the background."""

    name = "JWKS"

    def __init__(
        self,
        *,
        url: str,
        refresh_s: float = 300.0,
        min_refetch_s: float = 10.0,
        timeout_s: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__()
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("a JWKS URL starts with http:// or https://")
        self.url = url
        self._refresh_s = refresh_s
        self._min_refetch_s = min_refetch_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._transport = transport
        self._keys: dict[str | None, SigningKey] | None = None  # None: no fetch has succeeded yet
        self._lock = asyncio.Lock()
        self._fetches = 0  # fetches ended, succeeded or not
        self._last_fetch: float | None = None  # when the latest fetch started (monotonic)

    async def _start(self) -> None:
        async with self._lock:
            await self._fetch()
        self.start_worker(self._refresh_forever(), name="jwks-refresh")

    def fingerprint(self, kid: str | None) -> bytes | None:
        """The fingerprint of the key held for kid, or None; no fetch."""
        key = self._held(kid)
        return None if key is None else key.fingerprint

    async def key_for(self, kid: str | None) -> SigningKey:
        """The key a token's ``kid`` names (a token without one: the set's only key). Raises
        AuthError when there is none, or when no fetch has succeeded yet."""
        key = self._held(kid)
        if key is None and (self._keys is None or kid is not None):
            await self._refetch()
            key = self._held(kid)
        if key is not None:
            return key
        if self._keys is None:
            raise AuthError("signing keys unavailable")
        if kid is None:
            raise AuthError("invalid token: no key id (kid), and the JWKS holds several keys")
        raise AuthError("invalid token: signed with an unknown key")

    def _held(self, kid: str | None) -> SigningKey | None:
        keys = self._keys
        if not keys:
            return None
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        return keys.get(kid)

    async def _refetch(self) -> None:
        """Fetch for a kid not held, unless one was fetched too recently; callers that arrive
        during a fetch wait for it and take its answer."""
        fetches = self._fetches
        async with self._lock:
            if self._fetches != fetches:
                return  # a fetch ended while this caller waited: its answer is this caller's too
            last = self._last_fetch
            if last is not None and self._clock.monotonic() - last < self._min_refetch_s:
                return
            await self._fetch()

    async def _refresh_forever(self) -> None:
        while True:
            await self._clock.sleep(self._refresh_s)
            async with self._lock:
                await self._fetch()

    async def _fetch(self) -> None:
        """One fetch (the caller holds the lock). A failure is logged, by its kind only, and the
        keys held are kept."""
        self._last_fetch = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                body = await self._download()
            keys = parse_jwks(json.loads(body))
        except Exception as exc:  # whatever the URL answers (or fails with), the keys held are kept
            JWKS_FETCHES.labels(outcome="failed").inc()
            why = str(exc) if isinstance(exc, UnusableJwks) else type(exc).__name__
            held = "keeping the keys held" if self._keys is not None else "tokens signed with them are refused"
            logger.warning("signing keys from %s unavailable (%s); %s", shown_url(self.url), why, held)
            return
        finally:
            self._fetches += 1
        JWKS_FETCHES.labels(outcome="ok").inc()
        if self._keys is None or _fingerprints(keys) != _fingerprints(self._keys):
            logger.info("signing keys from %s: %d key(s)", shown_url(self.url), len(keys))
        self._keys = keys

    async def _download(self) -> bytes:
        async with (
            httpx.AsyncClient(transport=self._transport, timeout=self._timeout_s, follow_redirects=False) as client,
            client.stream("GET", self.url, headers={"accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise UnusableJwks(f"HTTP {response.status_code}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise UnusableJwks(f"an answer over {MAX_JWKS_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    def statistics(self) -> JwksStatistics:
        task = self.task_statistics()
        return JwksStatistics(
            workers=task.workers,
            dead_workers=task.dead_workers,
            jobs=task.jobs,
            keys=len(self._keys or {}),
            fetches=self._fetches,
        )


@dataclass(frozen=True, kw_only=True)
class JwksStatistics(ServiceStatistics):
    keys: int  # signing keys held
    fetches: int  # fetches ended since start, succeeded or not
