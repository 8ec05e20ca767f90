"""Configuration precedence, secret generation, token issue and verification."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

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


def test_tokens_verify_and_refuse() -> None:
    verifier = TokenVerifier(secret="k" * 32)
    token = issue_token(secret="k" * 32, user="alice", device="phone", ttl_s=60)
    identity = verifier.verify(token)
    assert (identity.user, identity.device) == ("alice", "phone")
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(issue_token(secret="k" * 32, user="alice", device="phone", ttl_s=1, now=0))
    with pytest.raises(AuthError):
        verifier.verify(issue_token(secret="x" * 32, user="alice", device="phone", ttl_s=60))
    with pytest.raises(ValueError, match="ids"):
        issue_token(secret="k" * 32, user="al ice", device="phone", ttl_s=60)
    assert verifier.verify_service(service_password("k" * 32))
    assert not verifier.verify_service(token)
    assert not verifier.verify_service(None)


def _mqchat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqchat", *args], capture_output=True, text=True, env=repo_env(), cwd=cwd, timeout=60
    )


def test_token_command_signs_with_the_data_dir_secret(tmp_path: Path) -> None:
    load_config({"data_dir": tmp_path}, {})  # what `mqchat serve` does first: the secret is made
    out = _mqchat("token", "--user", "alice", "--device", "a1", "--ttl", "2h", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert out.stderr == ""
    secret = (tmp_path / "jwt_secret").read_text().strip()
    identity = TokenVerifier(secret=secret).verify(token)
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


def test_a_remembered_token_still_expires_and_stays_with_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from mqchat import tokens

    decoded: list[str] = []
    decode = TokenVerifier._decode

    def counting(self: TokenVerifier, token: str) -> tokens.Identity:
        decoded.append(token)
        return decode(self, token)

    monkeypatch.setattr(TokenVerifier, "_decode", counting)
    verifier = TokenVerifier(secret="s" * 32)
    # Valid for 1-2 more seconds (tokens get 30 s of leeway for clock skew).
    short = issue_token(secret="s" * 32, user="alice", device="a1", ttl_s=1, now=int(time.time()) - 29)
    assert verifier.verify(short).user == "alice"
    assert TokenVerifier(secret="s" * 32).verify(short).user == "alice"
    assert decoded == [short], "the second verifier, of the same secret, remembered it"
    with pytest.raises(AuthError, match="invalid token"):
        TokenVerifier(secret="t" * 32).verify(short)  # remembered under its own secret only
    time.sleep(2.1)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(short)
    monkeypatch.setattr(tokens, "VERIFIED_KEPT", 5)
    for i in range(12):
        verifier.verify(issue_token(secret="s" * 32, user=f"u{i}", device="d", ttl_s=60))
    assert len(tokens._verified) <= 5, "the memory is bounded"
