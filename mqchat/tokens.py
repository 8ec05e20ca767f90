"""Access tokens (JWT) and the broker's service credential.

A device connects with username = user id, password = JWT (claims ``sub`` = user, ``dev`` =
device, ``exp``; ``iat`` when it was issued), client id = device id. The bridge connects as
:data:`SERVICE_USERNAME` with a password derived from the secret by HMAC under a label no JWT can
equal, so a device token can never pass as the service. Nothing here logs or formats a token, a
secret or a key.

Which key checks a token follows from its header, and only among the algorithms accepted::

    alg HS256          ──▶ the shared secret (jwt_secret)
    alg ES256 / RS256  ──▶ a JWKS is set and the token names a kid (or no public key is set):
                       │     the JWKS's key for that kid (mqchat.jwks.JwksCache)
                       └─▶ otherwise the configured public key (PEM)

Each algorithm is checked with its own kind of key only, and the key's own algorithm must be the
token's: a public key never serves as an HMAC secret, "none" is never accepted. Then ``exp``
(with leeway), ``iss`` and ``aud`` when configured, and ``sub`` / ``dev``.

A token verified once is remembered (by its exact text, under a scope made of every verification
setting: secret, keys, algorithms, issuer, audience, leeway) until it expires, by every verifier
of the process: a device that reconnects, or connects and then catches up over HTTP, is not
decoded and checked again (a reconnect storm spent an eighth of a node's CPU there). A token
checked with a JWKS key is remembered with that key's fingerprint, and checked again once the
JWKS no longer holds that key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from mqchat.config import KEY_ALGORITHMS, parse_token_algorithms
from mqchat.errors import AuthError, ConfigError
from mqchat.ids import is_valid_id
from mqchat.jwks import JwksCache, PublicKey, algorithm_of, load_public_key

if TYPE_CHECKING:
    from mqchat.config import AuthConfig

SERVICE_USERNAME = "$mqchat-service"
"""The bridge's MQTT username: '$' is outside the user id charset, so no device can claim it."""
SERVICE_CLIENT_PREFIX = "$mqchat-bridge"
"""Client ids of bridge connections; outside the device id charset for the same reason."""

_SERVICE_LABEL = b"mqchat service credential v1"
_HOOKS_LABEL = b"mqchat broker hooks credential v1"
_ADMIN_LABEL = b"mqchat admin credential v1"
DEFAULT_LEEWAY_S = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user: str
    device: str
    expires_at: int
    issued_at: float | None = None  # the token's "iat"; None when it has none


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: Identity
    kid: str | None = None
    fingerprint: bytes | None = None  # of the JWKS key that checked it; None: the secret or the PEM key


VERIFIED_KEPT = 20_000
"""Verified tokens remembered per process (a few hundred bytes each)."""
_verified: OrderedDict[tuple[bytes, str], _Verified] = OrderedDict()


