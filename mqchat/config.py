"""Configuration: one frozen dataclass per section, loaded once.

Precedence, highest first: command-line flags, environment (``MQCHAT_*``), a TOML config file
(``--config`` / ``MQCHAT_CONFIG``; flat keys named like the flags, e.g. ``mqtt_port = 1883``),
defaults. Sizes ("64KiB") and durations ("1h") are parsed here, once. Each component receives
only its own section. The JWT secret is never logged; when none is configured one is generated
into the data dir (file mode 0600) and reused from there.

The ``store`` key is a URL that sets several storage fields at once (``sqlite:DIR``,
``cassandra://HOSTS/KEYSPACE?…``; see parse_store_url); a field's own key
(``storage_backend``, ``data_dir``, ``cassandra_consistency``, …) may repeat what the URL says but
never contradict it, whichever layer each came from. A password (in the URL or in
``cassandra_password``) is never shown, in reprs or in error messages.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import secrets
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from mqchat.errors import ConfigError

SECRET_FILE_NAME = "jwt_secret"

_SIZE_RE = re.compile(r"(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: str | int) -> int:
    """Bytes from ``65536``, ``"64KiB"``, ``"1MB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"not a size: {value!r} (try 65536, 64KiB, 1MiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_duration(value: str | float) -> float:
    """Seconds from ``3600``, ``"1h"``, ``"30m"``, ``"500ms"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"not a duration: {value!r} (try 30s, 15m, 1h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_log_level(value: str) -> str:
    level = str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return level


def _number(value: object, kind: Callable[[Any], Any], what: str) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not {what}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not {what}") from None


def parse_port(value: str | int) -> int:
    what = "a TCP port (0-65535; 0 picks a free one)"
    port: int = _number(value, int, what)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not {what}")
    return port


def _whole_from(value: str | int, least: int, what: str) -> int:
    number: int = _number(value, int, what)
    if number < least:
        raise ValueError(f"{number} is not {what}")
    return number


def _finite_from(value: str | float, *, zero: bool, what: str) -> float:
    number: float = _number(value, float, what)
    if not (number >= 0 if zero else number > 0) or number == float("inf"):
        raise ValueError(f"{value!r} is not {what}")
    return number


def parse_positive_int(value: str | int) -> int:
    return _whole_from(value, 1, "a positive whole number")


def parse_nonnegative_int(value: str | int) -> int:
    return _whole_from(value, 0, "a whole number, 0 or more")


def parse_positive_float(value: str | float) -> float:
    return _finite_from(value, zero=False, what="a positive number")


def parse_nonnegative_float(value: str | float) -> float:
    return _finite_from(value, zero=True, what="a number, 0 or more")


def parse_who_may_add(value: str) -> str:
    if value not in ("everyone", "contacts", "nobody"):
        raise ValueError(f"{value!r} is not one of everyone, contacts, nobody")
    return value


def parse_burst(value: str | float) -> float:
    number: float = _number(value, float, "a number of requests (at least 1)")
    if not 1 <= number < float("inf"):
        raise ValueError(f"{value!r} is not a number of requests (at least 1)")
    return number


def parse_positive_duration(value: str | float) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def parse_nonnegative_duration(value: str | float) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"{value!r} is a negative duration")
    return seconds


_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def parse_optional_port(value: str | int | None) -> int | None:
    """A port, or None for "off" (the listener is not opened)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    return parse_port(value)


def parse_ws_path(value: str) -> str:
    path = str(value)
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]{0,127}", path):
        raise ValueError(f"{value!r} is not a URL path (/ then letters, digits, . _ ~ - /)")
    return path


def parse_node_id(value: str) -> str:
    """A node's name in a cluster, or "" for the derived one (host name and MQTT port)."""
    name = str(value)
    if name and not _NODE_ID_RE.fullmatch(name):
        raise ValueError(f"{value!r} is not a node id (letters, digits, _ . : -; at most 64; a letter or digit first)")
    return name


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    host: str = "127.0.0.1"
    mqtt_port: int = 1883
    http_port: int = 8080
    # This node's name in a cluster: in /healthz, and a label on every /metrics sample. "": the
    # host name and the MQTT port, so that one configuration serves every node.
    node_id: str = ""
    # The MQTT listener's accept queue. A node that dies sends its devices to the others all at
    # once; asyncio's default (100) overflows, and clients then wait out SYN retransmits (1 s,
    # 3 s, …). The kernel caps it at net.core.somaxconn.
    mqtt_backlog: int = 4096
    mqtt_max_connections: int = 0  # connections at once; beyond: CONNACK refused (0: no limit)
    # New connections per second from one IP address (a burst of 5 × allowed); 0: no limit. Behind
    # a load balancer every device has the balancer's address: keep it 0 there, or size it for all.
    mqtt_connect_rate: float = 0.0
    # TLS (one certificate for MQTT over TLS, WSS and HTTPS; reloaded when the files change or
    # on SIGHUP). Unset: no TLS listener opens. tls_client_ca set: clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    mqtts_port: int | None = 8883  # with TLS; None: not opened
    https_port: int | None = 8443  # with TLS; None: not opened
    # MQTT over WebSocket (browsers, React Native) on ws_path; None: not opened. wss_port needs TLS.
    ws_port: int | None = None
    wss_port: int | None = None
    ws_path: str = "/mqtt"
    # False: only the TLS listeners open (no plain MQTT, WebSocket or HTTP port).
    plaintext: bool = True

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def listener_ports(self) -> dict[str, int | None]:
        """Every port this node opens, by listener (mqtt, mqtts, ws, wss, http, https); None: not
        opened."""
        tls, plain = self.tls, self.plaintext
        return {
            "mqtt": self.mqtt_port if plain else None,
            "mqtts": self.mqtts_port if tls else None,
            "ws": self.ws_port if plain else None,
            "wss": self.wss_port if tls else None,
            "http": self.http_port if plain else None,
            "https": self.https_port if tls else None,
        }

    @property
    def node(self) -> str:
        """node_id, or the one derived from the host name and the MQTT port."""
        return self.node_id or f"{socket.gethostname()}:{self.mqtt_port}"


