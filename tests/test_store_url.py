"""The ``store`` key: a storage URL (sqlite:, cassandra://) and the Cassandra keys beside it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mqchat.config import Config, StorageConfig, config_to_env, load_config, parse_store_url
from mqchat.errors import ConfigError
from tests.helpers import repo_env

PASSWORD = "Pw-7f3e9c1d"  # distinctive: found in a message or repr only if leaked
MQCHAT = [sys.executable, "-m", "mqchat"]


def _storage(flags: dict[str, Any], env: dict[str, str] | None = None) -> StorageConfig:
    config, _ = load_config(flags, env or {}, secret="defer")
    return config.storage


def _refusal(flags: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(flags, env or {}, secret="defer")
    message = str(info.value)
    assert "\n" not in message
    return message


# --- URLs that parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:", {"backend": "sqlite", "data_dir": Path("data")}),
        ("sqlite://", {"backend": "sqlite", "data_dir": Path("data")}),
        ("sqlite:///var/lib/mqchat", {"backend": "sqlite", "data_dir": Path("/var/lib/mqchat")}),
        ("sqlite:/var/lib/mqchat", {"backend": "sqlite", "data_dir": Path("/var/lib/mqchat")}),
        ("sqlite:run/data", {"backend": "sqlite", "data_dir": Path("run/data")}),
        ("SQLite:my%20data", {"backend": "sqlite", "data_dir": Path("my data")}),
        (
            "cassandra://10.0.0.5",
            {
                "backend": "cassandra",
                "cassandra_hosts": ("10.0.0.5",),
                "cassandra_port": 9042,
                "cassandra_keyspace": "mqchat",
                "cassandra_consistency": "LOCAL_QUORUM",
                "cassandra_serial_consistency": "LOCAL_SERIAL",
            },
        ),
        (
            "cassandra://db1.internal,db2.internal,db-3:9142/Chat_1",
            {
                "cassandra_hosts": ("db1.internal", "db2.internal", "db-3"),
                "cassandra_port": 9142,
                "cassandra_keyspace": "chat_1",
            },
        ),
        (
            "cassandra://[::1]:9043,[2001:db8::7]/ks",
            {"cassandra_hosts": ("::1", "2001:db8::7"), "cassandra_port": 9043},
        ),
        ("cassandra://a:9042,b:9042/ks", {"cassandra_hosts": ("a", "b"), "cassandra_port": 9042}),
        (
            "cassandra://h/ks?dc=eu-west_1&rf=5&consistency=quorum&serial_consistency=SERIAL&timeout=1500ms",
            {
                "cassandra_dc": "eu-west_1",
                "cassandra_rf": 5,
                "cassandra_consistency": "QUORUM",
                "cassandra_serial_consistency": "SERIAL",
                "cassandra_timeout_s": 1.5,
            },
        ),
        ("cassandra://h/?timeout=2", {"cassandra_keyspace": "mqchat", "cassandra_timeout_s": 2.0}),
        (
            "cassandra://app:p%40ss%3Aw0rd@h/ks",
            {"cassandra_username": "app", "cassandra_password": "p@ss:w0rd"},
        ),
        ("cassandra://app@h/ks", {"cassandra_username": "app", "cassandra_password": ""}),
        ("cassandra://app:s3cr@t@h/ks", {"cassandra_password": "s3cr@t"}),  # the last @ ends the user info
    ],
)
def test_good_store_urls(url: str, expected: dict[str, Any]) -> None:
    storage = _storage({"store": url})
    assert {field: getattr(storage, field) for field in expected} == expected


def test_a_store_url_sets_only_what_it_names(tmp_path: Path) -> None:
    storage = _storage({"store": "sqlite://", "data_dir": str(tmp_path)})
    assert (storage.backend, storage.data_dir) == ("sqlite", tmp_path)
    storage = _storage({"store": "cassandra://h/ks", "cassandra_consistency": "ONE", "cassandra_dc": "dc2"})
    assert (storage.cassandra_consistency, storage.cassandra_dc, storage.cassandra_rf) == ("ONE", "dc2", 3)
    # A cassandra store keeps the data dir apart: the generated secret still lives there.
    storage = _storage({"store": "cassandra://h/ks", "data_dir": str(tmp_path)})
    assert storage.data_dir == tmp_path
    assert StorageConfig(data_dir=tmp_path, backend="sqlite").cassandra_hosts == ("127.0.0.1",)


# --- URLs that are refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "not a store URL"),
        ("/var/lib/mqchat", "not a store URL"),
        ("postgres://h/db", "unknown scheme 'postgres:'"),
        ("sqlite://data", "sqlite:// takes no host"),
        ("sqlite:data?mode=ro", "no parameters"),
        ("sqlite:da%00ta", "NUL"),
        ("cassandra:h/ks", "starts cassandra://"),
        ("cassandra://", "no host"),
        ("cassandra:///ks", "no host"),
        ("cassandra://h1,,h2/ks", "empty host"),
        ("cassandra://h1,/ks", "empty host"),
        ("cassandra://:9042/ks", "names no host"),
        ("cassandra://h1,h1/ks", "listed twice"),
        ("cassandra://bad host/ks", "not a host name"),
        ("cassandra://-h/ks", "not a host name"),
        ("cassandra://999.1.1.1/ks", "not a host name"),
        ("cassandra://hôst/ks", "not a host name"),
        ("cassandra://::1/ks", "brackets"),
        ("cassandra://[::1/ks", r"not \[IPv6\]"),
        ("cassandra://[nope]:9042/ks", r"not \[IPv6\]"),
        ("cassandra://[::1]x/ks", r"not \[IPv6\]"),
        ("cassandra://h:/ks", "not a port"),
        ("cassandra://h:0/ks", "not a port"),
        ("cassandra://h:65536/ks", "not a port"),
        ("cassandra://h:90a/ks", "not a port"),
        ("cassandra://h1:9042,h2:9043/ks", "different ports"),
        ("cassandra://h/1ks", "not a keyspace"),
        ("cassandra://h/k-s", "not a keyspace"),
        ("cassandra://h/" + "k" * 49, "not a keyspace"),
        ("cassandra://h/ks/more", "not a keyspace"),
        ("cassandra://h/ks/", "not a keyspace"),
        ("cassandra://h/System_Auth", "Cassandra's own"),
        ("cassandra://h/ks#frag", "fragment"),
        ("cassandra://h/ks?replication=3", "unknown parameter 'replication'"),
        ("cassandra://h/ks?consistency=MOSTLY", "consistency: 'MOSTLY' is not a consistency level"),
        ("cassandra://h/ks?consistency=SERIAL", "not a consistency level"),
        ("cassandra://h/ks?serial_consistency=QUORUM", "not a serial consistency level"),
        ("cassandra://h/ks?rf=0", "rf: 0 is not a positive whole number"),
        ("cassandra://h/ks?rf=three", "not a positive whole number"),
        ("cassandra://h/ks?timeout=0s", "not a positive duration"),
        ("cassandra://h/ks?timeout=soon", "not a duration"),
        ("cassandra://h/ks?timeout=1e999", "not a finite duration"),
        ("cassandra://h/ks?dc=eu west", "not a datacenter name"),
        ("cassandra://h/ks?dc='x'", "not a datacenter name"),
        ("cassandra://h/ks?rf", "has no value"),
        ("cassandra://h/ks?rf=1&rf=2", "given twice"),
        ("cassandra://:pw@h/ks", "names no user"),
        ("cassandra://u:%FF@h/ks", "password is not percent-encoded UTF-8"),
        ("cassandra://u:a/b@h/ks", "not USER:PASSWORD"),
    ],
)
def test_bad_store_urls_are_refused_in_one_line(url: str, match: str) -> None:
    message = _refusal({"store": url})
    assert message.startswith("bad value for store: ")
    assert re.search(match, message), message


@pytest.mark.parametrize("literal", ["5", "true", '["cassandra://h/ks"]', '{ url = "sqlite:" }'])
def test_a_store_that_is_not_text_is_refused(tmp_path: Path, literal: str) -> None:
    cfg = tmp_path / "mqchat.toml"
    cfg.write_text(f"store = {literal}\n")
    assert "a store URL is text" in _refusal({"config": str(cfg)})


# --- the password is never shown ---------------------------------------------------------------


def test_the_password_is_never_in_a_repr_or_a_message(tmp_path: Path) -> None:
    url = f"cassandra://app:{PASSWORD}@h1,h2/ks"
    config, _ = load_config({"store": url, "data_dir": str(tmp_path)}, {}, secret="defer")
    assert config.storage.cassandra_password == PASSWORD
    assert PASSWORD not in repr(config)
    assert PASSWORD not in repr(config.storage)
    assert PASSWORD not in config.storage.url
    assert "app" not in config.storage.url
    from_key, _ = load_config({"store": "cassandra://h/ks"}, {"MQCHAT_CASSANDRA_PASSWORD": PASSWORD}, secret="defer")
    assert from_key.storage.cassandra_password == PASSWORD
    assert PASSWORD not in repr(from_key)
    for bad_tail in ("h1:x/ks", "h1,h1/ks", "h/k-s", "h/ks?pw=1", "h/ks?rf=-1", "h/ks#x", ""):
        message = _refusal({"store": f"cassandra://app:{PASSWORD}@{bad_tail}"})
        assert PASSWORD not in message, message
    message = _refusal({"store": f"cassandra://app:{PASSWORD}@h/ks", "cassandra_password": "other"})
    assert "different passwords" in message
    assert PASSWORD not in message
    assert "other" not in message
    for bad in (f"casandra://app:{PASSWORD}@h/ks", f"app:{PASSWORD}@h", f"cassandra://app:{PASSWORD}/x@h/ks"):
        message = _refusal({"store": bad})
        assert PASSWORD not in message, message
    assert PASSWORD not in _refusal({"cassandra_password": "\ud800" + PASSWORD})


def test_mqchat_serve_reports_a_bad_store_in_one_line_without_the_password(tmp_path: Path) -> None:
    out = subprocess.run(
        [*MQCHAT, "serve", "--data-dir", str(tmp_path), "--store", f"cassandra://app:{PASSWORD}@h1:9042,h2:9043/ks"],
        capture_output=True,
        text=True,
        env=repo_env(),
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("mqchat: bad value for store: the hosts name different ports")
    assert out.stderr.count("\n") == 1
    assert PASSWORD not in out.stderr + out.stdout


# --- the store URL beside the other keys -------------------------------------------------------


def test_flag_env_and_file_reach_the_same_storage(tmp_path: Path) -> None:
    url = f"cassandra://app:{PASSWORD}@10.0.0.5,10.0.0.6:9142/chat?dc=dc1&rf=2&timeout=3s"
    cfg = tmp_path / "mqchat.toml"
    cfg.write_text(f'store = "{url}"\ncassandra_consistency = "QUORUM"\n')
    from_file = _storage({"config": str(cfg)})
    from_env = _storage({}, {"MQCHAT_STORE": url, "MQCHAT_CASSANDRA_CONSISTENCY": "QUORUM"})
    from_flags = _storage({"store": url, "cassandra_consistency": "QUORUM"})
    assert from_file == from_env == from_flags
    assert from_flags == StorageConfig(
        backend="cassandra",
        cassandra_hosts=("10.0.0.5", "10.0.0.6"),
        cassandra_port=9142,
        cassandra_keyspace="chat",
        cassandra_dc="dc1",
        cassandra_rf=2,
        cassandra_consistency="QUORUM",
        cassandra_timeout_s=3.0,
        cassandra_username="app",
        cassandra_password=PASSWORD,
    )
    # A flag beats the environment, which beats the file, as for every key.
    assert _storage({"config": str(cfg), "store": "sqlite:"}, {"MQCHAT_STORE": url}).backend == "sqlite"


def test_the_cassandra_keys_of_their_own(tmp_path: Path) -> None:
    cfg = tmp_path / "mqchat.toml"
    cfg.write_text(
        'storage_backend = "cassandra"\ncassandra_dc = "eu1"\ncassandra_rf = 2\n'
        'cassandra_consistency = "local_one"\ncassandra_serial_consistency = "serial"\n'
        'cassandra_timeout = "750ms"\ncassandra_username = "app"\n'
    )
    storage = _storage({"config": str(cfg)}, {"MQCHAT_CASSANDRA_PASSWORD": PASSWORD})
    assert storage == StorageConfig(
        backend="cassandra",
        cassandra_dc="eu1",
        cassandra_rf=2,
        cassandra_consistency="LOCAL_ONE",
        cassandra_serial_consistency="SERIAL",
        cassandra_timeout_s=0.75,
        cassandra_username="app",
        cassandra_password=PASSWORD,
    )
    for key, value in (
        ("cassandra_dc", "eu 1"),
        ("cassandra_rf", "0"),
        ("cassandra_rf", True),
        ("cassandra_consistency", "ANY"),
        ("cassandra_serial_consistency", "LOCAL_QUORUM"),
        ("cassandra_timeout", "0"),
        ("cassandra_timeout", ["1s"]),
    ):
        assert _refusal({key: value}).startswith(f"bad value for {key}: ")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"store": "cassandra://h/ks", "storage_backend": "sqlite"}, "store sets storage_backend to 'cassandra'"),
        ({"store": "sqlite:", "storage_backend": "cassandra"}, "but storage_backend is 'cassandra'"),
        ({"store": "sqlite:/srv/a", "data_dir": "/srv/b"}, "store sets data_dir to /srv/a but data_dir is /srv/b"),
        ({"store": "cassandra://h/ks?rf=3", "cassandra_rf": "5"}, "store sets cassandra_rf to 3"),
        ({"store": "cassandra://h/ks?consistency=ONE", "cassandra_consistency": "ALL"}, "cassandra_consistency"),
        ({"store": "cassandra://h/ks?dc=a", "cassandra_dc": "b"}, "cassandra_dc"),
        ({"store": "cassandra://h/ks?timeout=1s", "cassandra_timeout": "2s"}, "cassandra_timeout"),
        ({"store": "cassandra://u@h/ks", "cassandra_username": "v"}, "different usernames"),
    ],
)
def test_a_key_that_contradicts_the_store_url_is_refused(flags: dict[str, Any], match: str) -> None:
    message = _refusal(flags)
    assert match in message
    assert message.endswith("give one of them")


def test_a_key_that_agrees_with_the_store_url_is_fine(tmp_path: Path) -> None:
    storage = _storage(
        {
            "store": f"sqlite://{tmp_path}/./data",
            "storage_backend": "sqlite",
            "data_dir": str(tmp_path / "data"),
        }
    )
    assert storage.data_dir == tmp_path / "data"
    storage = _storage(
        {"store": "cassandra://h/ks?consistency=one&rf=2", "cassandra_consistency": "ONE", "cassandra_rf": 2}
    )
    assert (storage.cassandra_consistency, storage.cassandra_rf) == ("ONE", 2)


def test_a_sqlite_store_directory_holds_the_generated_secret(tmp_path: Path) -> None:
    config, generated = load_config({"store": f"sqlite://{tmp_path}/d"}, {})
    assert generated
    assert (tmp_path / "d" / "jwt_secret").read_text().strip() == config.auth.jwt_secret


@pytest.mark.parametrize(
    "flags",
    [
        {"store": f"cassandra://app:{PASSWORD}@db1,[::1]:9142/Chat?dc=dc1&rf=2&consistency=ONE&timeout=0.01ms"},
        {"store": "cassandra://h/ks", "cassandra_password": PASSWORD, "cassandra_username": "app"},
        {"storage_backend": "cassandra"},
        {"store": "sqlite:odd%25dir%3Fname%23x"},
        {},
    ],
)
def test_a_child_process_gets_the_same_storage(flags: dict[str, Any]) -> None:
    config, _ = load_config(flags, {}, secret="defer")
    env = config_to_env(config)
    again, _ = load_config({}, env, secret="defer")
    assert again.storage == dataclasses.replace(config.storage, data_dir=config.storage.data_dir.resolve())
    assert PASSWORD not in env["MQCHAT_STORE"]


# --- property: any text is a storage config or a ConfigError, never anything else --------------

# All of Unicode, lone surrogates included (st.text() leaves out category Cs by default).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=60)
# Pieces of store URLs, so that drawn values get past the scheme into every part of the parser.
SCHEMES = [
    "",
    "sqlite:",
    "sqlite://",
    "sqlite:///",
    "cassandra://",
    "cassandra://u:p@",
    "Cassandra://h",
    "cassandra://h/ks?",
]
URL_PARTS = ["h", "10.0.0.1", "[::1]", ",", ":", ":9042", "/", "/ks", "?", "&", "=", "@", "[", "]", "%", "%FF"]
URL_PARTS += ["%41", "#", "\0", "dc=dc1", "rf=3", "timeout=5s", "consistency=ONE", "serial_consistency=SERIAL"]
urlish = st.builds(
    lambda scheme, parts: scheme + "".join(parts),
    st.sampled_from(SCHEMES),
    st.lists(st.one_of(st.sampled_from(URL_PARTS), any_text), max_size=10),
)


def _parse(value: str) -> tuple[dict[str, Any] | None, str]:
    """(fields, "") or (None, the ConfigError's message); any other exception fails the test."""
    try:
        return parse_store_url(value), ""
    except ConfigError as exc:
        return None, str(exc)


@settings(max_examples=600, deadline=None)
@given(value=st.one_of(any_text, urlish))
def test_any_text_parses_or_is_a_config_error(value: str) -> None:
    fields, message = _parse(value)
    if fields is None:
        assert message
        assert "\n" not in message
    else:
        assert fields["backend"] in ("sqlite", "cassandra")
        assert set(fields) <= set(StorageConfig.__dataclass_fields__)
    try:
        config, _ = load_config({"store": value}, {}, secret="defer")
    except ConfigError as exc:
        message = str(exc)
    else:
        assert isinstance(config, Config)
        assert fields is not None
        message = ""
    assert "\n" not in message


@settings(max_examples=300, deadline=None)
@given(tail=urlish)
def test_the_password_never_appears_in_a_refusal(tail: str) -> None:
    assume(PASSWORD not in tail)
    _, message = _parse(f"cassandra://app:{PASSWORD}@{tail}")
    assert PASSWORD not in message