class TokenVerifier:
    """Verifies access tokens (HS256 with the shared secret; ES256 and RS256 with a public key
    or a JWKS) and the service credential.

    An async context manager: entered, it fetches the JWKS's keys and refreshes them in the
    background until it exits (without a JWKS, entering does nothing). Used without entering, it
    fetches a JWKS at the first token that needs it."""

    def __init__(
        self,
        *,
        secret: str,
        algorithms: Iterable[str] | None = None,
        public_key: bytes | None = None,
        jwks: JwksCache | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = DEFAULT_LEEWAY_S,
    ) -> None:
        """``algorithms``: by default HS256, plus ES256 and RS256 when ``public_key`` (a PEM text,
        EC P-256 or RSA) or ``jwks`` is given. ValueError for an unknown algorithm, "none", or
        ES256/RS256 with no key to check them."""
        if not secret:
            raise ValueError("a JWT secret is required")
        if leeway_s < 0:
            raise ValueError("the leeway cannot be negative")
        self._secret = secret
        self._public_key: PublicKey | None = None if public_key is None else load_public_key(public_key)
        self._jwks = jwks
        keyed = public_key is not None or jwks is not None
        if algorithms is None:
            algorithms = ("HS256", *KEY_ALGORITHMS) if keyed else ("HS256",)
        self._algorithms = parse_token_algorithms(tuple(algorithms))
        if not keyed and any(name in KEY_ALGORITHMS for name in self._algorithms):
            raise ValueError("ES256 and RS256 need a public key or a JWKS")
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway_s = leeway_s
        self._required = ["sub", "dev", "exp", *(["iss"] if issuer else []), *(["aud"] if audience else [])]
        self._service_password = service_password(secret)
        # Tokens verified under other settings are not this verifier's.
        settings = [
            secret,
            ",".join(self._algorithms),
            _public_der(self._public_key).hex(),
            jwks.url if jwks is not None else "",
            self._issuer or "",
            self._audience or "",
            repr(leeway_s),
        ]
        self._scope = hashlib.sha256("\0".join(settings).encode("utf-8", "surrogatepass")).digest()

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self._algorithms

    async def __aenter__(self) -> Self:
        if self._jwks is not None:
            await self._jwks.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop refreshing the JWKS (idempotent)."""
        if self._jwks is not None:
            await self._jwks.aclose()

    def dead_workers(self) -> list[str]:
        """The JWKS refresh, when it has died (for /healthz and the watchdog)."""
        return self._jwks.dead_workers() if self._jwks is not None else []

    async def verify(self, token: str) -> Identity:
        """Return the identity in a valid token, or raise AuthError (never echoing the token)."""
        key = (self._scope, token)
        known = _verified.get(key)
        if known is not None:
            if time.time() < known.identity.expires_at + self._leeway_s and self._still_held(known):
                _verified.move_to_end(key)
                return known.identity
            _verified.pop(key, None)
        verified = await self._decode(token)
        _verified[key] = verified
        while len(_verified) > VERIFIED_KEPT:
            _verified.popitem(last=False)
        return verified.identity

    def _still_held(self, known: _Verified) -> bool:
        if known.fingerprint is None:
            return True
        return self._jwks is not None and self._jwks.fingerprint(known.kid) == known.fingerprint

    async def _decode(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("invalid token: algorithm not accepted")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("invalid token: bad kid")
        signing: Any = self._secret
        fingerprint: bytes | None = None
        if alg != "HS256":
            signing, fingerprint = await self._public_key_for(alg, kid)
        try:
            claims = jwt.decode(
                token,
                signing,
                algorithms=[alg],
                options={"require": self._required},
                leeway=self._leeway_s,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        user, device, exp, iat = claims.get("sub"), claims.get("dev"), claims.get("exp"), claims.get("iat")
        if not (is_valid_id(user) and is_valid_id(device)) or not isinstance(exp, int):
            raise AuthError("invalid token: bad sub/dev claims")
        assert isinstance(user, str)
        assert isinstance(device, str)
        issued_at = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None
        identity = Identity(user=user, device=device, expires_at=exp, issued_at=issued_at)
        return _Verified(identity, kid if fingerprint is not None else None, fingerprint)

    async def _public_key_for(self, alg: str, kid: str | None) -> tuple[PublicKey, bytes | None]:
        """The key that checks an ES256/RS256 token, and its JWKS fingerprint (None: the PEM key)."""
        if self._jwks is not None and (kid is not None or self._public_key is None):
            found = await self._jwks.key_for(kid)
            if found.algorithm != alg:
                raise AuthError("invalid token: its algorithm is not its key's")
            return found.key, found.fingerprint
        if self._public_key is None or algorithm_of(self._public_key) != alg:
            raise AuthError("invalid token: its algorithm is not its key's")
        return self._public_key, None

    def verify_service(self, password: str | None) -> bool:
        """True when password is the service credential (constant-time compare)."""
        return password is not None and hmac.compare_digest(password, self._service_password)


def _public_der(key: PublicKey | None) -> bytes:
    if key is None:
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verifier_for(auth: AuthConfig) -> TokenVerifier:
    """The verifier the auth settings describe (not yet entered: enter it to fetch and refresh a
    JWKS). ConfigError when the public key cannot be read; the message names the file only."""
    public_key = None
    if auth.jwt_public_key:
        try:
            public_key = Path(auth.jwt_public_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read jwt_public_key {auth.jwt_public_key}: {exc.strerror}") from None
    try:
        return TokenVerifier(
            secret=auth.jwt_secret,
            algorithms=auth.algorithms,
            public_key=public_key,
            jwks=JwksCache(url=auth.jwks_url) if auth.jwks_url else None,
            issuer=auth.jwt_issuer or None,
            audience=auth.jwt_audience or None,
            leeway_s=auth.jwt_leeway_s,
        )
    except ValueError as exc:
        raise ConfigError(f"bad token settings: {exc}") from None


def service_password(secret: str) -> str:
    """The bridge's broker password, derived from the JWT secret."""
    return hmac.new(secret.encode(), _SERVICE_LABEL, hashlib.sha256).hexdigest()