TOKEN_ALGORITHMS = ("HS256", "ES256", "RS256")
"""The access-token algorithms mqchat verifies: HS256 with the shared secret; ES256 (EC P-256) and
RS256 (RSA) with a public key or a JWKS."""
KEY_ALGORITHMS = ("ES256", "RS256")


def parse_token_algorithms(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Token algorithms from ``"HS256,ES256"`` (commas or spaces) or a list; "none" and names
    outside TOKEN_ALGORITHMS are refused."""
    names = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{value!r} is not a list of token algorithms")
    chosen: list[str] = []
    for name in names:
        if name.strip().lower() == "none":
            raise ValueError('"none" (unsigned tokens) is never accepted')
        if name.strip() not in TOKEN_ALGORITHMS:
            raise ValueError(f"{name!r} is not a token algorithm ({', '.join(TOKEN_ALGORITHMS)})")
        if name.strip() not in chosen:
            chosen.append(name.strip())
    if not chosen:
        raise ValueError(f"no token algorithm named ({', '.join(TOKEN_ALGORITHMS)})")
    return tuple(chosen)


def parse_public_key_file(value: str) -> str:
    """The path of a PEM public key, EC P-256 or RSA; the file is read and checked here. The
    message names the file, never what it holds."""
    from mqchat.jwks import load_public_key  # cryptography, loaded only when a key is configured

    path = str(value)
    if not path:
        return path
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        load_public_key(pem)
    except ValueError:
        raise ValueError(f"{path} holds no PEM public key (EC P-256 or RSA)") from None
    return path


def parse_jwks_url(value: str) -> str:
    url = str(value)
    if url and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url, re.IGNORECASE):
        raise ValueError("a JWKS URL is http(s)://HOST[:PORT]/PATH")
    if url.lower().startswith("http://"):
        # Signing keys fetched in clear text could be anyone's: plain HTTP only on this machine.
        host = urlsplit(url).hostname or ""
        if host != "localhost" and not _is_loopback(host):
            raise ValueError("a JWKS URL must be https:// (http:// only to this machine: 127.0.0.1, ::1, localhost)")
    return url


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How access tokens are verified. HS256 tokens are signed with ``jwt_secret``, which also
    derives the bridge's service credential and the broker hooks' credential (so it is always
    there). ES256/RS256 tokens, signed by an identity provider, are checked against
    ``jwt_public_key`` and/or the keys published at ``jwks_url`` (a token naming a ``kid`` uses
    the JWKS when one is set)."""

    jwt_secret: str = dataclasses.field(repr=False)
    # A PEM public key (EC P-256 or RSA) that verifies ES256/RS256 tokens; "": none.
    jwt_public_key: str = ""
    # Where the identity provider publishes its signing keys (a JWKS, fetched at start, every
    # 5 minutes, and for a kid not yet known, at most every 10 s); "": none. While it has never
    # answered, tokens that need it are refused; the server runs regardless.
    jwks_url: str = ""
    # The algorithms accepted; (): HS256, plus ES256 and RS256 when a public key or a JWKS is set.
    jwt_algorithms: tuple[str, ...] = ()
    # When set, a token's "iss" must equal it.
    jwt_issuer: str = ""
    # When set, a token's "aud" must be or contain it; when not, a token naming an audience is refused.
    jwt_audience: str = ""
    # Clock skew tolerated on "exp", "nbf" and "iat".
    jwt_leeway_s: float = 30.0
    # How long a live connection may outlast its token's "exp" before it is closed.
    token_grace_s: float = 30.0
    # True when jwt_secret was not configured (flag, environment, config file) but is the one the
    # server generated into its data dir: dev mode (see dev_secret). Not a setting of its own.
    secret_in_data_dir: bool = False

    def __post_init__(self) -> None:
        keyed = bool(self.jwt_public_key or self.jwks_url)
        needing = [name for name in self.jwt_algorithms if name in KEY_ALGORITHMS]
        if needing and not keyed:
            raise ConfigError(f"jwt_algorithms names {needing[0]}, which needs jwt_public_key or jwks_url")

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms accepted: jwt_algorithms, or its default."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        return ("HS256", *KEY_ALGORITHMS) if self.jwt_public_key or self.jwks_url else ("HS256",)

    @property
    def dev_secret(self) -> bool:
        """The auth side of dev mode: the server runs on the secret it generated itself and no
        identity provider signs tokens. A configured secret, a public key or a JWKS (production)
        makes it false. The dev sign-in needs more (a loopback host, no TLS): see
        mqchat.app.dev_sign_in_open."""
        return self.secret_in_data_dir and not (self.jwt_public_key or self.jwks_url)


STORAGE_BACKENDS = ("sqlite", "cassandra")
CONSISTENCY_LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")
SERIAL_CONSISTENCY_LEVELS = ("SERIAL", "LOCAL_SERIAL")
CASSANDRA_DEFAULT_PORT = 9042
# Cassandra's own keyspaces: a store never writes into them.
_SYSTEM_KEYSPACES = frozenset(
    {
        "system",
        "system_auth",
        "system_distributed",
        "system_schema",
        "system_traces",
        "system_views",
        "system_virtual_schema",
    }
)
_KEYSPACE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
# Letters, digits, _ . - : names every snitch produces, and safe inside a CQL string literal.
_DC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def parse_storage_backend(value: str) -> str:
    if value not in STORAGE_BACKENDS:
        raise ValueError(f"{value!r} is not one of {', '.join(STORAGE_BACKENDS)}")
    return value


def parse_consistency(value: str) -> str:
    level = str(value).strip().upper()
    if level not in CONSISTENCY_LEVELS:
        raise ValueError(f"{value!r} is not a consistency level ({', '.join(CONSISTENCY_LEVELS)})")
    return level


def parse_serial_consistency(value: str) -> str:
    level = str(value).strip().upper()
    if level not in SERIAL_CONSISTENCY_LEVELS:
        raise ValueError(f"{value!r} is not a serial consistency level ({', '.join(SERIAL_CONSISTENCY_LEVELS)})")
    return level


def parse_datacenter(value: str) -> str:
    """A Cassandra datacenter name, or "" for the driver's default (fine with one DC)."""
    name = str(value)
    if name and not _DC_RE.fullmatch(name):
        raise ValueError(f"{value!r} is not a datacenter name (letters, digits, _ . -; at most 64)")
    return name


def parse_keyspace(value: str) -> str:
    """A CQL keyspace name, folded to lower case as CQL folds an unquoted name."""
    if not _KEYSPACE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a keyspace name (a letter, then letters, digits or _; at most 48)")
    name = value.lower()
    if name in _SYSTEM_KEYSPACES:
        raise ValueError(f"{value!r} is one of Cassandra's own keyspaces")
    return name


def parse_request_timeout(value: str | float) -> float:
    seconds = parse_positive_duration(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    return seconds


def parse_credential(value: str) -> str:
    """A Cassandra user name or password. The message never quotes it: it may be a secret."""
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate?)") from None
    return text


@dataclass(frozen=True, slots=True)
class StorageConfig:
    data_dir: Path = Path("data")  # SQLite's files, and the generated secret whatever the backend
    backend: str = "sqlite"  # which storage.BACKENDS entry holds messages and push state
    # Cassandra: contact points (all on one port), and the keyspace, created with
    # NetworkTopologyStrategy and cassandra_rf replicas in each datacenter.
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = CASSANDRA_DEFAULT_PORT
    cassandra_keyspace: str = "mqchat"
    cassandra_dc: str = ""  # the local datacenter for DC-aware load balancing; "": the driver's default
    cassandra_rf: int = 3
    cassandra_consistency: str = "LOCAL_QUORUM"
    cassandra_serial_consistency: str = "LOCAL_SERIAL"  # of conditional (lightweight) writes
    cassandra_timeout_s: float = 5.0  # per request
    cassandra_username: str = ""  # with a password: PasswordAuthenticator
    cassandra_password: str = dataclasses.field(default="", repr=False)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "mqchat.sqlite3"

    @property
    def url(self) -> str:
        """These settings as a ``store`` URL, without user name and password (fit for a log)."""
        if self.backend == "sqlite":
            path = str(self.data_dir).replace("%", "%25").replace("?", "%3F").replace("#", "%23")
            return f"sqlite://{path}" if self.data_dir.is_absolute() else f"sqlite:{path}"
        hosts = ",".join(f"[{host}]" if ":" in host else host for host in self.cassandra_hosts)
        params = [f"dc={self.cassandra_dc}"] if self.cassandra_dc else []
        params += [
            f"rf={self.cassandra_rf}",
            f"consistency={self.cassandra_consistency}",
            f"serial_consistency={self.cassandra_serial_consistency}",
            f"timeout={self.cassandra_timeout_s!r}",
        ]
        return f"{self.backend}://{hosts}:{self.cassandra_port}/{self.cassandra_keyspace}?{'&'.join(params)}"


# A cassandra URL's query parameters → (StorageConfig field, parser).
STORE_URL_PARAMS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "dc": ("cassandra_dc", parse_datacenter),
    "rf": ("cassandra_rf", parse_positive_int),
    "consistency": ("cassandra_consistency", parse_consistency),
    "serial_consistency": ("cassandra_serial_consistency", parse_serial_consistency),
    "timeout": ("cassandra_timeout_s", parse_request_timeout),
}
_STORE_URL_FORMS = "sqlite:DIR, sqlite:///ABS/DIR or cassandra://HOST[,HOST…][:PORT]/KEYSPACE"


