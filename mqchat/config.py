"""Configuration: one frozen dataclass per section, loaded once.

Precedence, highest first: command-line flags, environment (``MQCHAT_*``), a TOML config file
(``--config`` / ``MQCHAT_CONFIG``; flat keys named like the flags, e.g. ``mqtt_port = 1883``),
defaults. Sizes ("64KiB") and durations ("1h") are parsed here, once. Each component receives
only its own section. The JWT secret is never logged; when none is configured one is generated
into the data dir (file mode 0600) and reused from there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: str | int) -> int:
    """Bytes from ``65536``, ``"64KiB"``, ``"1MB"``."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value.strip())
    if not m:
        raise ConfigError(f"not a size: {value!r} (try 65536, 64KiB, 1MiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_duration(value: str | float) -> float:
    """Seconds from ``3600``, ``"1h"``, ``"30m"``, ``"500ms"``."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION_RE.fullmatch(value.strip())
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


def parse_positive_int(value: str | int) -> int:
    number: int = _number(value, int, "a positive whole number")
    if number < 1:
        raise ValueError(f"{number} is not a positive whole number")
    return number


def parse_positive_float(value: str | float) -> float:
    number: float = _number(value, float, "a positive number")
    if not 0 < number < float("inf"):
        raise ValueError(f"{value!r} is not a positive number")
    return number


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


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    host: str = "127.0.0.1"
    mqtt_port: int = 1883
    http_port: int = 8080


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt_secret: str = dataclasses.field(repr=False)


STORAGE_BACKENDS = ("sqlite", "cassandra")


def parse_storage_backend(value: str) -> str:
    if value not in STORAGE_BACKENDS:
        raise ValueError(f"{value!r} is not one of {', '.join(STORAGE_BACKENDS)}")
    return value


@dataclass(frozen=True, slots=True)
class StorageConfig:
    data_dir: Path = Path("data")
    backend: str = "sqlite"  # which storage.BACKENDS entry holds messages and push state

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "mqchat.sqlite3"


ADAPTERS = ("mqtt", "inbroker")


def parse_adapter(value: str) -> str:
    if value not in ADAPTERS:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}")
    return value


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    # How requests reach the pipeline: "inbroker" (broker and bridge in one process, no MQTT hop;
    # the faster, by `mqchat bench chat`) or "mqtt" (the bridge as an MQTT client of any broker).
    adapter: str = "inbroker"
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


@dataclass(frozen=True, slots=True)
class Config:
    network: NetworkConfig
    auth: AuthConfig
    storage: StorageConfig
    bridge: BridgeConfig
    presence: PresenceConfig = PresenceConfig()
    push: PushConfig = PushConfig()
    log_level: str = "INFO"


# name → (section, field, parser); flags, env and file all use these names.
_KEYS: dict[str, tuple[str, str, Any]] = {
    "host": ("network", "host", str),
    "mqtt_port": ("network", "mqtt_port", parse_port),
    "http_port": ("network", "http_port", parse_port),
    "data_dir": ("storage", "data_dir", Path),
    "storage_backend": ("storage", "backend", parse_storage_backend),
    "jwt_secret": ("auth", "jwt_secret", str),
    "adapter": ("bridge", "adapter", parse_adapter),
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
    "log_level": ("", "log_level", parse_log_level),
}
KNOWN_KEYS = frozenset(_KEYS)


def config_to_env(config: Config) -> dict[str, str]:
    """The ``MQCHAT_*`` environment that reproduces config (the secret included) in a child process."""
    env: dict[str, str] = {}
    for key, (section, field, _) in _KEYS.items():
        value = getattr(getattr(config, section) if section else config, field)
        env[f"MQCHAT_{key.upper()}"] = str(value.resolve() if isinstance(value, Path) else value)
    return env


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
    secret, generated = resolve_jwt_secret(config.auth.jwt_secret or None, config.storage.data_dir)
    return dataclasses.replace(config, auth=AuthConfig(jwt_secret=secret)), generated


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, *, secret: SecretMode = "generate"
) -> tuple[Config, bool]:
    """Build the frozen config; every bad value is a ConfigError naming its key. ``secret``: see
    resolve_jwt_secret. Returns (config, jwt_secret_generated_now)."""
    raw = gather_settings(flags, env)
    sections: dict[str, dict[str, Any]] = {
        "network": {},
        "storage": {},
        "bridge": {},
        "presence": {},
        "push": {},
        "": {},
    }
    for key, value in raw.items():
        if key == "jwt_secret":
            continue
        section, field, parse = _KEYS[key]
        try:
            sections[section][field] = parse(value)
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"bad value for {key}: {exc}") from None
    storage = StorageConfig(**sections["storage"])
    jwt_secret, generated = resolve_jwt_secret(
        raw.get("jwt_secret"), storage.data_dir, mode=secret, explicit_dir="data_dir" in raw
    )
    config = Config(
        network=NetworkConfig(**sections["network"]),
        auth=AuthConfig(jwt_secret=jwt_secret),
        storage=storage,
        bridge=BridgeConfig(**sections["bridge"]),
        presence=PresenceConfig(**sections["presence"]),
        push=PushConfig(**sections["push"]),
        **sections[""],
    )
    return config, generated
