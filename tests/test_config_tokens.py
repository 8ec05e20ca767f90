"""Configuration precedence, secret generation, token issue and verification."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from mqchat.config import load_config, parse_duration, parse_size
from mqchat.errors import AuthError, ConfigError
from mqchat.tokens import TokenVerifier, issue_token, service_password
from tests.helpers import repo_env


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    cfg = tmp_path / "mqchat.toml"
    cfg.write_text('mqtt_port = 1000\nhttp_port = 1001\nmax_envelope_bytes = "1KiB"\n')
    env = {"MQCHAT_CONFIG": str(cfg), "MQCHAT_HTTP_PORT": "2001", "MQCHAT_DATA_DIR": str(tmp_path)}
    config, _ = load_config({"mqtt_port": 3000}, env)
    assert config.network.mqtt_port == 3000
    assert config.network.http_port == 2001
    assert config.bridge.max_envelope_bytes == 1024
    assert config.storage.data_dir == tmp_path


def test_secret_is_generated_once_privately_and_reused(tmp_path: Path) -> None:
    first, generated = load_config({"data_dir": tmp_path}, {})
    assert generated
    mode = stat.S_IMODE((tmp_path / "jwt_secret").stat().st_mode)
    assert mode == 0o600
    second, generated_again = load_config({"data_dir": tmp_path}, {})
    assert not generated_again
    assert first.auth.jwt_secret == second.auth.jwt_secret
    assert first.auth.jwt_secret not in repr(first)
    explicit, _ = load_config({"data_dir": tmp_path}, {"MQCHAT_JWT_SECRET": "s" * 40})
    assert explicit.auth.jwt_secret == "s" * 40


@pytest.mark.parametrize(
    "bad",
    [
        {"mqtt_port": "x"},
        {"mqtt_port": 70000},
        {"max_envelope_bytes": "lots"},
        {"max_envelope_bytes": True},
        {"receipt_window": ["1s"]},  # a TOML list: refused, not an AttributeError
        {"receipt_window": True},
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config({"data_dir": tmp_path, **bad}, {})


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("mqtt_prot = 1\n")
    with pytest.raises(ConfigError, match="mqtt_prot"):
        load_config({"config": str(cfg), "data_dir": tmp_path}, {})


def test_sizes_and_durations() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("1MB") == 1_000_000
    assert parse_duration("1h") == 3600
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1e-05") == 1e-05  # how str() writes a small float, as config_to_env does
    assert parse_duration("2e3ms") == 2.0
    with pytest.raises(ConfigError):
        parse_duration("soon")


async def test_tokens_verify_and_refuse() -> None:
    verifier = TokenVerifier(secret="k" * 32)
    token = issue_token(secret="k" * 32, user="alice", device="phone", ttl_s=60)
    identity = await verifier.verify(token)
    assert (identity.user, identity.device) == ("alice", "phone")
    assert identity.issued_at is not None, "tokens carry iat"
    assert abs(identity.issued_at - time.time()) < 5
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(issue_token(secret="k" * 32, user="alice", device="phone", ttl_s=1, now=0))
    with pytest.raises(AuthError):
        await verifier.verify(issue_token(secret="x" * 32, user="alice", device="phone", ttl_s=60))
    with pytest.raises(ValueError, match="ids"):
        issue_token(secret="k" * 32, user="al ice", device="phone", ttl_s=60)
    assert verifier.verify_service(service_password("k" * 32))
    assert not verifier.verify_service(token)
    assert not verifier.verify_service(None)


def _mqchat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqchat", *args], capture_output=True, text=True, env=repo_env(), cwd=cwd, timeout=60
    )


async def test_token_command_signs_with_the_data_dir_secret(tmp_path: Path) -> None:
    load_config({"data_dir": tmp_path}, {})  # what `mqchat serve` does first: the secret is made
    out = _mqchat("token", "--user", "alice", "--device", "a1", "--ttl", "2h", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert out.stderr == ""
    secret = (tmp_path / "jwt_secret").read_text().strip()
    identity = await TokenVerifier(secret=secret).verify(token)
    assert (identity.user, identity.device) == ("alice", "a1")
    bad = _mqchat("token", "--user", "bad user", "--device", "a1", "--data-dir", str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.startswith("mqchat:")
    assert bad.stderr.count("\n") == 1


def test_presence_and_push_settings(tmp_path: Path) -> None:
    config, _ = load_config({"data_dir": str(tmp_path)}, env={})
    assert (config.presence.redis_url, config.presence.grace_s, config.presence.ttl_s) == ("", 5.0, 15.0)
    assert (config.push.window_s, config.push.apns_configured, config.push.fcm_credentials) == (2.0, False, "")
    env = {
        "MQCHAT_REDIS_URL": "redis://:pw@10.0.0.5:6379/0",
        "MQCHAT_PRESENCE_GRACE": "2s",
        "MQCHAT_APNS_SANDBOX": "true",
        "MQCHAT_APNS_KEY_ID": "ABC123DEFG",
        "MQCHAT_PUSH_WINDOW": "500ms",
    }
    config, _ = load_config({"data_dir": str(tmp_path), "fcm_credentials": "sa.json"}, env=env)
    assert config.presence.redis_url == "redis://:pw@10.0.0.5:6379/0"
    assert "pw" not in repr(config.presence), "the Redis URL may carry a password: kept out of reprs"
    assert (config.presence.grace_s, config.push.window_s) == (2.0, 0.5)
    assert config.push.apns_sandbox is True
    assert config.push.apns_configured
    assert config.push.fcm_credentials == "sa.json"
    for key, value in (("redis_url", "http://x"), ("apns_sandbox", "maybe"), ("presence_grace", "soon")):
        with pytest.raises(ConfigError, match=key):
            load_config({"data_dir": str(tmp_path), key: value}, env={})


async def test_a_remembered_token_still_expires_and_stays_with_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from mqchat import tokens

    decoded: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting)  # PyJWT's, to count the decodes
    verifier = TokenVerifier(secret="s" * 32)
    # Valid for 1-2 more seconds (tokens get 30 s of leeway for clock skew).
    short = issue_token(secret="s" * 32, user="alice", device="a1", ttl_s=1, now=int(time.time()) - 29)
    assert (await verifier.verify(short)).user == "alice"
    assert (await TokenVerifier(secret="s" * 32).verify(short)).user == "alice"
    assert decoded == [short], "the second verifier, of the same secret, remembered it"
    with pytest.raises(AuthError, match="invalid token"):
        await TokenVerifier(secret="t" * 32).verify(short)  # remembered under its own secret only
    with pytest.raises(AuthError, match="invalid token"):
        await TokenVerifier(secret="s" * 32, issuer="other").verify(short)  # nor under other settings
    await asyncio.sleep(2.1)
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(short)
    monkeypatch.setattr(tokens, "VERIFIED_KEPT", 5)
    for i in range(12):
        await verifier.verify(issue_token(secret="s" * 32, user=f"u{i}", device="d", ttl_s=60))
    assert len(tokens._verified) <= 5, "the memory is bounded"


def test_token_key_settings(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mqchat.config import config_to_env

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "id.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config, _ = load_config({"data_dir": tmp_path, "jwt_public_key": str(pem)}, {})
    auth = config.auth
    assert auth.algorithms == ("HS256", "ES256", "RS256"), "a key adds ES256 and RS256 to the default"
    assert (auth.jwt_leeway_s, auth.token_grace_s, auth.jwt_issuer, auth.jwt_audience) == (30.0, 30.0, "", "")
    env = {
        "MQCHAT_JWKS_URL": "https://id.example/.well-known/jwks.json",
        "MQCHAT_JWT_ALGORITHMS": "ES256, HS256",
        "MQCHAT_JWT_ISSUER": "https://id.example",
        "MQCHAT_JWT_AUDIENCE": "mqchat",
        "MQCHAT_JWT_LEEWAY": "5s",
        "MQCHAT_TOKEN_GRACE": "1m",
    }
    config, _ = load_config({"data_dir": tmp_path}, env)
    auth = config.auth
    assert auth.algorithms == ("ES256", "HS256")
    assert (auth.jwt_leeway_s, auth.token_grace_s, auth.jwt_audience) == (5.0, 60.0, "mqchat")
    again, _ = load_config({}, config_to_env(config))  # what a child process of `serve` gets
    assert again.auth == auth
    assert load_config({"data_dir": tmp_path}, {})[0].auth.algorithms == ("HS256",)
    pem_text = pem.read_text()
    for key_name, value, why in (
        ("jwt_algorithms", "none", "never accepted"),
        ("jwt_algorithms", "HS256,HS512", "HS512"),
        ("jwt_algorithms", "ES256", "needs jwt_public_key or jwks_url"),
        ("jwks_url", "ftp://id.example/jwks", "http"),
        ("jwks_url", "http://id.example/jwks", "must be https"),
        ("jwt_leeway", "-1s", "not a duration"),
        ("jwt_public_key", str(tmp_path / "missing.pem"), "cannot read"),
        ("jwt_public_key", str(tmp_path / "jwt_secret"), "no PEM public key"),
    ):
        with pytest.raises(ConfigError, match=why) as refused:
            load_config({"data_dir": tmp_path, key_name: value}, {})
        assert key_name in str(refused.value)
        assert pem_text not in str(refused.value)