def parse_store_url(value: object) -> dict[str, Any]:
    """The StorageConfig fields a ``store`` URL sets; ConfigError, in one line, if it is not one.

    ``sqlite:``, ``sqlite://``
        the SQLite backend in the data dir (``data_dir``, default ./data)
    ``sqlite:DIR``, ``sqlite:///ABS/DIR``
        the SQLite backend with DIR as the data dir (relative to the working directory
        unless it starts with /); ``sqlite://NAME…`` (a host) is refused
    ``cassandra://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…][/KEYSPACE][?NAME=VALUE&…]``
        HOST a name, an IPv4 address or ``[IPv6]``; one PORT for all (default 9042); KEYSPACE
        default ``mqchat``; NAME one of STORE_URL_PARAMS. User and password are percent-decoded.

    A URL sets only what it names. Messages quote the parts at fault, never the user info.
    """
    if not isinstance(value, str):
        raise ConfigError(f"a store URL is text: {_STORE_URL_FORMS}")
    scheme, colon, rest = value.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme):
        raise ConfigError(f"not a store URL: {_STORE_URL_FORMS}")
    scheme = scheme.lower()
    if scheme == "sqlite":
        return _sqlite_url_fields(rest)
    if scheme == "cassandra":
        return _cassandra_url_fields(rest)
    raise ConfigError(f"unknown scheme {scheme + ':'!r}: {_STORE_URL_FORMS}")


