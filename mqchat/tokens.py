"""Access tokens (JWT) and the broker's service credential.

A device connects with username = user id, password = JWT (claims ``sub`` = user, ``dev`` =
device, ``exp``), client id = device id. The bridge connects as :data:`SERVICE_USERNAME` with a
password derived from the secret by HMAC under a label no JWT can equal, so a device token can
never pass as the service. Nothing here logs or formats a token or a secret.

A token verified once is remembered (by its exact text, under its secret) until it expires, by
every verifier of the process: a device that reconnects, or connects and then catches up over
HTTP, is not decoded and checked again (a reconnect storm spent an eighth of a node's CPU there).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from mqchat.errors import AuthError
from mqchat.ids import is_valid_id

SERVICE_USERNAME = "$mqchat-service"
"""The bridge's MQTT username: '$' is outside the user id charset, so no device can claim it."""
SERVICE_CLIENT_PREFIX = "$mqchat-bridge"
"""Client ids of bridge connections; outside the device id charset for the same reason."""

_SERVICE_LABEL = b"mqchat service credential v1"
_HOOKS_LABEL = b"mqchat broker hooks credential v1"
_LEEWAY_S = 30


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user: str
    device: str
    expires_at: int


VERIFIED_KEPT = 20_000
"""Verified tokens remembered per process (a few hundred bytes each)."""
_verified: OrderedDict[tuple[bytes, str], Identity] = OrderedDict()


class TokenVerifier:
    """Verifies access tokens (HS256 with a shared secret) and the service credential."""

    def __init__(self, *, secret: str, algorithms: tuple[str, ...] = ("HS256",)) -> None:
        if not secret:
            raise ValueError("a JWT secret is required")
        self._secret = secret
        self._algorithms = list(algorithms)
        self._service_password = service_password(secret)
        # Tokens verified under another secret (or other algorithms) are not this verifier's.
        self._scope = hashlib.sha256(f"{secret}\0{','.join(algorithms)}".encode("utf-8", "surrogatepass")).digest()

    def verify(self, token: str) -> Identity:
        """Return the identity in a valid token, or raise AuthError (never echoing the token)."""
        key = (self._scope, token)
        known = _verified.get(key)
        if known is not None:
            if time.time() < known.expires_at + _LEEWAY_S:
                _verified.move_to_end(key)
                return known
            del _verified[key]
        identity = self._decode(token)
        _verified[key] = identity
        while len(_verified) > VERIFIED_KEPT:
            _verified.popitem(last=False)
        return identity

    def _decode(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=self._algorithms,
                options={"require": ["sub", "dev", "exp"]},
                leeway=_LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {type(exc).__name__}") from None
        user, device, exp = claims.get("sub"), claims.get("dev"), claims.get("exp")
        if not (is_valid_id(user) and is_valid_id(device)) or not isinstance(exp, int):
            raise AuthError("invalid token: bad sub/dev claims")
        assert isinstance(user, str)
        assert isinstance(device, str)
        return Identity(user=user, device=device, expires_at=exp)

    def verify_service(self, password: str | None) -> bool:
        """True when password is the service credential (constant-time compare)."""
        return password is not None and hmac.compare_digest(password, self._service_password)


def service_password(secret: str) -> str:
    """The bridge's broker password, derived from the JWT secret."""
    return hmac.new(secret.encode(), _SERVICE_LABEL, hashlib.sha256).hexdigest()


def hooks_credential(secret: str) -> str:
    """What an external broker presents to mqchat's authentication and authorisation hooks:
    derived from the JWT secret under a label of its own, so it cannot log in as the bridge."""
    return hmac.new(secret.encode(), _HOOKS_LABEL, hashlib.sha256).hexdigest()


def issue_token(*, secret: str, user: str, device: str, ttl_s: int, now: float | None = None) -> str:
    """Sign an HS256 access token for (user, device), valid for ttl_s seconds."""
    if not (is_valid_id(user) and is_valid_id(device)):
        raise ValueError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]")
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "dev": device, "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")