def hooks_credential(secret: str) -> str:
    """What an external broker presents to mqchat's authentication and authorisation hooks:
    derived from the JWT secret under a label of its own, so it cannot log in as the bridge."""
    return hmac.new(secret.encode(), _HOOKS_LABEL, hashlib.sha256).hexdigest()


def is_credential(given: str, expected: str) -> bool:
    """Whether given is the derived credential expected (constant time; "" is never one)."""
    return bool(expected) and given.isascii() and hmac.compare_digest(given, expected)


def admin_credential(secret: str) -> str:
    """What a service presents to the admin API (``mqchat admin-credential`` prints it): derived
    from the JWT secret under a label of its own, so it is neither a token nor another credential."""
    return hmac.new(secret.encode(), _ADMIN_LABEL, hashlib.sha256).hexdigest()


def load_private_key(pem: bytes) -> EllipticCurvePrivateKey | RSAPrivateKey:
    """The EC P-256 or RSA private key in an unencrypted PEM text; ValueError otherwise (naming
    nothing it holds)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key (EC P-256 or RSA)") from None
    if not isinstance(key, EllipticCurvePrivateKey | RSAPrivateKey):
        raise ValueError("not an EC P-256 or RSA private key")
    algorithm_of(key.public_key())  # an EC key on another curve is refused here
    return key


def issue_token(
    *,
    user: str,
    device: str,
    ttl_s: int,
    secret: str = "",
    now: float | None = None,
    private_key: bytes | None = None,
    algorithm: str | None = None,
    kid: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Sign an access token for (user, device), valid for ttl_s seconds, with ``iat``: HS256 with
    ``secret``, or, given ``private_key`` (a PEM text), ES256 (EC P-256) or RS256 (RSA) as the
    key's kind says (``algorithm``, when given, must agree). ``kid`` goes in the header; ``issuer``
    and ``audience`` become ``iss`` and ``aud``."""
    if not (is_valid_id(user) and is_valid_id(device)):
        raise ValueError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]")
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    moment = math.floor((time.time() if now is None else now) * 1000) / 1000
    issued = int(moment)
    # iat to the millisecond: a device that signs in again just after a logout (within the same
    # second) is not taken for one of the tokens the logout revoked.
    claims: dict[str, Any] = {"sub": user, "dev": device, "iat": moment, "exp": issued + ttl_s}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    headers = {"kid": kid} if kid else None
    if private_key is None:
        if algorithm not in (None, "HS256"):
            raise ValueError(f"{algorithm} tokens are signed with a private key")
        if not secret:
            raise ValueError("a secret or a private key is required")
        return jwt.encode(claims, secret, algorithm="HS256", headers=headers)
    key = load_private_key(private_key)
    natural = algorithm_of(key.public_key())
    if algorithm is not None and algorithm != natural:
        raise ValueError(f"this key signs {natural} tokens, not {algorithm}")
    return jwt.encode(claims, key, algorithm=natural, headers=headers)