def _sqlite_url_fields(rest: str) -> dict[str, Any]:
    if rest.startswith("//"):
        rest = rest[2:]
        if rest and not rest.startswith("/"):
            raise ConfigError(
                "sqlite:// takes no host: sqlite:///ABS/DIR for an absolute directory, sqlite:DIR otherwise"
            )
    if "?" in rest or "#" in rest:
        raise ConfigError("a sqlite URL takes no parameters (in a directory name write ? as %3F, # as %23)")
    if not rest:
        return {"backend": "sqlite"}
    path = unquote(rest, errors="surrogateescape")  # undecodable bytes as os.fsdecode has them
    if "\0" in path:
        raise ConfigError("a directory name holds no NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ConfigError(f"{path!r} is not a directory name this system can use") from None
    return {"backend": "sqlite", "data_dir": Path(path)}


def _cassandra_url_fields(rest: str) -> dict[str, Any]:
    if not rest.startswith("//"):
        raise ConfigError("a cassandra URL starts cassandra:// (cassandra://HOST[,HOST…][:PORT]/KEYSPACE)")
    fields: dict[str, Any] = {"backend": "cassandra"}
    # The last @ ends the user info: hosts, keyspace and parameters hold none.
    userinfo, at, rest = rest[2:].rpartition("@")
    if at:
        fields.update(_userinfo_fields(userinfo))
    if "#" in rest:
        raise ConfigError("a cassandra URL takes no #fragment")
    rest, question, query = rest.partition("?")
    hosts, _, keyspace = rest.partition("/")
    fields.update(_host_fields(hosts))
    if keyspace:
        try:
            fields["cassandra_keyspace"] = parse_keyspace(keyspace)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if question:
        fields.update(_param_fields(query))
    return fields


def _userinfo_fields(userinfo: str) -> dict[str, Any]:
    if any(c in userinfo for c in "/?#"):
        raise ConfigError("the part before @ is not USER:PASSWORD (percent-encode / ? # @ in them)")
    user, _, password = userinfo.partition(":")
    fields: dict[str, Any] = {"cassandra_username": _decode_credential(user, "user name")}
    if not fields["cassandra_username"]:
        raise ConfigError("the user info names no user (cassandra://USER:PASSWORD@HOST/KEYSPACE)")
    if password:
        fields["cassandra_password"] = _decode_credential(password, "password")
    return fields


def _decode_credential(text: str, what: str) -> str:
    try:
        return parse_credential(unquote(text, errors="strict"))
    except ValueError:  # UnicodeDecodeError included; its message would quote the bytes
        raise ConfigError(f"the {what} is not percent-encoded UTF-8") from None


def _host_fields(hosts: str) -> dict[str, Any]:
    if not hosts:
        raise ConfigError("no host (cassandra://HOST[,HOST…][:PORT]/KEYSPACE)")
    names: list[str] = []
    ports: dict[int, str] = {}
    for item in hosts.split(","):
        host, port = _host_and_port(item)
        if host in names:
            raise ConfigError(f"host {host!r} is listed twice")
        names.append(host)
        if port is not None:
            ports.setdefault(port, item)
    if len(ports) > 1:
        raise ConfigError(
            f"the hosts name different ports ({', '.join(ports.values())}): the driver uses one port for all"
        )
    fields: dict[str, Any] = {"cassandra_hosts": tuple(names)}
    if ports:
        fields["cassandra_port"] = next(iter(ports))
    return fields


def _host_and_port(item: str) -> tuple[str, int | None]:
    """(host, port or None) from ``name``, ``1.2.3.4:9042``, ``[::1]:9042``."""
    if item.startswith("["):
        host, bracket, after = item[1:].partition("]")
        if not bracket or not _is_ipv6(host) or after[:1] not in ("", ":"):
            raise ConfigError(f"{item!r} is not [IPv6] or [IPv6]:PORT")
    else:
        host = item.partition(":")[0]
        after = item[len(host) :]
        if not item:
            raise ConfigError("an empty host in the host list")
        if item.count(":") > 1:
            raise ConfigError(f"{item!r}: write an IPv6 address in brackets, [IPv6]:PORT")
        if not host:
            raise ConfigError(f"{item!r} names no host")
        if not _is_host(host):
            raise ConfigError(f"{host!r} is not a host name or IP address")
    if not after:
        return host, None
    port = after[1:]
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{port!r} (in {item!r}) is not a port (1-65535)")
    return host, int(port)


def _is_ipv6(host: str) -> bool:
    if not host.isascii():
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _is_host(host: str) -> bool:
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        return False
    if all(c.isdigit() or c == "." for c in host):  # only an IPv4 address looks like this
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def _param_fields(query: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        name, eq, raw = item.partition("=")
        if name not in STORE_URL_PARAMS:
            raise ConfigError(f"unknown parameter {name!r} (known: {', '.join(STORE_URL_PARAMS)})")
        field, parse = STORE_URL_PARAMS[name]
        if field in fields:
            raise ConfigError(f"parameter {name} is given twice")
        if not eq:
            raise ConfigError(f"parameter {name} has no value ({name}=…)")
        try:
            fields[field] = parse(raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return fields


ADAPTERS = ("mqtt", "inbroker")


def parse_adapter(value: str) -> str:
    if value not in ADAPTERS:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}")
    return value


MAX_WORKERS = 256


def parse_workers(value: str | int) -> int:
    workers = parse_positive_int(value)
    if workers > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS} workers on one machine")
    return workers


def parse_broker_address(value: str) -> str:
    """An external MQTT broker as ``HOST:PORT`` (an IPv6 host in brackets), or "" for none."""
    text = str(value).strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare or not re.fullmatch(r"[A-Za-z0-9._:-]+", bare) or (":" in bare and bare == host):
        raise ValueError(f"{value!r} is not HOST:PORT (an IPv6 host in brackets)")
    try:
        number = parse_port(port)
    except ValueError:
        number = 0
    if not number:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return f"{host}:{number}"


def broker_host_port(address: str) -> tuple[str, int]:
    """The host and port of a parse_broker_address value."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    # How requests reach the pipeline: "inbroker" (broker and bridge in one process, no MQTT hop;
    # the faster, by `mqchat bench chat`) or "mqtt" (the bridge as an MQTT client of any broker).
    adapter: str = "inbroker"
    # An external MQTT broker (HOST:PORT) the bridge serves instead of a broker of its own
    # (`mqchat bridge`): worker processes share its requests through a shared subscription.
    broker: str = ""
    workers: int = 1  # 1 to MAX_WORKERS
    max_envelope_bytes: int = 64 * 1024
    max_inflight: int = 2048  # requests being processed at once (backpressure beyond)
    history_max_limit: int = 500
    max_group_members: int = 1000
    receipt_window_s: float = 0.5  # at most one receipt event per conversation and user per window
    # Rate limits (token buckets: a rate per second, and a burst allowed after a quiet spell). A
    # phone's offline outbox goes out at once on reconnect, and a catch-up acknowledges many
    # conversations at once: the bursts allow for both.
    send_rate: float = 50.0  # sends per second per device
    send_burst: float = 500.0
    user_send_rate: float = 100.0  # sends per second per user, all devices together
    user_send_burst: float = 1000.0
    receipt_rate: float = 100.0  # recv/read per second per device
    receipt_burst: float = 1000.0
    http_rate: float = 50.0  # HTTP calls per second per user
    http_burst: float = 200.0
    http_max_body_bytes: int = 1024 * 1024  # a larger request body gets 413 before it is read
    http_max_connections: int = 1000  # connections and requests at once; 503 beyond
    http_header_timeout_s: float = 10.0  # a request's headers must arrive within this
    # Who may add a user to a group or channel until the user chooses (PUT /v1/me/settings):
    # everyone, contacts (users they share a conversation with) or nobody.
    default_who_may_add: str = "everyone"


def parse_redis_url(value: str) -> str:
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
    return value


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    # Empty: the in-memory registry (one process); else the shared Redis registry.
    redis_url: str = dataclasses.field(default="", repr=False)  # may carry a password
    grace_s: float = 5.0  # a user who drops and reconnects within this never appears offline
    ttl_s: float = 15.0  # Redis: a process silent this long is dead; its devices go offline


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (true or false)")


@dataclass(frozen=True, slots=True)
class PushConfig:
    window_s: float = 2.0  # one notification per device and conversation per window
    max_per_s: float = 100.0  # a backlog drains at most this fast
    # APNs (token auth with a .p8 key); unset: pushes to iOS devices are only logged
    apns_key_file: str = ""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_topic: str = ""  # the app's bundle id
    apns_sandbox: bool = False  # development builds use Apple's sandbox
    apns_host: str = ""  # default: Apple's (set for a gateway or a test server)
    apns_port: int = 443
    apns_ca_file: str = ""  # default: the system's CAs
    # FCM (a service-account JSON file); unset: pushes to Android devices are only logged
    fcm_credentials: str = ""
    fcm_project_id: str = ""  # default: the one in the credentials
    fcm_endpoint: str = "https://fcm.googleapis.com"

    @property
    def apns_configured(self) -> bool:
        return bool(self.apns_key_file or self.apns_key_id or self.apns_team_id or self.apns_topic)


MEDIA_BACKENDS = ("local", "s3")

DEFAULT_MEDIA_TYPES = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "image/heic",
    "video/mp4",
    "video/quicktime",
    "audio/mpeg",
    "audio/mp4",
    "audio/aac",
    "audio/ogg",
    "application/pdf",
)
"""Content types an upload may declare (and its bytes must show); an end-to-end encrypted
(opaque) upload may be anything, its bytes unread."""

_MEDIA_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


def parse_media_backend(value: str) -> str:
    if value not in MEDIA_BACKENDS:
        raise ValueError(f"media backend must be one of {', '.join(MEDIA_BACKENDS)}")
    return value


def parse_media_types(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    if not names or not all(isinstance(n, str) and _MEDIA_TYPE_RE.fullmatch(n) for n in names):
        raise ValueError("media types are a comma-separated list of type/subtype names")
    return tuple(dict.fromkeys(names))


def parse_s3_endpoint(value: str) -> str:
    if value and not value.startswith(("https://", "http://")):
        raise ValueError("the S3 endpoint is an http(s):// URL")
    return value.rstrip("/")


@dataclass(frozen=True, slots=True)
class MediaConfig:
    backend: str = "local"  # "local": a directory (default data_dir/media); "s3": an S3-compatible bucket
    directory: str = ""  # local: where media files live (empty: DATA_DIR/media)
    max_bytes: int = 100 * 1024 * 1024  # one file
    user_bytes: int = 10 * 1024 * 1024 * 1024  # every file one user has, uploads in progress included
    user_uploads: int = 20  # one user's uploads in progress
    types: tuple[str, ...] = DEFAULT_MEDIA_TYPES
    upload_expiry_s: float = 24 * 3600.0  # an upload not completed by then is deleted
    unsent_expiry_s: float = 24 * 3600.0  # a completed upload no message refers to by then is deleted
    sweep_s: float = 60.0  # how often expired uploads and unreferenced media are looked for
    thumbnail_px: int = 64  # the longer side of the thumbnail in `msg` events
    max_pixels: int = 50_000_000  # larger images get no thumbnail (a decompression bomb is refused)
    s3_endpoint: str = ""  # empty: AWS's for the region
    s3_region: str = "us-east-1"
    s3_bucket: str = ""
    s3_access_key: str = dataclasses.field(default="", repr=False)
    s3_secret_key: str = dataclasses.field(default="", repr=False)
    presigned: bool = False  # s3: downloads redirect to presigned URLs; direct uploads are offered
    url_expiry_s: float = 600.0  # a presigned URL's lifetime


@dataclass(frozen=True, slots=True)
class Config:
    network: NetworkConfig
    auth: AuthConfig
    storage: StorageConfig
    bridge: BridgeConfig
    presence: PresenceConfig = PresenceConfig()
    push: PushConfig = PushConfig()
    media: MediaConfig = MediaConfig()
    log_level: str = "INFO"


# name → (section, field, parser); flags, env and file all use these names.
_KEYS: dict[str, tuple[str, str, Any]] = {
    "host": ("network", "host", str),
    "mqtt_port": ("network", "mqtt_port", parse_port),
    "http_port": ("network", "http_port", parse_port),
    "node_id": ("network", "node_id", parse_node_id),
    "mqtt_backlog": ("network", "mqtt_backlog", parse_positive_int),
    "mqtt_max_connections": ("network", "mqtt_max_connections", parse_nonnegative_int),
    "mqtt_connect_rate": ("network", "mqtt_connect_rate", parse_nonnegative_float),
    "tls_cert": ("network", "tls_cert", str),
    "tls_key": ("network", "tls_key", str),
    "tls_client_ca": ("network", "tls_client_ca", str),
    "mqtts_port": ("network", "mqtts_port", parse_optional_port),
    "https_port": ("network", "https_port", parse_optional_port),
    "ws_port": ("network", "ws_port", parse_optional_port),
    "wss_port": ("network", "wss_port", parse_optional_port),
    "ws_path": ("network", "ws_path", parse_ws_path),
    "plaintext": ("network", "plaintext", parse_bool),
    "data_dir": ("storage", "data_dir", Path),
    "storage_backend": ("storage", "backend", parse_storage_backend),
    "cassandra_dc": ("storage", "cassandra_dc", parse_datacenter),
    "cassandra_rf": ("storage", "cassandra_rf", parse_positive_int),
    "cassandra_consistency": ("storage", "cassandra_consistency", parse_consistency),
    "cassandra_serial_consistency": ("storage", "cassandra_serial_consistency", parse_serial_consistency),
    "cassandra_timeout": ("storage", "cassandra_timeout_s", parse_request_timeout),
    "cassandra_username": ("storage", "cassandra_username", parse_credential),
    "cassandra_password": ("storage", "cassandra_password", parse_credential),
    "jwt_secret": ("auth", "jwt_secret", str),
    "jwt_public_key": ("auth", "jwt_public_key", parse_public_key_file),
    "jwks_url": ("auth", "jwks_url", parse_jwks_url),
    "jwt_algorithms": ("auth", "jwt_algorithms", parse_token_algorithms),
    "jwt_issuer": ("auth", "jwt_issuer", str),
    "jwt_audience": ("auth", "jwt_audience", str),
    "jwt_leeway": ("auth", "jwt_leeway_s", parse_nonnegative_duration),
    "token_grace": ("auth", "token_grace_s", parse_nonnegative_duration),
    "adapter": ("bridge", "adapter", parse_adapter),
    "broker": ("bridge", "broker", parse_broker_address),
    "workers": ("bridge", "workers", parse_workers),
    "max_envelope_bytes": ("bridge", "max_envelope_bytes", parse_size),
    "max_inflight": ("bridge", "max_inflight", parse_positive_int),
    "history_max_limit": ("bridge", "history_max_limit", parse_positive_int),
    "max_group_members": ("bridge", "max_group_members", parse_positive_int),
    "receipt_window": ("bridge", "receipt_window_s", parse_nonnegative_duration),
    "send_rate": ("bridge", "send_rate", parse_positive_float),
    "send_burst": ("bridge", "send_burst", parse_burst),
    "user_send_rate": ("bridge", "user_send_rate", parse_positive_float),
    "user_send_burst": ("bridge", "user_send_burst", parse_burst),
    "receipt_rate": ("bridge", "receipt_rate", parse_positive_float),
    "receipt_burst": ("bridge", "receipt_burst", parse_burst),
    "http_rate": ("bridge", "http_rate", parse_positive_float),
    "http_burst": ("bridge", "http_burst", parse_burst),
    "http_max_body": ("bridge", "http_max_body_bytes", parse_size),
    "http_max_connections": ("bridge", "http_max_connections", parse_positive_int),
    "http_header_timeout": ("bridge", "http_header_timeout_s", parse_positive_duration),
    "default_who_may_add": ("bridge", "default_who_may_add", parse_who_may_add),
    "redis_url": ("presence", "redis_url", parse_redis_url),
    "presence_grace": ("presence", "grace_s", parse_nonnegative_duration),
    "presence_ttl": ("presence", "ttl_s", parse_positive_duration),
    "push_window": ("push", "window_s", parse_nonnegative_duration),
    "push_rate": ("push", "max_per_s", parse_positive_float),
    "apns_key_file": ("push", "apns_key_file", str),
    "apns_key_id": ("push", "apns_key_id", str),
    "apns_team_id": ("push", "apns_team_id", str),
    "apns_topic": ("push", "apns_topic", str),
    "apns_sandbox": ("push", "apns_sandbox", parse_bool),
    "apns_host": ("push", "apns_host", str),
    "apns_port": ("push", "apns_port", parse_port),
    "apns_ca_file": ("push", "apns_ca_file", str),
    "fcm_credentials": ("push", "fcm_credentials", str),
    "fcm_project_id": ("push", "fcm_project_id", str),
    "fcm_endpoint": ("push", "fcm_endpoint", str),
    "media_backend": ("media", "backend", parse_media_backend),
    "media_dir": ("media", "directory", str),
    "media_max_bytes": ("media", "max_bytes", parse_size),
    "media_user_bytes": ("media", "user_bytes", parse_size),
    "media_user_uploads": ("media", "user_uploads", parse_positive_int),
    "media_types": ("media", "types", parse_media_types),
    "media_upload_expiry": ("media", "upload_expiry_s", parse_positive_duration),
    "media_unsent_expiry": ("media", "unsent_expiry_s", parse_positive_duration),
    "media_sweep": ("media", "sweep_s", parse_positive_duration),
    "media_thumbnail_px": ("media", "thumbnail_px", parse_positive_int),
    "media_max_pixels": ("media", "max_pixels", parse_positive_int),
    "media_s3_endpoint": ("media", "s3_endpoint", parse_s3_endpoint),
    "media_s3_region": ("media", "s3_region", str),
    "media_s3_bucket": ("media", "s3_bucket", str),
    "media_s3_access_key": ("media", "s3_access_key", parse_credential),
    "media_s3_secret_key": ("media", "s3_secret_key", parse_credential),
    "media_presigned": ("media", "presigned", parse_bool),
    "media_url_expiry": ("media", "url_expiry_s", parse_positive_duration),
    "log_level": ("", "log_level", parse_log_level),
}
# ``store`` sets several storage fields at once (parse_store_url); its own keys name the others.
STORE_KEY = "store"
KNOWN_KEYS = frozenset(_KEYS) | {STORE_KEY}
_STORAGE_KEYS = {field: key for key, (section, field, _) in _KEYS.items() if section == "storage"}
_SECRET_FIELDS = frozenset({"cassandra_username", "cassandra_password"})


# Where a child process of `serve` learns that its parent's secret came from the data dir (so
# that it opens the dev sign-in too); config_to_env sets it, it is not a setting.
SECRET_SOURCE_VAR = "MQCHAT_JWT_SECRET_SOURCE"


def config_to_env(config: Config) -> dict[str, str]:
    """The ``MQCHAT_*`` environment that reproduces config (the secrets included) in a child process."""
    env: dict[str, str] = {SECRET_SOURCE_VAR: "data_dir" if config.auth.secret_in_data_dir else "configured"}
    for key, (section, field, _) in _KEYS.items():
        value = getattr(getattr(config, section) if section else config, field)
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"MQCHAT_{key.upper()}"] = str(value.resolve() if isinstance(value, Path) else value)
    storage = dataclasses.replace(config.storage, data_dir=config.storage.data_dir.resolve())
    env[f"MQCHAT_{STORE_KEY.upper()}"] = storage.url  # hosts, port, keyspace; agrees with the keys above
    return env


def _merge_store_url(from_url: Mapping[str, Any], from_keys: Mapping[str, Any]) -> dict[str, Any]:
    """The storage fields of the ``store`` URL and of their own keys; ConfigError where they disagree."""
    for field, value in from_url.items():
        if field not in from_keys or _same_setting(field, value, from_keys[field]):
            continue
        key = _STORAGE_KEYS[field]
        if field in _SECRET_FIELDS:
            raise ConfigError(f"{STORE_KEY} and {key} name different {key.partition('_')[2]}s: give one of them")
        raise ConfigError(
            f"{STORE_KEY} sets {key} to {_shown(value)} but {key} is {_shown(from_keys[field])}: give one of them"
        )
    return {**from_keys, **from_url}


def _same_setting(field: str, a: Any, b: Any) -> bool:
    if field == "data_dir":
        return bool(os.path.abspath(a) == os.path.abspath(b))
    return bool(a == b)


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    return data


def gather_settings(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge defaults < config file < env < flags into one flat dict of raw values."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    config_path = flags.get("config") or env.get("MQCHAT_CONFIG")
    if config_path:
        merged.update(_read_file(Path(config_path)))
    for key in KNOWN_KEYS:
        value = env.get(f"MQCHAT_{key.upper()}")
        if value:
            merged[key] = value
    merged.update({k: v for k, v in flags.items() if k in KNOWN_KEYS and v is not None})
    return merged


SecretMode = Literal["generate", "find", "skip", "defer"]


def secret_candidates(data_dir: Path, *, explicit_dir: bool) -> list[Path]:
    """Where a client command looks for the server's secret: the configured data dir; by default
    ``./data``, and inside a project folder (one holding ``.git`` or ``pyproject.toml``, as a
    checkout where ``make serve`` runs does) the ``data`` folder of each parent up to its root,
    so a command run anywhere inside the server's folder finds it. Never above that root: an
    unrelated ``/data/jwt_secret`` is not the server's."""
    if explicit_dir or data_dir.is_absolute():
        return [data_dir / SECRET_FILE_NAME]
    here = Path.cwd()
    folders = [here]
    for folder in (here, *here.parents):
        if folder != here:
            folders.append(folder)
        if (folder / ".git").exists() or (folder / "pyproject.toml").exists():
            break
    else:
        folders = [here]  # not inside a project: only ./data
    return [folder / data_dir / SECRET_FILE_NAME for folder in folders]


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT secret in {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{path} is empty; delete it to generate a new secret")
    return secret


def resolve_jwt_secret(
    explicit: str | None, data_dir: Path, *, mode: SecretMode = "generate", explicit_dir: bool = True
) -> tuple[str, bool]:
    """The configured secret, else the one stored in the data dir; then, by mode: ``generate``
    (the server) stores a new one there; ``find`` (client commands) looks further (see
    secret_candidates) and fails naming every place it looked, never creating one; ``skip``
    (a client given a token) answers "" when there is none; ``defer`` answers "" without looking
    (the server resolves it once its ports are known to be free, see with_jwt_secret).

    Returns (secret, generated_now).
    """
    if explicit:
        return explicit, False
    if mode == "defer":
        return "", False
    path = data_dir / SECRET_FILE_NAME
    if mode == "generate":
        if path.exists():
            return _read_secret(path), False
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        return secret, True
    candidates = secret_candidates(data_dir, explicit_dir=explicit_dir)
    for candidate in candidates:
        if candidate.is_file():
            return _read_secret(candidate), False
    if mode == "skip":
        return "", False
    looked = ", ".join(str(c.resolve()) for c in candidates[:4]) + (" …" if len(candidates) > 4 else "")
    raise ConfigError(
        f"no JWT secret found (looked in {looked}); run this where `mqchat serve` keeps its data, "
        "or pass --data-dir DIR, --jwt-secret SECRET (env MQCHAT_JWT_SECRET) or --token TOKEN"
    )


def with_jwt_secret(config: Config) -> tuple[Config, bool]:
    """config (loaded with secret="defer") with its secret: the configured one, else the data
    dir's, else a new one generated there. Returns (config, generated_now)."""
    configured = config.auth.jwt_secret
    secret, generated = resolve_jwt_secret(configured or None, config.storage.data_dir)
    auth = dataclasses.replace(config.auth, jwt_secret=secret, secret_in_data_dir=not configured)
    return dataclasses.replace(config, auth=auth), generated


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, *, secret: SecretMode = "generate"
) -> tuple[Config, bool]:
    """Build the frozen config; every bad value is a ConfigError naming its key. ``secret``: see
    resolve_jwt_secret. Returns (config, jwt_secret_generated_now)."""
    raw = gather_settings(flags, env)
    sections: dict[str, dict[str, Any]] = {
        "network": {},
        "auth": {},
        "storage": {},
        "bridge": {},
        "presence": {},
        "push": {},
        "media": {},
        "": {},
    }
    for key, value in raw.items():
        if key in ("jwt_secret", STORE_KEY):
            continue
        section, field, parse = _KEYS[key]
        try:
            sections[section][field] = parse(value)
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"bad value for {key}: {exc}") from None
    from_url: dict[str, Any] = {}
    if STORE_KEY in raw:
        try:
            from_url = parse_store_url(raw[STORE_KEY])
        except ConfigError as exc:
            raise ConfigError(f"bad value for {STORE_KEY}: {exc}") from None
    storage = StorageConfig(**_merge_store_url(from_url, sections["storage"]))
    jwt_secret, generated = resolve_jwt_secret(
        raw.get("jwt_secret"), storage.data_dir, mode=secret, explicit_dir="data_dir" in raw or "data_dir" in from_url
    )
    # Read from (or generated into) the data dir; a child of `serve` is told so by its parent.
    in_data_dir = bool(jwt_secret) and not raw.get("jwt_secret")
    if (os.environ if env is None else env).get(SECRET_SOURCE_VAR) == "data_dir":
        in_data_dir = True
    config = Config(
        network=NetworkConfig(**sections["network"]),
        auth=AuthConfig(jwt_secret=jwt_secret, secret_in_data_dir=in_data_dir, **sections["auth"]),
        storage=storage,
        bridge=BridgeConfig(**sections["bridge"]),
        presence=PresenceConfig(**sections["presence"]),
        push=PushConfig(**sections["push"]),
        media=MediaConfig(**sections["media"]),
        **sections[""],
    )
    check_listeners(config)
    check_media(config.media)
    return config, generated


def check_media(media: MediaConfig) -> None:
    """Refuse media settings that cannot work together (a ConfigError naming the keys)."""
    if media.backend == "s3" and not media.s3_bucket:
        raise ConfigError("media_backend = s3 needs media_s3_bucket")
    if media.backend != "s3" and media.presigned:
        raise ConfigError("media_presigned needs media_backend = s3 (a local directory has no presigned URLs)")
    if media.user_bytes < media.max_bytes:
        raise ConfigError("media_user_bytes must be at least media_max_bytes (one file must fit)")


def check_listeners(config: Config) -> None:
    """Refuse listener settings that cannot work together (a ConfigError naming the keys)."""
    net = config.network
    if bool(net.tls_cert) != bool(net.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both, or neither")
    if net.tls_client_ca and not net.tls:
        raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if net.wss_port is not None and not net.tls:
        raise ConfigError("wss_port needs TLS: set tls_cert and tls_key")
    if not net.plaintext:
        if not net.tls:
            raise ConfigError("plaintext = false needs TLS (tls_cert and tls_key): no listener would open")
        if config.bridge.adapter != "inbroker" and not config.bridge.broker:
            raise ConfigError(
                "plaintext = false needs the in-broker adapter (the bridge process reaches its broker in plain MQTT)"
            )
